package main

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
)

// Index modes of --index.
const (
	indexOnline   = "online"
	indexPeriodic = "periodic"
	indexPush     = "push"
	indexKB       = "kb"
	indexNone     = "none"
)

// indexSetup is what the node's index needs, parsed and checked.
type indexSetup struct {
	mode        string
	node, url   string
	period      time.Duration
	peerTimeout time.Duration
	neighbors   []resolver.Neighbor
	fromKB      bool
	natsURL     string
	kbURLs      []string
	dropEvents  float64
}

func checkIndexSetup(cfg nodeConfig, neighbors []resolver.Neighbor, peerTimeout time.Duration) (indexSetup, error) {
	s := indexSetup{
		mode: cfg.Index, node: cfg.Name, url: cfg.Advertise, peerTimeout: peerTimeout,
		neighbors: neighbors, fromKB: cfg.NeighborsKB, natsURL: cfg.NATSURL,
		kbURLs: clusterkb.ParseURLs(cfg.KB), dropEvents: cfg.DropEvents,
	}
	var err error
	if s.period, err = time.ParseDuration(cfg.Period); err != nil || s.period <= 0 {
		return s, fmt.Errorf("--period %q: want a positive duration", cfg.Period)
	}
	switch s.mode {
	case indexOnline, indexPeriodic, indexNone:
	case indexPush:
		if s.natsURL == "" {
			return s, fmt.Errorf("--index push needs --nats-url: %w", errUsage)
		}
	case indexKB:
		if len(s.kbURLs) == 0 {
			return s, fmt.Errorf("--index kb needs --kb: %w", errUsage)
		}
	default:
		return s, fmt.Errorf("--index %q: want online, periodic, push, kb or none: %w", s.mode, errUsage)
	}
	if s.fromKB && len(s.kbURLs) == 0 {
		return s, fmt.Errorf("--neighbors-from-kb needs --kb: %w", errUsage)
	}
	if s.fromKB && len(s.neighbors) > 0 {
		return s, fmt.Errorf("give --neighbors or --neighbors-from-kb, not both: %w", errUsage)
	}
	if s.dropEvents < 0 || s.dropEvents > 1 {
		return s, fmt.Errorf("--debug-drop-events %v: want 0 to 1: %w", s.dropEvents, errUsage)
	}
	return s, nil
}

// nodeIndex is the node's resolver and the loops that keep it and the
// node's own announcements going.
type nodeIndex struct {
	resolver resolver.Resolver
	// local is true when resolver answers from memory (periodic, push).
	local   bool
	runners []func(ctx context.Context)
	close   func()
}

// buildIndex sets up the resolver of s.mode, the publisher when a broker is
// set, and the ClusterKB registration when ClusterKB is set.
func buildIndex(ctx context.Context, s indexSetup, inv *content.Inventory, client *peers.Client, load func() peers.Load, reg prometheus.Registerer) (*nodeIndex, error) {
	ni := &nodeIndex{close: func() {}}
	metrics, err := resolver.NewMetrics(reg)
	if err != nil {
		return nil, err
	}
	var source resolver.NeighborSource = resolver.Static(s.neighbors)
	var kbc *clusterkb.Client
	if len(s.kbURLs) > 0 {
		if kbc, err = clusterkb.NewClient(clusterkb.ClientOptions{URLs: s.kbURLs, Node: s.node}); err != nil {
			return nil, fmt.Errorf("--kb: %w", err)
		}
		req := clusterkb.RegisterRequest{Name: s.node, URL: s.url}
		var dyn *resolver.DynamicNeighbors
		if s.fromKB {
			dyn = &resolver.DynamicNeighbors{}
			source = dyn
		} else if len(s.neighbors) > 0 {
			req.Neighbors = []string{}
			for _, n := range s.neighbors {
				req.Neighbors = append(req.Neighbors, n.Name)
			}
		}
		ni.runners = append(ni.runners, func(ctx context.Context) { clusterkb.Heartbeat(ctx, kbc, req, s.period, dyn) })
	}
	var nc *nats.Conn
	if s.natsURL != "" {
		if nc, err = resolver.ConnectBroker(ctx, s.natsURL, s.node); err != nil {
			return nil, fmt.Errorf("--nats-url: %w", err)
		}
		ni.close = nc.Close
		pub, err := resolver.NewPublisher(resolver.PublisherOptions{Node: s.node, URL: s.url, Inventory: inv, Conn: nc, Period: s.period, DropRate: s.dropEvents, Load: load})
		if err != nil {
			nc.Close()
			return nil, err
		}
		ni.runners = append(ni.runners, func(ctx context.Context) { _ = pub.Run(ctx) })
		if reg != nil {
			if err := reg.Register(prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "coop_index_published_bytes_total", Help: "Inventory bytes this node published to the broker.",
			}, func() float64 { return float64(pub.Sent.Load()) })); err != nil {
				nc.Close()
				return nil, err
			}
		}
	}
	switch s.mode {
	case indexOnline:
		ni.resolver, err = resolver.NewOnline(resolver.OnlineOptions{Neighbors: source, Client: client, Timeout: s.peerTimeout})
	case indexPeriodic:
		idx := resolver.NewIndex()
		var p *resolver.Poller
		p, err = resolver.NewPoller(resolver.PollerOptions{Index: idx, Reader: client, Nodes: source, Period: s.period, Metrics: metrics})
		if err == nil {
			ni.runners = append(ni.runners, func(ctx context.Context) { _ = p.Run(ctx) })
			ni.resolver, ni.local = &resolver.Local{Index: idx, Neighbors: source}, true
		}
	case indexPush:
		idx := resolver.NewIndex()
		var sub *resolver.Subscriber
		sub, err = resolver.NewSubscriber(resolver.SubscriberOptions{Index: idx, Conn: nc, Members: resolver.Neighborhood{Source: source}, Reader: client, Period: s.period, Metrics: metrics})
		if err == nil {
			ni.runners = append(ni.runners, func(ctx context.Context) { _ = sub.Run(ctx) })
			ni.resolver, ni.local = &resolver.Local{Index: idx, Neighbors: source}, true
		}
	case indexKB:
		ni.resolver = kbc
	case indexNone:
		ni.resolver = resolver.None{}
	}
	if err != nil {
		ni.close()
		return nil, err
	}
	if len(s.neighbors) == 0 && !s.fromKB && s.mode != indexNone && s.mode != indexKB {
		log.G(ctx).WithField("index", s.mode).Warn("no neighbours: every blob will come from the registry")
	}
	return ni, nil
}
