package resolver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// HaveAsker asks one peer which blobs it holds (peers.Client does).
type HaveAsker interface {
	Have(ctx context.Context, baseURL string, dgsts []digest.Digest) (*peers.HaveResponse, error)
}

// OnlineOptions configure an Online resolver.
type OnlineOptions struct {
	// Neighbors are asked on every Locate. Required.
	Neighbors NeighborSource
	// Client asks them.
	Client HaveAsker
	// Timeout bounds each question; a neighbour that has not answered by then
	// is skipped. Default 500ms.
	Timeout time.Duration
}

// Online is the destination's on-line query: one batched have question to
// every neighbour, concurrently, per Locate.
type Online struct {
	neighbors NeighborSource
	client    HaveAsker
	timeout   time.Duration
}

var _ Resolver = (*Online)(nil)

// NewOnline returns an Online resolver.
func NewOnline(opts OnlineOptions) (*Online, error) {
	o := &Online{neighbors: opts.Neighbors, client: opts.Client, timeout: 500 * time.Millisecond}
	if opts.Timeout != 0 {
		o.timeout = opts.Timeout
	}
	if o.client == nil || o.neighbors == nil {
		return nil, fmt.Errorf("online resolver needs neighbours and a client: %w", errdefs.ErrInvalidArgument)
	}
	if o.timeout < 0 {
		return nil, fmt.Errorf("online resolver timeout %v: %w", o.timeout, errdefs.ErrInvalidArgument)
	}
	return o, nil
}

// Locate asks every neighbour at once and merges what they hold, in the order
// of the neighbour list.
func (o *Online) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	if err := ValidateDigests(dgsts); err != nil {
		return nil, err
	}
	out := map[digest.Digest][]peers.Candidate{}
	neighbors := o.neighbors.Neighbors()
	if len(dgsts) == 0 || len(neighbors) == 0 {
		return out, nil
	}
	asked := map[digest.Digest]bool{}
	for _, d := range dgsts {
		asked[d] = true
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	answers := make([]*peers.HaveResponse, len(neighbors))
	var wg sync.WaitGroup
	for i, n := range neighbors {
		wg.Go(func() {
			hr, err := o.client.Have(ctx, n.URL, dgsts)
			if err != nil {
				if !errors.Is(err, context.Canceled) {
					log.G(ctx).WithError(err).WithField("neighbor", n.Name).Debug("neighbor skipped")
				}
				return
			}
			answers[i] = hr
		})
	}
	wg.Wait()
	for i, hr := range answers {
		if hr == nil {
			continue
		}
		n := neighbors[i]
		for _, b := range hr.Blobs {
			// A neighbour answering for a digest not asked, or with a
			// nonsense size, is ignored.
			if !asked[b.Digest] || b.Size < 0 {
				continue
			}
			out[b.Digest] = append(out[b.Digest], peers.Candidate{Node: n.Name, URL: n.URL, Size: b.Size, Load: hr.Load})
		}
		for _, b := range hr.Partial {
			if !asked[b.Digest] || b.Size <= 0 {
				continue
			}
			out[b.Digest] = append(out[b.Digest], peers.Candidate{Node: n.Name, URL: n.URL, Size: b.Size, Load: hr.Load, Partial: true})
		}
	}
	if err := parent.Err(); err != nil {
		return nil, err
	}
	return out, nil
}
