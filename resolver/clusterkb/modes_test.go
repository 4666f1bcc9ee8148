package clusterkb_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/coopnet/coop/resolver/modes"
	"github.com/coopnet/coop/resolver/resolvertest"
	"github.com/nats-io/nats.go"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// In-process clusters of every mode, on real HTTP and a real (embedded)
// NATS server: hermetic and fast. Every node, destination and holders
// alike, builds its index with modes.New, as coop node does. test/e2e runs
// the same suite on real coop processes.

const period = 250 * time.Millisecond

// node is an in-process coop node: a content store, its inventory, a peer
// server, and its index (resolver, feeds, announcements) from modes.New.
type node struct {
	name  string
	srv   *httptest.Server
	store *content.Store
	index *modes.Index
	stop  context.CancelFunc
	wg    sync.WaitGroup
}

func (h *node) Name() string { return h.name }
func (h *node) URL() string  { return h.srv.URL }

func (h *node) Commit(ctx context.Context, size int64) (digest.Digest, error) {
	b := make([]byte, size)
	_, _ = rand.Read(b)
	desc := ocispec.Descriptor{Digest: digest.FromBytes(b), Size: size}
	return desc.Digest, ctdcontent.WriteBlob(ctx, h.store, "t-"+desc.Digest.Encoded(), bytes.NewReader(b), desc)
}

func (h *node) Delete(ctx context.Context, d digest.Digest) error { return h.store.Delete(ctx, d) }

func (h *node) Kill(context.Context) error {
	h.stop()
	h.srv.CloseClientConnections()
	h.srv.Close()
	h.wg.Wait()
	return h.index.Close()
}

// newNode starts a node whose index o configures; newNode fills in what
// the node itself provides (name, URL, inventory, peer client, load). root
// is its store directory ("": a new temporary one).
func newNode(ctx context.Context, t *testing.T, name, root string, o modes.Options) *node {
	t.Helper()
	inv := content.NewInventory()
	if root == "" {
		root = filepath.Join(t.TempDir(), name)
	}
	store, err := content.NewStore(ctx, root, inv)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := peers.NewServer(peers.ServerOptions{Node: name, Store: store, Inventory: inv})
	if err != nil {
		t.Fatal(err)
	}
	hctx, stop := context.WithCancel(ctx)
	h := &node{name: name, srv: httptest.NewServer(ps), store: store, stop: stop}
	o.Node, o.URL, o.Inventory, o.Client, o.Load = name, h.srv.URL, inv, peerClient(name), ps.Load
	if h.index, err = modes.New(hctx, o); err != nil {
		stop()
		h.srv.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Kill(ctx) })
	h.wg.Go(func() { _ = h.index.Run(hctx) })
	return h
}

type holderOptions struct {
	broker    string  // NATS URL: publish
	kb        string  // ClusterKB URL: register
	dropRate  float64 // fraction of change events dropped
	period    time.Duration
	neighbors []string // registered with the KB; nil: all
	root      string   // store directory (default: a new temporary one)
	ca        *testCA  // with a broker: the cluster CA it and each node's certificate come from
}

// newHolder starts a node that locates nothing (mode none) and announces
// itself as o says.
func newHolder(ctx context.Context, t *testing.T, name string, o holderOptions) *node {
	t.Helper()
	mo := modes.Options{Mode: modes.None, Period: o.period, NATSURL: o.broker, DropEvents: o.dropRate}
	if o.ca != nil {
		mo.NATSOptions = o.ca.natsOptions(t, name)
	}
	if mo.Period == 0 {
		mo.Period = period
	}
	if o.kb != "" {
		mo.KBURLs = []string{o.kb}
	}
	for _, n := range o.neighbors {
		// Only the names are registered; a holder fetches nothing.
		mo.Neighbors = append(mo.Neighbors, resolver.Neighbor{Name: n, URL: "http://" + n + ".invalid"})
	}
	return newNode(ctx, t, name, o.root, mo)
}

func startBroker(t *testing.T) string {
	t.Helper()
	ns, err := clusterkb.StartBroker(clusterkb.BrokerOptions{Listen: "127.0.0.1:0", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	return ns.ClientURL()
}

func peerClient(node string) *peers.Client {
	return &peers.Client{Node: node, HTTP: &http.Client{Timeout: 2 * time.Second}}
}

// cluster is one mode's destination plus its holders.
type cluster struct {
	ctx       context.Context
	mode      string
	res       resolver.Resolver
	idx       *resolver.Index // what the answers come from: the destination's or ClusterKB's
	neighbors *resolver.DynamicNeighbors
	hopts     holderOptions
	bound     time.Duration
	dead      time.Duration
}

func (c *cluster) Holder(ctx context.Context, t *testing.T, name string) resolvertest.Holder {
	h := newHolder(c.ctx, t, name, c.hopts)
	c.neighbors.Set(append(c.neighbors.Neighbors(), resolver.Neighbor{Name: name, URL: h.URL()}))
	return h
}
func (c *cluster) Resolver() resolver.Resolver { return c.res }
func (c *cluster) Bound() time.Duration        { return c.bound }
func (c *cluster) Dead() time.Duration         { return c.dead }

// newCluster starts a destination in mode (kb-pull and kb-push: the kb
// mode, with ClusterKB fed by polling or by the broker). In online,
// periodic and push modes its neighbours are the holders started since.
func newCluster(t *testing.T, mode string) *cluster { return newClusterTLS(t, mode, false) }

// newClusterTLS is newCluster; with tls, the broker speaks mutual TLS and
// enforces each node's permissions, every client connecting with its own
// certificate.
func newClusterTLS(t *testing.T, mode string, tls bool) *cluster {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	c := &cluster{ctx: ctx, mode: mode, neighbors: &resolver.DynamicNeighbors{}}
	startBroker := startBroker
	var natsOptions func(t *testing.T, name string) []nats.Option
	if tls {
		c.hopts.ca = newTestCA(t)
		startBroker, natsOptions = c.hopts.ca.broker, c.hopts.ca.natsOptions
	}
	dest := modes.Options{Mode: mode, Period: period, NeighborSource: c.neighbors}
	switch mode {
	case modes.Online:
		c.bound, c.dead = time.Second, time.Second
	case modes.Periodic:
		c.bound, c.dead = 2*period+time.Second, 2*period+3*time.Second
	case modes.Push:
		c.hopts.broker = startBroker(t)
		dest.NATSURL = c.hopts.broker
		c.bound, c.dead = time.Second+period, 5*period+time.Second
	case "kb-pull", "kb-push":
		opts := clusterkb.Options{Feed: clusterkb.FeedPull, Period: period, Reader: peerClient("kb")}
		if mode == "kb-push" {
			c.hopts.broker = startBroker(t)
			name, nopts := "kb", []nats.Option(nil)
			if tls {
				name, nopts = kbName, natsOptions(t, kbName)
			}
			nc, err := resolver.ConnectBroker(ctx, c.hopts.broker, name, nopts...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(nc.Close)
			opts.Feed, opts.Conn = clusterkb.FeedPush, nc
		}
		kb, err := clusterkb.New(opts)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { _ = kb.Run(ctx) })
		srv := httptest.NewServer(kb)
		t.Cleanup(srv.Close)
		c.hopts.kb, c.idx = srv.URL, kb.Index()
		// The destination registers too, its neighbours every other member.
		dest = modes.Options{Mode: modes.KB, Period: period, KBURLs: []string{srv.URL}, NeighborsFromKB: true, NATSURL: c.hopts.broker}
		c.bound, c.dead = 2*period+time.Second, 5*period+time.Second
	default:
		t.Fatalf("unknown mode %s", mode)
	}
	if tls && dest.NATSURL != "" {
		dest.NATSOptions = natsOptions(t, "dest")
	}
	d := newNode(ctx, t, "dest", "", dest)
	c.res = d.index.Resolver()
	if ix := d.index.LocalIndex(); ix != nil {
		c.idx = ix
	}
	return c
}

func TestConformance(t *testing.T) {
	for _, mode := range []string{modes.Online, modes.Periodic, modes.Push, "kb-pull", "kb-push"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			resolvertest.Run(t, func(t *testing.T) resolvertest.Cluster { return newCluster(t, mode) })
		})
	}
	// The broker's modes again with TLS and per-node permissions on it.
	for _, mode := range []string{modes.Push, "kb-push"} {
		t.Run(mode+"-tls", func(t *testing.T) {
			t.Parallel()
			resolvertest.Run(t, func(t *testing.T) resolvertest.Cluster { return newClusterTLS(t, mode, true) })
		})
	}
}
