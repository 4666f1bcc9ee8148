package resolver

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// InventoryReader reads a node's inventory (peers.Client does).
type InventoryReader interface {
	Inventory(ctx context.Context, baseURL, epoch string, seq uint64) (*peers.InventoryResponse, error)
}

// Metrics count how an index is fed. One value serves every feeder of one
// index; register it once.
type Metrics struct {
	// Updates counts inventory updates applied or refused, by source
	// (poll, event, full, repair) and result (ok, gap, stale, error).
	Updates *prometheus.CounterVec
	// BadInput counts malformed or forged input, by reason.
	BadInput *prometheus.CounterVec
	// Dropped counts nodes dropped from the index, by reason.
	Dropped *prometheus.CounterVec
	// ControlBytes counts index traffic received, by source.
	ControlBytes *prometheus.CounterVec
}

// NewMetrics returns index metrics, registered on reg when it is not nil.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		Updates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_index_updates_total",
			Help: "Inventory updates, by source (poll, event, full, repair) and result (ok, gap, stale, error).",
		}, []string{"source", "result"}),
		BadInput: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_index_bad_input_total",
			Help: "Malformed, oversized or forged index input ignored, by reason.",
		}, []string{"reason"}),
		Dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_index_dropped_nodes_total",
			Help: "Nodes dropped from the index, by reason (unreachable, expired, removed).",
		}, []string{"reason"}),
		ControlBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_index_control_bytes_total",
			Help: "Index control bytes received, by source (poll, event, full, locate).",
		}, []string{"source"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.Updates, m.BadInput, m.Dropped, m.ControlBytes} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("index metrics: %w", err)
			}
		}
	}
	return m, nil
}

func (m *Metrics) update(source string, err error) {
	if m == nil {
		return
	}
	result := "ok"
	switch {
	case err == nil:
	case errors.Is(err, ErrGap):
		result = "gap"
	case errors.Is(err, ErrStale):
		result = "stale"
	default:
		result = "error"
	}
	m.Updates.WithLabelValues(source, result).Inc()
}

func (m *Metrics) bad(reason string) {
	if m != nil {
		m.BadInput.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) dropped(reason string, n int) {
	if m != nil && n > 0 {
		m.Dropped.WithLabelValues(reason).Add(float64(n))
	}
}

// Sync brings idx up to date for node n from the node itself: only the
// changes when idx holds a position the node still remembers, the whole
// inventory otherwise. A node answering under another name is refused.
func Sync(ctx context.Context, idx *Index, r InventoryReader, n Neighbor, m *Metrics, source string) error {
	epoch, seq, _ := idx.Position(n.Name)
	for range 2 {
		ir, err := r.Inventory(ctx, n.URL, epoch, seq)
		if err != nil {
			m.update(source, err)
			return err
		}
		if ir.Node != n.Name {
			m.bad("wrong_node")
			return fmt.Errorf("neighbor %s at %s says it is %q: %w", n.Name, n.URL, ir.Node, errdefs.ErrInvalidArgument)
		}
		now := time.Now()
		if ir.Full {
			err = idx.Full(n.Name, n.URL, ir.Epoch, ir.Seq, ir.Blobs, now)
		} else {
			err = idx.Delta(n.Name, ir.Epoch, seq, ir.Seq, ir.Added, ir.Removed, now)
		}
		m.update(source, err)
		if err == nil || errors.Is(err, ErrStale) {
			idx.SetLoad(n.Name, ir.Load)
			idx.SetPartial(n.Name, ir.Partial)
		}
		if errors.Is(err, ErrGap) {
			// The index moved meanwhile: ask for everything.
			epoch, seq = "", 0
			continue
		}
		if errors.Is(err, ErrStale) {
			idx.Touch(n.Name, now)
			return nil
		}
		return err
	}
	return fmt.Errorf("neighbor %s: inventory keeps changing under the sync: %w", n.Name, errdefs.ErrUnavailable)
}

// PollerOptions configure a Poller.
type PollerOptions struct {
	// Index is fed. Required.
	Index *Index
	// Reader reads inventories. Required.
	Reader InventoryReader
	// Nodes are polled; nodes that leave the list are dropped. Required.
	Nodes NeighborSource
	// Period between polls of a node. Default 10s.
	Period time.Duration
	// Timeout bounds one poll. Default 2s.
	Timeout time.Duration
	// Concurrency bounds the polls in flight. Default 64.
	Concurrency int
	// Metrics count updates; nil counts nothing.
	Metrics *Metrics
}

// Poller keeps an index up to date by polling every node each period,
// incrementally. A node that does not answer is dropped from the index at
// once (a pull from it would fail anyway) and read whole when it answers
// again.
type Poller struct {
	opts PollerOptions
}

// NewPoller returns a Poller; Run starts it.
func NewPoller(opts PollerOptions) (*Poller, error) {
	if opts.Index == nil || opts.Reader == nil || opts.Nodes == nil {
		return nil, fmt.Errorf("poller needs an index, a reader and nodes: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Period == 0 {
		opts.Period = 10 * time.Second
	}
	if opts.Timeout == 0 {
		opts.Timeout = 2 * time.Second
	}
	if opts.Concurrency == 0 {
		opts.Concurrency = 64
	}
	if opts.Period < 0 || opts.Timeout < 0 || opts.Concurrency < 0 {
		return nil, fmt.Errorf("poller period, timeout and concurrency must be positive: %w", errdefs.ErrInvalidArgument)
	}
	return &Poller{opts: opts}, nil
}

// Run polls until ctx ends: once at once, then every period, each node at
// its own phase so polls spread over the period.
func (p *Poller) Run(ctx context.Context) error {
	t := time.NewTicker(p.opts.Period)
	defer t.Stop()
	for {
		p.PollAll(ctx, true)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// PollAll polls every node once and waits for the answers. With spread,
// each node's poll starts at its own fixed point within the first half of
// the period.
func (p *Poller) PollAll(ctx context.Context, spread bool) {
	ns := p.opts.Nodes.Neighbors()
	keep := names(ns)
	for _, st := range p.opts.Index.Nodes() {
		if !keep[st.Name] {
			p.opts.Index.Drop(st.Name)
			p.opts.Metrics.dropped("removed", 1)
		}
	}
	sem := make(chan struct{}, p.opts.Concurrency)
	var wg sync.WaitGroup
	for _, n := range ns {
		wg.Go(func() {
			if spread && len(ns) > 1 {
				// A fixed phase per node: polls spread over the first
				// half of the period, and each node is polled once per
				// period.
				select {
				case <-ctx.Done():
					return
				case <-time.After(phase(n.Name, p.opts.Period/2)):
				}
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			p.poll(ctx, n)
		})
	}
	wg.Wait()
}

// phase maps name to a fixed duration in [0, span).
func phase(name string, span time.Duration) time.Duration {
	if span <= 0 {
		return 0
	}
	h := fnv.New64a()
	_, _ = h.Write([]byte(name))
	return time.Duration(h.Sum64() % uint64(span))
}

func (p *Poller) poll(ctx context.Context, n Neighbor) {
	pctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	if err := Sync(pctx, p.opts.Index, p.opts.Reader, n, p.opts.Metrics, "poll"); err != nil {
		if ctx.Err() != nil {
			return
		}
		if _, _, held := p.opts.Index.Position(n.Name); held {
			p.opts.Index.Drop(n.Name)
			p.opts.Metrics.dropped("unreachable", 1)
			log.G(ctx).WithError(err).WithField("neighbor", n.Name).Info("neighbor unreachable; dropped from the index")
		}
	}
}

// Local answers Locate from an index the node keeps itself (periodic and
// push modes): no network round trip.
type Local struct {
	// Index is read.
	Index *Index
	// Neighbors restricts the answers to the current neighbours.
	Neighbors NeighborSource
}

var _ Resolver = (*Local)(nil)

// Locate answers from the index.
func (l *Local) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	if err := ValidateDigests(dgsts); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return l.Index.Locate(dgsts, LocateOptions{Only: names(l.Neighbors.Neighbors())}), nil
}
