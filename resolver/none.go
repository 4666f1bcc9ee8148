package resolver

import (
	"context"

	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// None is the traditional baseline: nobody is ever a candidate, so every blob
// comes from the registry (or the migration's source).
type None struct{}

var _ Resolver = None{}

// Locate returns no candidates.
func (None) Locate(_ context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	if err := ValidateDigests(dgsts); err != nil {
		return nil, err
	}
	return map[digest.Digest][]peers.Candidate{}, nil
}
