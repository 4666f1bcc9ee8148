package resolver

import (
	"context"
	"sync"

	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// Sources are the nodes known to hold blobs without any index: the source
// of a migration holds every layer of the container it migrates. It is safe
// for concurrent use.
type Sources struct {
	mu   sync.RWMutex
	next int
	set  map[int]source
}

type source struct {
	c     peers.Candidate
	blobs map[digest.Digest]int64
}

// NewSources returns an empty set.
func NewSources() *Sources { return &Sources{set: map[int]source{}} }

// Add makes c a candidate for blobs (digest → size) until cancel is called.
func (s *Sources) Add(c peers.Candidate, blobs map[digest.Digest]int64) (cancel func()) {
	cp := make(map[digest.Digest]int64, len(blobs))
	for d, n := range blobs {
		cp[d] = n
	}
	s.mu.Lock()
	id := s.next
	s.next++
	s.set[id] = source{c: c, blobs: cp}
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		delete(s.set, id)
		s.mu.Unlock()
	}
}

// locate returns the sources of each digest.
func (s *Sources) locate(dgsts []digest.Digest) map[digest.Digest][]peers.Candidate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if len(s.set) == 0 {
		return nil
	}
	out := map[digest.Digest][]peers.Candidate{}
	for _, d := range dgsts {
		for _, src := range s.set {
			if size, ok := src.blobs[d]; ok {
				c := src.c
				c.Size = size
				out[d] = append(out[d], c)
			}
		}
	}
	return out
}

type withSources struct {
	r Resolver
	s *Sources
}

// WithSources returns r with the sources in s always first among the
// candidates, whatever r knows.
func WithSources(r Resolver, s *Sources) Resolver { return withSources{r: r, s: s} }

func (w withSources) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	if err := ValidateDigests(dgsts); err != nil {
		return nil, err
	}
	got, err := w.r.Locate(ctx, dgsts)
	srcs := w.s.locate(dgsts)
	if err != nil {
		if len(srcs) == 0 {
			return nil, err
		}
		got = nil // the index failed; the sources still stand
	}
	return mergeSources(got, srcs), nil
}

// Known answers from the sources and from what r knows without a round
// trip.
func (w withSources) Known(dgsts []digest.Digest) map[digest.Digest][]peers.Candidate {
	return mergeSources(Known(w.r, dgsts), w.s.locate(dgsts))
}

// mergeSources puts the sources first among got's candidates.
func mergeSources(got, srcs map[digest.Digest][]peers.Candidate) map[digest.Digest][]peers.Candidate {
	if len(srcs) == 0 {
		return got
	}
	out := make(map[digest.Digest][]peers.Candidate, len(got)+len(srcs))
	for d, cs := range got {
		out[d] = cs
	}
	for d, ss := range srcs {
		merged := append([]peers.Candidate(nil), ss...)
		for _, c := range out[d] {
			dup := false
			for _, sc := range ss {
				dup = dup || sc.Node == c.Node
			}
			if !dup {
				merged = append(merged, c)
			}
		}
		out[d] = merged
	}
	return out
}
