package resolver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Membership tells a subscriber which nodes it follows and the URL it trusts
// for each.
type Membership interface {
	// Follow returns the URL to use for node, given the URL it claims, and
	// whether node is followed at all.
	Follow(node, claimedURL string) (url string, ok bool)
	// Followed lists the nodes followed by name now; all is true when every
	// node is followed (a ClusterKB), and the list is then not used.
	Followed() (ns []Neighbor, all bool)
}

// Neighborhood follows a node's neighbours, at their configured URLs.
type Neighborhood struct{ Source NeighborSource }

// Follow follows neighbours only, at the URL configured for them.
func (n Neighborhood) Follow(node, _ string) (string, bool) {
	for _, nb := range n.Source.Neighbors() {
		if nb.Name == node {
			return nb.URL, true
		}
	}
	return "", false
}

// Followed lists the neighbours.
func (n Neighborhood) Followed() ([]Neighbor, bool) { return n.Source.Neighbors(), false }

// SubscriberOptions configure a Subscriber.
type SubscriberOptions struct {
	// Index is fed. Required.
	Index *Index
	// Conn is the broker connection. Required.
	Conn *nats.Conn
	// Members says whom to follow. Required.
	Members Membership
	// Reader reads a node's inventory from the node itself, to repair a
	// gap. Required.
	Reader InventoryReader
	// Period is the publishers' full-inventory period. A node not heard
	// from for 3 periods is dropped. Default 30s.
	Period time.Duration
	// Metrics count updates; nil counts nothing.
	Metrics *Metrics
}

// Subscriber keeps an index up to date from the broker: it listens to the
// followed nodes' subjects, applies changes in order, and repairs at once
// (from the node itself, else from the retained bucket) when it sees a gap or
// a new epoch. A new subscriber starts complete from the retained bucket.
// While the broker is unreachable it keeps what it has and expires nothing;
// when the broker is back it resyncs every node.
type Subscriber struct {
	opts SubscriberOptions
	kv   jetstream.KeyValue

	mu        sync.Mutex
	subs      map[string]*nats.Subscription // by node; "" for all
	repairing map[string]bool
	since     time.Time // connected since; zero while disconnected
	stopped   bool      // Run has returned: no new repairs

	// repairs are the repairs in flight; Run waits for them before it
	// returns. Added to under mu, and never once stopped.
	repairs sync.WaitGroup
}

// NewSubscriber returns a Subscriber; Run starts it.
func NewSubscriber(opts SubscriberOptions) (*Subscriber, error) {
	if opts.Index == nil || opts.Conn == nil || opts.Members == nil || opts.Reader == nil {
		return nil, fmt.Errorf("subscriber needs an index, a broker, members and a reader: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Period == 0 {
		opts.Period = 30 * time.Second
	}
	if opts.Period < 0 {
		return nil, fmt.Errorf("subscriber period %v: %w", opts.Period, errdefs.ErrInvalidArgument)
	}
	return &Subscriber{opts: opts, subs: map[string]*nats.Subscription{}, repairing: map[string]bool{}}, nil
}

// TTL is how long a node may stay silent before it is dropped.
func (s *Subscriber) TTL() time.Duration { return 3 * s.opts.Period }

// Run follows the broker until ctx ends, and returns once the repairs it
// started have ended. It learns of the connection's losses and returns from
// nc.StatusChanged: the connection's handlers belong to whoever made it.
// Run may be called once.
func (s *Subscriber) Run(ctx context.Context) error {
	nc := s.opts.Conn
	status := nc.StatusChanged(nats.CONNECTED, nats.RECONNECTING, nats.DISCONNECTED, nats.CLOSED)
	defer nc.RemoveStatusListener(status)
	if nc.IsConnected() {
		s.connected(true)
	}
	defer s.stop()
	defer s.unsubscribeAll()
	s.reconcile(ctx, true)
	t := time.NewTicker(s.opts.Period / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case st := <-status:
			if st != nats.CONNECTED {
				s.connected(false)
				log.G(ctx).WithField("status", st.String()).Debug("broker unreachable; keeping the index as it is")
				continue
			}
			s.connected(true)
			log.G(ctx).Info("broker connection back; resyncing the index")
			s.resyncAll(ctx)
		case <-t.C:
			s.reconcile(ctx, false)
			s.expire(ctx)
		}
	}
}

// connected records whether the broker is reachable: nodes are expired
// only after a TTL of being connected.
func (s *Subscriber) connected(up bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case !up:
		s.since = time.Time{}
	case s.since.IsZero():
		s.since = time.Now()
	}
}

// reconcile subscribes to followed nodes that are not yet, unsubscribes
// from those no longer followed, and loads the newcomers (all of them when
// full) from the retained bucket.
func (s *Subscriber) reconcile(ctx context.Context, full bool) {
	ns, all := s.opts.Members.Followed()
	var fresh []string
	s.mu.Lock()
	if all {
		if s.subs[""] == nil {
			sub, err := s.opts.Conn.Subscribe(SubjectPrefix+">", func(m *nats.Msg) { s.handle(ctx, m) })
			if err != nil {
				log.G(ctx).WithError(err).Warn("subscribe to all inventories")
			} else {
				s.subs[""] = sub
				full = true
			}
		}
	} else {
		want := names(ns)
		for name, sub := range s.subs {
			if !want[name] {
				_ = sub.Unsubscribe()
				delete(s.subs, name)
				s.opts.Index.Drop(name)
				s.opts.Metrics.dropped("removed", 1)
			}
		}
		for _, n := range ns {
			if s.subs[n.Name] != nil {
				continue
			}
			sub, err := s.opts.Conn.Subscribe(Subject(n.Name), func(m *nats.Msg) { s.handle(ctx, m) })
			if err != nil {
				log.G(ctx).WithError(err).WithField("neighbor", n.Name).Warn("subscribe to neighbor inventory")
				continue
			}
			s.subs[n.Name] = sub
			fresh = append(fresh, n.Name)
		}
	}
	s.mu.Unlock()
	if full {
		fresh = nil
		if all {
			fresh = s.retainedKeys(ctx)
		} else {
			for _, n := range ns {
				fresh = append(fresh, n.Name)
			}
		}
	}
	for _, name := range fresh {
		s.loadRetained(ctx, name)
	}
}

// resyncAll repairs every node in the index from the node itself, and
// loads the followed ones it lacks: events may have been lost while the
// broker was away.
func (s *Subscriber) resyncAll(ctx context.Context) {
	have := map[string]bool{}
	for _, n := range s.opts.Index.Nodes() {
		have[n.Name] = true
		url, ok := s.opts.Members.Follow(n.Name, n.URL)
		if !ok {
			continue
		}
		s.repair(ctx, n.Name, url)
	}
	ns, all := s.opts.Members.Followed()
	if all {
		for _, k := range s.retainedKeys(ctx) {
			s.loadRetained(ctx, k)
		}
		return
	}
	for _, n := range ns {
		if !have[n.Name] {
			s.loadRetained(ctx, n.Name)
		}
	}
}

// retainedKeys lists the nodes with a retained inventory.
func (s *Subscriber) retainedKeys(ctx context.Context) []string {
	kv := s.bucket(ctx)
	if kv == nil {
		return nil
	}
	kctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	keys, err := kv.Keys(kctx)
	if err != nil && !errors.Is(err, jetstream.ErrNoKeysFound) {
		log.G(ctx).WithError(err).Warn("list retained inventories")
	}
	return keys // tokens; loadRetained reads the node name from the value
}

func (s *Subscriber) bucket(ctx context.Context) jetstream.KeyValue {
	if !s.opts.Conn.IsConnected() {
		return nil // the nodes themselves answer instead
	}
	s.mu.Lock()
	kv := s.kv
	s.mu.Unlock()
	if kv != nil {
		return kv
	}
	bctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	kv, err := InventoryBucket(bctx, s.opts.Conn)
	if err != nil {
		log.G(ctx).WithError(err).Debug("retained inventories unavailable")
		return nil
	}
	s.mu.Lock()
	s.kv = kv
	s.mu.Unlock()
	return kv
}

// loadRetained applies the retained full inventory of the node whose key
// (or name) is given, if fresh; otherwise it reads the node itself.
func (s *Subscriber) loadRetained(ctx context.Context, name string) {
	if kv := s.bucket(ctx); kv != nil {
		gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		e, err := kv.Get(gctx, Token(name))
		if err != nil && strings.Contains(name, "=") {
			e, err = kv.Get(gctx, name) // already a key
		}
		cancel()
		if err == nil {
			s.apply(ctx, e.Key(), e.Value(), "full") // the key names the node: a value claiming another is refused
			return
		}
	}
	s.repair(ctx, name, "")
}

// handle applies one message from the broker.
func (s *Subscriber) handle(ctx context.Context, m *nats.Msg) {
	if s.opts.Metrics != nil {
		s.opts.Metrics.ControlBytes.WithLabelValues("event").Add(float64(len(m.Data)))
	}
	s.apply(ctx, strings.TrimPrefix(m.Subject, SubjectPrefix), m.Data, "event")
}

// apply applies one event. token is the subject's node token ("" for a
// retained value, whose key is checked by the bucket).
func (s *Subscriber) apply(ctx context.Context, token string, data []byte, source string) {
	m := s.opts.Metrics
	if len(data) > MaxEventSize {
		m.bad("oversized")
		return
	}
	var ev Event
	if err := json.Unmarshal(data, &ev); err != nil || ev.Node == "" || ev.Epoch == "" || len(ev.Epoch) > 64 {
		m.bad("garbled")
		log.G(ctx).WithField("subject", token).Debug("garbled inventory event ignored")
		return
	}
	if token != "" && Token(ev.Node) != token {
		m.bad("wrong_subject")
		log.G(ctx).WithField("subject", token).WithField("claims", ev.Node).Warn("inventory event for another node's subject ignored")
		return
	}
	url, ok := s.opts.Members.Follow(ev.Node, ev.URL)
	if !ok {
		return
	}
	if ev.Partials && !ev.Full {
		s.opts.Index.SetPartial(ev.Node, ev.Partial)
		return
	}
	if ev.Full {
		source = "full"
		if !ev.Time.IsZero() && time.Since(ev.Time) > s.TTL() {
			return // a dead node's retained inventory
		}
		if ev.External {
			s.repair(ctx, ev.Node, url)
			return
		}
		err := s.opts.Index.Full(ev.Node, url, ev.Epoch, ev.Seq, ev.Blobs, time.Now())
		m.update(source, err)
		s.opts.Index.SetLoad(ev.Node, ev.Load)
		if ev.Partials {
			s.opts.Index.SetPartial(ev.Node, ev.Partial)
		}
		if errors.Is(err, ErrStale) {
			s.opts.Index.Touch(ev.Node, time.Now())
		}
		return
	}
	if ev.Seq == 0 {
		m.bad("garbled")
		return
	}
	err := s.opts.Index.Delta(ev.Node, ev.Epoch, ev.Seq-1, ev.Seq, ev.Added, ev.Removed, time.Now())
	m.update(source, err)
	switch {
	case errors.Is(err, ErrGap):
		s.repair(ctx, ev.Node, url)
	case errors.Is(err, ErrStale):
		s.opts.Index.Touch(ev.Node, time.Now())
	}
}

// repair brings node up to date from the node itself, in the background,
// once at a time per node; a failed repair leaves it to the node's next full
// inventory. Run waits for the repairs before it returns.
func (s *Subscriber) repair(ctx context.Context, node, url string) {
	if url == "" {
		var ok bool
		if url, ok = s.opts.Members.Follow(node, ""); !ok || url == "" {
			return
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.repairing[node] || s.stopped {
		return
	}
	s.repairing[node] = true
	s.repairs.Go(func() {
		defer func() {
			s.mu.Lock()
			delete(s.repairing, node)
			s.mu.Unlock()
		}()
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := Sync(rctx, s.opts.Index, s.opts.Reader, Neighbor{Name: node, URL: url}, s.opts.Metrics, "repair"); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).WithField("node", node).Info("inventory repair failed; the next full update will")
		}
	})
}

// stop refuses new repairs and waits for those in flight.
func (s *Subscriber) stop() {
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
	s.repairs.Wait()
}

// expire drops nodes silent for the TTL, unless the broker itself was
// unreachable for part of that time.
func (s *Subscriber) expire(ctx context.Context) {
	s.mu.Lock()
	since := s.since
	s.mu.Unlock()
	if since.IsZero() || time.Since(since) < s.TTL() {
		return
	}
	gone := s.opts.Index.Expire(time.Now().Add(-s.TTL()))
	s.opts.Metrics.dropped("expired", len(gone))
	if len(gone) > 0 {
		log.G(ctx).WithField("nodes", gone).Info("silent nodes dropped from the index")
	}
}

func (s *Subscriber) unsubscribeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, sub := range s.subs {
		_ = sub.Unsubscribe()
		delete(s.subs, name)
	}
}
