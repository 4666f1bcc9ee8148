package resolver

import (
	"context"
	"sync"
	"time"

	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// Knower is a resolver that can also answer from memory alone: what it knows
// without a network round trip. A claim is decided inside containerd's
// metadata transaction, so it may only ask this.
type Knower interface {
	Known(dgsts []digest.Digest) map[digest.Digest][]peers.Candidate
}

// Known returns what r knows of dgsts without a round trip: nothing unless r
// is a Knower.
func Known(r Resolver, dgsts []digest.Digest) map[digest.Digest][]peers.Candidate {
	if k, ok := r.(Knower); ok {
		return k.Known(dgsts)
	}
	return nil
}

// Known answers from the index: Local never leaves the node anyway.
func (l *Local) Known(dgsts []digest.Digest) map[digest.Digest][]peers.Candidate {
	return l.Index.Locate(dgsts, LocateOptions{Only: names(l.Neighbors.Neighbors())})
}

// Recent is a resolver that asks the network (online, kb) and remembers its
// answers for a while, so that what a recent locate (a migration's, the
// mirror's, coop locate's) found can be claimed.
type Recent struct {
	r   Resolver
	ttl time.Duration
	max int

	mu sync.Mutex
	m  map[digest.Digest]recentAnswer
}

type recentAnswer struct {
	cands []peers.Candidate
	at    time.Time
}

var (
	_ Resolver = (*Recent)(nil)
	_ Knower   = (*Recent)(nil)
)

// Remember returns r remembering the candidates it found for ttl, for at
// most 100,000 digests.
func Remember(r Resolver, ttl time.Duration) *Recent {
	return &Recent{r: r, ttl: ttl, max: 100_000, m: map[digest.Digest]recentAnswer{}}
}

// Locate asks r and remembers what it found.
func (c *Recent) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	got, err := c.r.Locate(ctx, dgsts)
	if err != nil || len(got) == 0 {
		return got, err
	}
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m)+len(got) > c.max {
		for d, a := range c.m {
			if now.Sub(a.at) > c.ttl {
				delete(c.m, d)
			}
		}
	}
	for d, cs := range got {
		if len(c.m) >= c.max {
			break
		}
		c.m[d] = recentAnswer{cands: append([]peers.Candidate(nil), cs...), at: now}
	}
	return got, nil
}

// Known returns the candidates found within the last ttl.
func (c *Recent) Known(dgsts []digest.Digest) map[digest.Digest][]peers.Candidate {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	var out map[digest.Digest][]peers.Candidate
	for _, d := range dgsts {
		a, ok := c.m[d]
		if !ok {
			continue
		}
		if now.Sub(a.at) > c.ttl {
			delete(c.m, d)
			continue
		}
		if out == nil {
			out = map[digest.Digest][]peers.Candidate{}
		}
		out[d] = append([]peers.Candidate(nil), a.cands...)
	}
	return out
}
