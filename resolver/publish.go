package resolver

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// InventorySource is a node's own inventory (content.Inventory is one).
type InventorySource interface {
	Snapshot() content.Snapshot
	Watch(fn func(content.Change)) (cancel func())
}

// PublisherOptions configure a Publisher.
type PublisherOptions struct {
	// Node and URL name this node and its peer endpoint. Required.
	Node, URL string
	// Inventory is published. Required.
	Inventory InventorySource
	// Conn is the broker connection. Required.
	Conn *nats.Conn
	// Period between full inventories. Default 30s.
	Period time.Duration
	// DropRate drops this fraction of change events, for fault-injection
	// tests. Zero in production.
	DropRate float64
	// Load, if set, is reported with every full inventory.
	Load func() peers.Load
	// Partials, if set, are the blobs the node is downloading: their list
	// goes with every full inventory and in an event of its own whenever
	// it changes (at most every PartialsEvery).
	Partials PartialSource
}

// PartialSource is the list of blobs a node is downloading
// (peers.Partials is one).
type PartialSource interface {
	Blobs() []content.Blob
	Watch(fn func()) (cancel func())
}

// PartialsEvery is the shortest time between two partials events of a
// node: a burst of starts goes out as one list.
const PartialsEvery = 50 * time.Millisecond

// Publisher publishes a node's inventory changes as they happen and its full
// inventory every period, also into the retained bucket.
type Publisher struct {
	opts    PublisherOptions
	pending chan content.Change
	lost    atomic.Bool
	Sent    atomic.Int64 // bytes published
}

// NewPublisher returns a Publisher; Run starts it.
func NewPublisher(opts PublisherOptions) (*Publisher, error) {
	if opts.Node == "" || opts.URL == "" || opts.Inventory == nil || opts.Conn == nil {
		return nil, fmt.Errorf("publisher needs a node, a URL, an inventory and a broker: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Period == 0 {
		opts.Period = 30 * time.Second
	}
	if opts.Period < 0 || opts.DropRate < 0 || opts.DropRate > 1 {
		return nil, fmt.Errorf("publisher period or drop rate out of range: %w", errdefs.ErrInvalidArgument)
	}
	return &Publisher{opts: opts, pending: make(chan content.Change, 4096)}, nil
}

// Run publishes until ctx ends.
func (p *Publisher) Run(ctx context.Context) error {
	stop := p.opts.Inventory.Watch(func(c content.Change) {
		select {
		case p.pending <- c:
		default:
			// Never block the store: receivers repair the gap.
			p.lost.Store(true)
		}
	})
	defer stop()
	partials := make(chan struct{}, 1)
	if p.opts.Partials != nil {
		stop := p.opts.Partials.Watch(func() {
			select {
			case partials <- struct{}{}:
			default:
			}
		})
		defer stop()
	}
	var kv jetstream.KeyValue
	subject := Subject(p.opts.Node)
	full := func() {
		if kv == nil && p.opts.Conn.IsConnected() {
			bctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			var err error
			kv, err = InventoryBucket(bctx, p.opts.Conn)
			cancel()
			if err != nil {
				log.G(ctx).WithError(err).Warn("broker bucket unavailable; full inventory not retained this period")
			}
		}
		if err := p.publishFull(ctx, subject, kv); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("full inventory not published")
			kv = nil // a restarted broker may have lost the bucket: look again
		}
	}
	full()
	t := time.NewTicker(p.opts.Period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			full()
		case <-partials:
			ev := Event{Node: p.opts.Node, URL: p.opts.URL, Time: time.Now(), Partials: true, Partial: p.opts.Partials.Blobs()}
			snap := p.opts.Inventory.Snapshot()
			ev.Epoch, ev.Seq = snap.Epoch, snap.Seq
			if err := p.publish(subject, ev); err != nil {
				log.G(ctx).WithError(err).Debug("partials event not published")
			}
			// Coalesce a burst of starts and ends.
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(PartialsEvery):
			}
		case c := <-p.pending:
			if p.lost.Swap(false) {
				// Changes were dropped on the floor: the full inventory
				// repairs every receiver at once.
				full()
			}
			if p.opts.DropRate > 0 && rand.Float64() < p.opts.DropRate {
				continue
			}
			ev := Event{Node: p.opts.Node, URL: p.opts.URL, Epoch: c.Epoch, Seq: c.Seq, Time: time.Now(), Added: c.Added, Removed: c.Removed}
			if err := p.publish(subject, ev); err != nil {
				log.G(ctx).WithError(err).Debug("inventory event not published")
			}
		}
	}
}

// publishFull publishes the whole inventory on the subject and retains it.
// An inventory too large for one message goes out as External: receivers
// read it from the node.
func (p *Publisher) publishFull(ctx context.Context, subject string, kv jetstream.KeyValue) error {
	snap := p.opts.Inventory.Snapshot()
	ev := Event{Node: p.opts.Node, URL: p.opts.URL, Epoch: snap.Epoch, Seq: snap.Seq, Time: time.Now(), Full: true, Blobs: snap.Blobs}
	if p.opts.Partials != nil {
		ev.Partials, ev.Partial = true, p.opts.Partials.Blobs()
	}
	if p.opts.Load != nil {
		l := p.opts.Load()
		ev.Load = &l
	}
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	if limit := p.opts.Conn.MaxPayload(); limit > 0 && int64(len(b)) > limit-1024 {
		ev.Blobs, ev.External = nil, true
		if b, err = json.Marshal(ev); err != nil {
			return err
		}
	}
	p.Sent.Add(int64(len(b)))
	if err := p.opts.Conn.Publish(subject, b); err != nil {
		return err
	}
	if kv != nil {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if _, err := kv.Put(pctx, Token(p.opts.Node), b); err != nil {
			return fmt.Errorf("retain full inventory: %w", err)
		}
	}
	return nil
}

func (p *Publisher) publish(subject string, ev Event) error {
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	p.Sent.Add(int64(len(b)))
	return p.opts.Conn.Publish(subject, b)
}
