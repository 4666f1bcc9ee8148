package peers

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

// ForwardedHeader marks a request made by a coop node to a peer. A peer server
// never forwards anything; a mirror receiving it answers 404 at once, so
// requests cannot loop between nodes.
const ForwardedHeader = "X-Coop-Forwarded"

// Paths of the coop API on the peer server.
const (
	InventoryPath = "/coop/v1/inventory"
	HavePath      = "/coop/v1/have"
	LoadPath      = "/coop/v1/load"
	HealthPath    = "/healthz"
	MetricsPath   = "/metrics"
)

// MaxHaveDigests is the most digests one /coop/v1/have request may carry.
const MaxHaveDigests = 10000

// Candidate is a node that holds a blob and can serve it.
type Candidate struct {
	// Node is the node's name.
	Node string `json:"node"`
	// URL is the node's peer endpoint, such as http://198.18.0.2:5050.
	URL string `json:"url"`
	// Size is the blob's size as the node reports it.
	Size int64 `json:"size"`
	// Load is the node's load when the index knows it.
	Load *Load `json:"load,omitempty"`
	// Partial: the node is still downloading the blob; it serves the
	// chunks it has (PartialPath).
	Partial bool `json:"partial,omitempty"`
}

// InventoryResponse is the body of GET /coop/v1/inventory. With
// ?since=EPOCH:SEQ the node answers only the net changes after SEQ when it
// still has them (Full false: apply Removed, then Added); otherwise, and
// without since, the whole inventory (Full true: Blobs).
type InventoryResponse struct {
	Node  string `json:"node"`
	Epoch string `json:"epoch"`
	Seq   uint64 `json:"seq"`
	// Load is the node's upload load when it answered.
	Load *Load `json:"load,omitempty"`
	// Full tells Blobs holds the whole inventory.
	Full bool `json:"full"`
	// Blobs is the whole inventory, a list (maybe empty) when Full, null
	// otherwise.
	Blobs   []content.Blob  `json:"blobs"`
	Added   []content.Blob  `json:"added,omitempty"`
	Removed []digest.Digest `json:"removed,omitempty"`
	// Partial are the blobs the node is downloading now, in every answer
	// (a swarm: it serves the chunks it has).
	Partial []content.Blob `json:"partial,omitempty"`
}

// SinceQuery is the query parameter of an incremental inventory request.
const SinceQuery = "since"

// FormatSince formats an inventory position for ?since=.
func FormatSince(epoch string, seq uint64) string {
	return epoch + ":" + strconv.FormatUint(seq, 10)
}

// ParseSince parses an inventory position from ?since=.
func ParseSince(s string) (epoch string, seq uint64, err error) {
	e, n, ok := strings.Cut(s, ":")
	if !ok || e == "" || len(e) > 64 {
		return "", 0, fmt.Errorf("since %q: want EPOCH:SEQ: %w", s, errdefs.ErrInvalidArgument)
	}
	seq, err = strconv.ParseUint(n, 10, 64)
	if err != nil {
		return "", 0, fmt.Errorf("since %q: want EPOCH:SEQ: %w", s, errdefs.ErrInvalidArgument)
	}
	return e, seq, nil
}

// NetChanges folds changes, oldest first, into the blobs added and the
// digests removed overall: the last change of each digest wins.
func NetChanges(changes []content.Change) (added []content.Blob, removed []digest.Digest) {
	last := map[digest.Digest]int64{} // size, or -1 for removed
	var order []digest.Digest
	note := func(d digest.Digest, size int64) {
		if _, ok := last[d]; !ok {
			order = append(order, d)
		}
		last[d] = size
	}
	for _, c := range changes {
		for _, d := range c.Removed {
			note(d, -1)
		}
		for _, b := range c.Added {
			note(b.Digest, b.Size)
		}
	}
	for _, d := range order {
		if size := last[d]; size < 0 {
			removed = append(removed, d)
		} else {
			added = append(added, content.Blob{Digest: d, Size: size})
		}
	}
	return added, removed
}

// Load is a node's upload load.
type Load struct {
	ActiveUploads        int     `json:"active_uploads"`
	MaxUploads           int     `json:"max_uploads"` // 0: unbounded
	UploadBytesPerSecond float64 `json:"upload_bytes_per_second"`
}

// LoadResponse is the body of GET /coop/v1/load.
type LoadResponse struct {
	Node string `json:"node"`
	Load
}

// HaveRequest is the body of POST /coop/v1/have.
type HaveRequest struct {
	Digests []digest.Digest `json:"digests"`
}

// HaveResponse is the answer to a HaveRequest: the blobs held among those
// asked, with their sizes, and those being downloaded (Partial: their
// chunks are served as they arrive, see PartialPath).
type HaveResponse struct {
	Node    string         `json:"node"`
	Load    *Load          `json:"load,omitempty"`
	Epoch   string         `json:"epoch"`
	Seq     uint64         `json:"seq"`
	Blobs   []content.Blob `json:"blobs"`
	Partial []content.Blob `json:"partial,omitempty"`
}

// Validate checks an inventory answer's epoch, digests and sizes.
func (ir *InventoryResponse) Validate() error {
	if ir.Epoch == "" || len(ir.Epoch) > 64 {
		return fmt.Errorf("epoch %q: %w", ir.Epoch, errdefs.ErrDataLoss)
	}
	for _, set := range [][]content.Blob{ir.Blobs, ir.Added, ir.Partial} {
		for _, b := range set {
			if err := b.Digest.Validate(); err != nil || b.Size < 0 {
				return fmt.Errorf("blob %q size %d: %w", b.Digest, b.Size, errdefs.ErrDataLoss)
			}
		}
	}
	for _, d := range ir.Removed {
		if err := d.Validate(); err != nil {
			return fmt.Errorf("removed %q: %w", d, errdefs.ErrDataLoss)
		}
	}
	return nil
}
