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
	"github.com/coopnet/coop/resolver/resolvertest"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// In-process clusters of every mode, on real HTTP and a real (embedded)
// NATS server: hermetic and fast. test/e2e runs the same suite on real
// coop processes.

const period = 250 * time.Millisecond

// holder is an in-process node: a content store, its inventory, a peer
// server, and, when a broker is set, a publisher and a KB registration.
type holder struct {
	name  string
	srv   *httptest.Server
	store *content.Store
	stop  context.CancelFunc
	wg    sync.WaitGroup
}

func (h *holder) Name() string { return h.name }
func (h *holder) URL() string  { return h.srv.URL }

func (h *holder) Commit(ctx context.Context, size int64) (digest.Digest, error) {
	b := make([]byte, size)
	_, _ = rand.Read(b)
	desc := ocispec.Descriptor{Digest: digest.FromBytes(b), Size: size}
	return desc.Digest, ctdcontent.WriteBlob(ctx, h.store, "t-"+desc.Digest.Encoded(), bytes.NewReader(b), desc)
}

func (h *holder) Delete(ctx context.Context, d digest.Digest) error { return h.store.Delete(ctx, d) }

func (h *holder) Kill(context.Context) error {
	h.stop()
	h.srv.CloseClientConnections()
	h.srv.Close()
	h.wg.Wait()
	return nil
}

type holderOptions struct {
	broker    string  // NATS URL: publish
	kb        string  // ClusterKB URL: register
	dropRate  float64 // fraction of change events dropped
	period    time.Duration
	neighbors []string // registered with the KB; nil: all
	root      string   // store directory (default: a new temporary one)
}

func newHolder(ctx context.Context, t *testing.T, name string, o holderOptions) *holder {
	t.Helper()
	inv := content.NewInventory()
	root := o.root
	if root == "" {
		root = filepath.Join(t.TempDir(), name)
	}
	if o.period == 0 {
		o.period = period
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
	h := &holder{name: name, srv: httptest.NewServer(ps), store: store, stop: stop}
	t.Cleanup(func() { _ = h.Kill(ctx) })
	if o.broker != "" {
		nc, err := resolver.ConnectBroker(hctx, o.broker, name)
		if err != nil {
			t.Fatal(err)
		}
		pub, err := resolver.NewPublisher(resolver.PublisherOptions{Node: name, URL: h.srv.URL, Inventory: inv, Conn: nc, Period: o.period, DropRate: o.dropRate})
		if err != nil {
			t.Fatal(err)
		}
		h.wg.Go(func() { _ = pub.Run(hctx); nc.Close() })
	}
	if o.kb != "" {
		c, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: []string{o.kb}, Node: name})
		if err != nil {
			t.Fatal(err)
		}
		h.wg.Go(func() {
			clusterkb.Heartbeat(hctx, c, clusterkb.RegisterRequest{Name: name, URL: h.srv.URL, Neighbors: o.neighbors}, o.period, nil)
		})
	}
	return h
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

func peerClient() *peers.Client {
	return &peers.Client{Node: "dest", HTTP: &http.Client{Timeout: 2 * time.Second}}
}

// cluster is one mode's destination plus its holders.
type cluster struct {
	ctx       context.Context
	mode      string
	res       resolver.Resolver
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

func newCluster(t *testing.T, mode string) *cluster {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	c := &cluster{ctx: ctx, mode: mode, neighbors: &resolver.DynamicNeighbors{}}
	switch mode {
	case "online":
		res, err := resolver.NewOnline(resolver.OnlineOptions{Neighbors: c.neighbors, Client: peerClient()})
		if err != nil {
			t.Fatal(err)
		}
		c.res, c.bound, c.dead = res, time.Second, time.Second
	case "periodic":
		idx := resolver.NewIndex()
		p, err := resolver.NewPoller(resolver.PollerOptions{Index: idx, Reader: peerClient(), Nodes: c.neighbors, Period: period})
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { _ = p.Run(ctx) })
		c.res = &resolver.Local{Index: idx, Neighbors: c.neighbors}
		c.bound, c.dead = 2*period+time.Second, 2*period+3*time.Second
	case "push":
		c.hopts.broker = startBroker(t)
		nc, err := resolver.ConnectBroker(ctx, c.hopts.broker, "dest")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		idx := resolver.NewIndex()
		sub, err := resolver.NewSubscriber(resolver.SubscriberOptions{Index: idx, Conn: nc, Members: resolver.Neighborhood{Source: c.neighbors}, Reader: peerClient(), Period: period})
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { _ = sub.Run(ctx) })
		c.res = &resolver.Local{Index: idx, Neighbors: c.neighbors}
		c.bound, c.dead = time.Second+period, 5*period+time.Second
	case "kb-pull", "kb-push":
		opts := clusterkb.Options{Feed: clusterkb.FeedPull, Period: period, Reader: peerClient()}
		if mode == "kb-push" {
			c.hopts.broker = startBroker(t)
			nc, err := resolver.ConnectBroker(ctx, c.hopts.broker, "kb")
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
		c.hopts.kb = srv.URL
		client, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: []string{srv.URL}, Node: "dest"})
		if err != nil {
			t.Fatal(err)
		}
		c.res = client
		c.bound, c.dead = 2*period+time.Second, 5*period+time.Second
	default:
		t.Fatalf("unknown mode %s", mode)
	}
	return c
}

func TestConformance(t *testing.T) {
	for _, mode := range []string{"online", "periodic", "push", "kb-pull", "kb-push"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			resolvertest.Run(t, func(t *testing.T) resolvertest.Cluster { return newCluster(t, mode) })
		})
	}
}
