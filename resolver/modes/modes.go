// Package modes builds a node's neighbour index in any of its modes: the
// resolver, what keeps it fed, and the node's own announcements (its
// inventory to the broker, its registration with ClusterKB). It is the one
// place where --index and its companion flags become objects; the binary,
// the conformance suite and the benchmarks all build their modes here.
package modes

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
)

// The index modes, as --index names them.
const (
	// Online asks every neighbour per locate.
	Online = "online"
	// Periodic polls every neighbour's inventory each period.
	Periodic = "periodic"
	// Push follows the neighbours' inventory events through the broker.
	Push = "push"
	// KB asks ClusterKB.
	KB = "kb"
	// None locates nothing: every blob comes from the registry.
	None = "none"
)

// Names lists the modes, for flag help and messages.
func Names() []string { return []string{Online, Periodic, Push, KB, None} }

// DefaultPeriod is the period when Options.Period is zero.
const DefaultPeriod = 10 * time.Second

// PeerClient asks neighbours what they hold (online) and reads their
// inventories (periodic, and push repairs). peers.Client is one.
type PeerClient interface {
	resolver.HaveAsker
	resolver.InventoryReader
}

var _ PeerClient = (*peers.Client)(nil)

// Options configure a node's index. Flag names in parentheses.
type Options struct {
	// Mode is one of Names() (--index). Required.
	Mode string
	// Node and URL are this node's name and peer endpoint (--name,
	// --advertise): required when it announces itself, that is when
	// NATSURL or KBURLs is set and NoAnnounce is not.
	Node, URL string
	// Period is the poll period (periodic), the full-inventory period of
	// the publisher and the subscriber (push), and the ClusterKB heartbeat
	// (--period). Default DefaultPeriod.
	Period time.Duration
	// PeerTimeout bounds a neighbour's answer in online mode
	// (--peer-timeout). Default 500ms.
	PeerTimeout time.Duration
	// Neighbors are the nodes this node fetches from (--neighbors).
	Neighbors []resolver.Neighbor
	// NeighborsFromKB takes the neighbours from ClusterKB's members
	// instead (--neighbors-from-kb); needs KBURLs.
	NeighborsFromKB bool
	// NATSURL is the broker (--nats-url): push subscribes there, and the
	// node publishes its inventory there in any mode.
	NATSURL string
	// KBURLs are the ClusterKB replicas (--kb): kb locates through them,
	// and the node registers with them in any mode.
	KBURLs []string
	// DropEvents drops this fraction of the published change events
	// (--debug-drop-events), for fault-injection tests.
	DropEvents float64

	// Inventory is this node's inventory, published when NATSURL is set.
	Inventory resolver.InventorySource
	// Client asks the neighbours (online, periodic, push). Required in
	// those modes.
	Client PeerClient
	// Load, if set, is published with every full inventory.
	Load func() peers.Load
	// Partials, if set, are the blobs this node is downloading (a swarm):
	// published with the inventory (push, kb with a push feed).
	Partials resolver.PartialSource
	// Registerer receives the index metrics; nil registers nothing.
	Registerer prometheus.Registerer

	// What follows the binary never sets.

	// NeighborSource, when set, is the neighbour list instead of Neighbors,
	// and may change while the index runs (tests whose nodes come and go).
	// ClusterKB is not told of it: the node registers without neighbours.
	NeighborSource resolver.NeighborSource
	// NoAnnounce builds the resolver and what feeds it, but the node
	// neither publishes its inventory nor registers with ClusterKB: a
	// destination that serves nothing (benchmarks).
	NoAnnounce bool
	// NATSOptions are extra options of the broker connection (a dialer
	// that counts bytes, say), after coop's.
	NATSOptions []nats.Option
	// TLS, when set, is the client side of mutual TLS with ClusterKB and
	// the broker (trust.Credentials.ClientConfig).
	TLS *tls.Config
}

// Validate checks the options as flags: each error wraps
// errdefs.ErrInvalidArgument and names the flag. It does not look at
// Inventory, Client, Load and Registerer, which New checks.
func (o Options) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalidArgument)...))
	}
	switch o.Mode {
	case Online, Periodic, None:
	case Push:
		if o.NATSURL == "" {
			bad("--index push needs --nats-url")
		}
	case KB:
		if len(o.KBURLs) == 0 {
			bad("--index kb needs --kb")
		}
	default:
		bad("--index %q: want %s", o.Mode, orList(Names()))
	}
	if o.Period < 0 {
		bad("--period %v: want a positive duration", o.Period)
	}
	if o.PeerTimeout < 0 {
		bad("--peer-timeout %v: want a positive duration", o.PeerTimeout)
	}
	for _, u := range o.KBURLs {
		if _, err := peers.ParseBaseURL(u); err != nil {
			errs = append(errs, fmt.Errorf("--kb: %w", err))
		}
	}
	if o.NeighborsFromKB && len(o.KBURLs) == 0 {
		bad("--neighbors-from-kb needs --kb")
	}
	if o.NeighborsFromKB && len(o.Neighbors) > 0 {
		bad("give --neighbors or --neighbors-from-kb, not both")
	}
	if o.NeighborSource != nil && (len(o.Neighbors) > 0 || o.NeighborsFromKB) {
		bad("a neighbour source replaces --neighbors and --neighbors-from-kb")
	}
	if o.NeighborsFromKB && o.NoAnnounce {
		bad("--neighbors-from-kb needs the node to register with ClusterKB")
	}
	if o.DropEvents < 0 || o.DropEvents > 1 {
		bad("--debug-drop-events %v: want 0 to 1", o.DropEvents)
	}
	if o.announces() && (o.Node == "" || o.URL == "") {
		bad("the node announces itself to the broker or ClusterKB: it needs its name and URL (--name, --advertise)")
	}
	return errors.Join(errs...)
}

// announces reports whether the node publishes or registers itself.
func (o Options) announces() bool {
	return !o.NoAnnounce && (o.NATSURL != "" || len(o.KBURLs) > 0)
}

func orList(names []string) string {
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// Index is a node's neighbour index: its resolver, and the loops that feed
// it and announce the node. New builds it, Run runs the loops, Close
// releases the broker connection.
type Index struct {
	mode     string
	resolver resolver.Resolver
	source   resolver.NeighborSource
	kb       *clusterkb.Client // nil without ClusterKB
	local    *resolver.Index   // periodic and push
	loops    []func(ctx context.Context) error
	nc       *nats.Conn // made by New; nil without a broker
	close    sync.Once
}

// New builds the index of o.Mode, the publisher when a broker is set, and
// the ClusterKB registration when ClusterKB is set. It connects to the
// broker (in the background: a broker that is down is picked up when it is
// back) but starts no loop: Run does. Close releases the connection.
func New(ctx context.Context, o Options) (*Index, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if o.Period == 0 {
		o.Period = DefaultPeriod
	}
	switch {
	case (o.Mode == Online || o.Mode == Periodic || o.Mode == Push) && o.Client == nil:
		return nil, fmt.Errorf("index %s needs a peer client: %w", o.Mode, errdefs.ErrInvalidArgument)
	case o.NATSURL != "" && !o.NoAnnounce && o.Inventory == nil:
		return nil, fmt.Errorf("publishing to the broker needs the node's inventory: %w", errdefs.ErrInvalidArgument)
	}
	metrics, err := resolver.NewMetrics(o.Registerer)
	if err != nil {
		return nil, err
	}
	ix := &Index{mode: o.Mode}
	source := o.NeighborSource
	if source == nil {
		source = resolver.Static(o.Neighbors)
	}
	var kbc *clusterkb.Client
	if len(o.KBURLs) > 0 {
		if kbc, err = clusterkb.NewClient(clusterkb.ClientOptions{URLs: o.KBURLs, Node: o.Node, TLS: o.TLS}); err != nil {
			return nil, fmt.Errorf("--kb: %w", err)
		}
		var dyn *resolver.DynamicNeighbors
		if o.NeighborsFromKB {
			dyn = &resolver.DynamicNeighbors{}
			source = dyn
		}
		if !o.NoAnnounce {
			req := clusterkb.RegisterRequest{Name: o.Node, URL: o.URL}
			if len(o.Neighbors) > 0 {
				req.Neighbors = make([]string, 0, len(o.Neighbors))
				for _, n := range o.Neighbors {
					req.Neighbors = append(req.Neighbors, n.Name)
				}
			}
			ix.loops = append(ix.loops, func(ctx context.Context) error {
				clusterkb.Heartbeat(ctx, kbc, req, o.Period, dyn)
				return nil
			})
		}
	}
	if o.NATSURL != "" {
		if ix.nc, err = resolver.ConnectBroker(ctx, o.NATSURL, o.Node, natsOptions(o)...); err != nil {
			return nil, fmt.Errorf("--nats-url: %w", err)
		}
		if err := ix.publisher(o); err != nil {
			_ = ix.Close()
			return nil, err
		}
	}
	switch o.Mode {
	case Online:
		ix.resolver, err = resolver.NewOnline(resolver.OnlineOptions{Neighbors: source, Client: o.Client, Timeout: o.PeerTimeout})
	case Periodic:
		idx := resolver.NewIndex()
		var p *resolver.Poller
		if p, err = resolver.NewPoller(resolver.PollerOptions{Index: idx, Reader: o.Client, Nodes: source, Period: o.Period, Metrics: metrics}); err == nil {
			ix.loops = append(ix.loops, p.Run)
			ix.resolver, ix.local = &resolver.Local{Index: idx, Neighbors: source}, idx
		}
	case Push:
		idx := resolver.NewIndex()
		var sub *resolver.Subscriber
		if sub, err = resolver.NewSubscriber(resolver.SubscriberOptions{Index: idx, Conn: ix.nc, Members: resolver.Neighborhood{Source: source},
			Reader: o.Client, Period: o.Period, Metrics: metrics}); err == nil {
			ix.loops = append(ix.loops, sub.Run)
			ix.resolver, ix.local = &resolver.Local{Index: idx, Neighbors: source}, idx
		}
	case KB:
		ix.resolver = kbc
	case None:
		ix.resolver = resolver.None{}
	}
	if err != nil {
		_ = ix.Close()
		return nil, err
	}
	ix.source, ix.kb = source, kbc
	if o.NeighborSource == nil && len(o.Neighbors) == 0 && !o.NeighborsFromKB && o.Mode != None && o.Mode != KB {
		log.G(ctx).WithField("index", o.Mode).Warn("no neighbours: every blob will come from the registry")
	}
	return ix, nil
}

// publisher adds the loop that publishes the node's inventory, unless the
// node does not announce itself.
func (ix *Index) publisher(o Options) error {
	if o.NoAnnounce {
		return nil
	}
	pub, err := resolver.NewPublisher(resolver.PublisherOptions{Node: o.Node, URL: o.URL, Inventory: o.Inventory, Conn: ix.nc,
		Period: o.Period, DropRate: o.DropEvents, Load: o.Load, Partials: o.Partials})
	if err != nil {
		return err
	}
	if o.Registerer != nil {
		if err := o.Registerer.Register(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "coop_index_published_bytes_total", Help: "Inventory bytes this node published to the broker.",
		}, func() float64 { return float64(pub.Sent.Load()) })); err != nil {
			return fmt.Errorf("index metrics: %w", err)
		}
	}
	ix.loops = append(ix.loops, pub.Run)
	return nil
}

// Mode is the index's mode (Online, Periodic, Push, KB or None).
func (ix *Index) Mode() string { return ix.mode }

// Neighbors are the nodes this node may fetch from now (kb mode without
// --neighbors: every member ClusterKB has).
func (ix *Index) Neighbors() []resolver.Neighbor { return ix.source.Neighbors() }

// KB is the ClusterKB client; nil without ClusterKB.
func (ix *Index) KB() *clusterkb.Client { return ix.kb }

// Broker says whether the index uses a broker and whether it is connected
// to it now.
func (ix *Index) Broker() (used, connected bool) {
	if ix.nc == nil {
		return false, false
	}
	return true, ix.nc.IsConnected()
}

// Resolver is the node's resolver.
func (ix *Index) Resolver() resolver.Resolver { return ix.resolver }

// Local reports whether Resolver answers from memory, without a round trip
// (periodic, push).
func (ix *Index) Local() bool { return ix.local != nil }

// LocalIndex is the in-memory index Resolver answers from in periodic and
// push modes; nil in the others.
func (ix *Index) LocalIndex() *resolver.Index { return ix.local }

// Run runs every loop of the index (poller, subscriber, publisher,
// ClusterKB heartbeat) until ctx ends, and returns once they all have. Run
// may be called once.
func (ix *Index) Run(ctx context.Context) error {
	errs := make([]error, len(ix.loops))
	var wg sync.WaitGroup
	for i, loop := range ix.loops {
		wg.Go(func() { errs[i] = loop(ctx) })
	}
	<-ctx.Done()
	wg.Wait()
	return errors.Join(errs...)
}

// Close closes the broker connection New made. Call it once Run has
// returned; it is safe to call twice.
func (ix *Index) Close() error {
	ix.close.Do(func() {
		if ix.nc != nil {
			ix.nc.Close()
		}
	})
	return nil
}

// natsOptions are the broker connection's options: TLS when set, then the
// caller's.
func natsOptions(o Options) []nats.Option {
	var opts []nats.Option
	if o.TLS != nil {
		opts = append(opts, nats.Secure(o.TLS))
	}
	return append(opts, o.NATSOptions...)
}
