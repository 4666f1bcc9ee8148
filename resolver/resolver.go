// Package resolver is the neighbour index: it answers, for a batch of
// digests, which neighbours hold each one. Each index mode of coop is one
// implementation of Resolver.
package resolver

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// Resolver locates the neighbours holding blobs.
type Resolver interface {
	// Locate returns the candidates for each of dgsts. A digest nobody is
	// known to hold is absent from the map. Unreachable neighbours are
	// skipped, not errors; an error means the question itself failed (the
	// context ended, or the input is invalid).
	Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error)
}

// Neighbor is a node this node may fetch from.
type Neighbor struct {
	Name string
	URL  string
}

// ParseNeighbors parses "NAME=URL,NAME=URL". Names must be unique and URLs
// absolute http or https URLs.
func ParseNeighbors(s string) ([]Neighbor, error) {
	var out []Neighbor
	seen := map[string]bool{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, raw, ok := strings.Cut(part, "=")
		if !ok || name == "" || raw == "" {
			return nil, fmt.Errorf("neighbor %q: want NAME=URL: %w", part, errdefs.ErrInvalidArgument)
		}
		if seen[name] {
			return nil, fmt.Errorf("neighbor %q listed twice: %w", name, errdefs.ErrInvalidArgument)
		}
		base, err := peers.ParseBaseURL(raw)
		if err != nil {
			return nil, fmt.Errorf("neighbor %q: %w", name, err)
		}
		seen[name] = true
		out = append(out, Neighbor{Name: name, URL: base})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// ValidateDigests rejects a batch holding an invalid digest.
func ValidateDigests(dgsts []digest.Digest) error {
	for _, d := range dgsts {
		if err := d.Validate(); err != nil {
			return fmt.Errorf("digest %q: %v: %w", d, err, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// LocatePath is where a node (on its mirror) and ClusterKB answer locate
// questions.
const LocatePath = "/coop/v1/locate"

// MaxLocateDigests is the most digests one locate question may carry.
const MaxLocateDigests = 10000

// LocateRequest asks which nodes hold the digests. Node, when set, is the
// asking node: it is never a candidate, and ClusterKB restricts the answer to
// that node's neighbours.
type LocateRequest struct {
	Node    string          `json:"node,omitempty"`
	Digests []digest.Digest `json:"digests"`
}

// LocateResponse holds the candidates for each digest that has any.
type LocateResponse struct {
	Candidates map[digest.Digest][]peers.Candidate `json:"candidates"`
}
