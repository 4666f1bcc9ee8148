package modes

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/nats-io/nats.go"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

func TestValidate(t *testing.T) {
	nb := []resolver.Neighbor{{Name: "b", URL: "http://b"}}
	for _, tc := range []struct {
		name string
		o    Options
		flag string // named by the error; "" for none
	}{
		{"online", Options{Mode: Online}, ""},
		{"periodic", Options{Mode: Periodic, Period: time.Second, Neighbors: nb}, ""},
		{"push", Options{Mode: Push, NATSURL: "nats://x:4222", Node: "a", URL: "http://a"}, ""},
		{"kb", Options{Mode: KB, KBURLs: []string{"http://kb"}, Node: "a", URL: "http://a"}, ""},
		{"kb without announcing", Options{Mode: KB, KBURLs: []string{"http://kb"}, NoAnnounce: true}, ""},
		{"none", Options{Mode: None}, ""},
		{"unknown mode", Options{Mode: "gossip"}, "--index"},
		{"no mode", Options{}, "--index"},
		{"push without a broker", Options{Mode: Push}, "--nats-url"},
		{"kb without ClusterKB", Options{Mode: KB}, "--kb"},
		{"bad ClusterKB URL", Options{Mode: None, KBURLs: []string{"ftp://kb"}, Node: "a", URL: "http://a"}, "--kb"},
		{"negative period", Options{Mode: Online, Period: -time.Second}, "--period"},
		{"negative peer timeout", Options{Mode: Online, PeerTimeout: -time.Second}, "--peer-timeout"},
		{"neighbours from ClusterKB without ClusterKB", Options{Mode: Online, NeighborsFromKB: true}, "--neighbors-from-kb"},
		{"neighbours twice", Options{Mode: Online, NeighborsFromKB: true, Neighbors: nb, KBURLs: []string{"http://kb"}, Node: "a", URL: "http://a"}, "--neighbors"},
		{"neighbours from ClusterKB without registering", Options{Mode: Online, NeighborsFromKB: true, KBURLs: []string{"http://kb"}, NoAnnounce: true}, "--neighbors-from-kb"},
		{"neighbour source and neighbours", Options{Mode: Online, Neighbors: nb, NeighborSource: resolver.Static(nb)}, "--neighbors"},
		{"drop rate above 1", Options{Mode: None, DropEvents: 1.5}, "--debug-drop-events"},
		{"drop rate below 0", Options{Mode: None, DropEvents: -0.1}, "--debug-drop-events"},
		{"announcing without a URL", Options{Mode: None, NATSURL: "nats://x:4222", Node: "a"}, "--advertise"},
		{"announcing without a name", Options{Mode: None, KBURLs: []string{"http://kb"}, URL: "http://a"}, "--name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.o.Validate()
			if tc.flag == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err %v, want invalid argument", err)
			}
			if !strings.Contains(err.Error(), tc.flag) {
				t.Fatalf("err %q does not name %s", err, tc.flag)
			}
			if _, err := New(t.Context(), tc.o); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("New: err %v, want invalid argument", err)
			}
		})
	}
}

// fakePeers answers every question with nothing, recording the deadline
// each have question got.
type fakePeers struct{ budget atomic.Int64 }

func (f *fakePeers) Have(ctx context.Context, _ string, _ []digest.Digest) (*peers.HaveResponse, error) {
	if d, ok := ctx.Deadline(); ok {
		f.budget.Store(int64(time.Until(d)))
	}
	return &peers.HaveResponse{}, nil
}

func (f *fakePeers) Inventory(context.Context, string, string, uint64) (*peers.InventoryResponse, error) {
	return nil, fmt.Errorf("no inventory: %w", errdefs.ErrUnavailable)
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

// fakeKB records registrations.
type fakeKB struct {
	*httptest.Server
	registered chan clusterkb.RegisterRequest
}

func newFakeKB(t *testing.T) *fakeKB {
	k := &fakeKB{registered: make(chan clusterkb.RegisterRequest, 64)}
	k.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == clusterkb.NodesPath && r.Method == http.MethodPost {
			var req clusterkb.RegisterRequest
			if err := json.NewDecoder(r.Body).Decode(&req); err == nil {
				select {
				case k.registered <- req:
				default:
				}
			}
		}
		_, _ = w.Write([]byte("{}"))
	}))
	t.Cleanup(k.Close)
	return k
}

func TestNewModes(t *testing.T) {
	broker := startBroker(t)
	kb := newFakeKB(t)
	nb := []resolver.Neighbor{{Name: "b", URL: "http://b"}}
	node := func(o Options) Options {
		o.Node, o.URL, o.Client, o.Inventory, o.Neighbors = "a", "http://a", &fakePeers{}, content.NewInventory(), nb
		return o
	}
	for _, tc := range []struct {
		name     string
		o        Options
		resolver string
		local    bool
		loops    int
		broker   bool
	}{
		{"online", node(Options{Mode: Online}), "*resolver.Online", false, 0, false},
		{"periodic", node(Options{Mode: Periodic}), "*resolver.Local", true, 1, false},
		{"push", node(Options{Mode: Push, NATSURL: broker}), "*resolver.Local", true, 2, true},
		{"push, not announcing", node(Options{Mode: Push, NATSURL: broker, NoAnnounce: true}), "*resolver.Local", true, 1, true},
		{"kb", node(Options{Mode: KB, KBURLs: []string{kb.URL}}), "*clusterkb.Client", false, 1, false},
		{"kb, not announcing", node(Options{Mode: KB, KBURLs: []string{kb.URL}, NoAnnounce: true}), "*clusterkb.Client", false, 0, false},
		{"none", node(Options{Mode: None}), "resolver.None", false, 0, false},
		{"none, publishing and registering", node(Options{Mode: None, NATSURL: broker, KBURLs: []string{kb.URL}}), "resolver.None", false, 2, true},
		{"online, publishing and registering", node(Options{Mode: Online, NATSURL: broker, KBURLs: []string{kb.URL}}), "*resolver.Online", false, 2, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ix, err := New(t.Context(), tc.o)
			if err != nil {
				t.Fatal(err)
			}
			defer ix.Close()
			if got := fmt.Sprintf("%T", ix.Resolver()); got != tc.resolver {
				t.Errorf("resolver %s, want %s", got, tc.resolver)
			}
			if ix.Local() != tc.local || (ix.LocalIndex() != nil) != tc.local {
				t.Errorf("local %v (index %v), want %v", ix.Local(), ix.LocalIndex() != nil, tc.local)
			}
			if len(ix.loops) != tc.loops {
				t.Errorf("%d loops, want %d", len(ix.loops), tc.loops)
			}
			if (ix.nc != nil) != tc.broker {
				t.Errorf("broker connection %v, want %v", ix.nc != nil, tc.broker)
			}
			ctx, cancel := context.WithCancel(t.Context())
			cancel()
			if err := ix.Run(ctx); err != nil {
				t.Fatal(err)
			}
			if err := ix.Close(); err != nil {
				t.Fatal(err)
			}
			if ix.nc != nil && !ix.nc.IsClosed() {
				t.Error("Close left the broker connection open")
			}
			if err := ix.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
		})
	}
}

func TestNewNeedsWhatTheModeUses(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
	}{
		{"online without a client", Options{Mode: Online}},
		{"periodic without a client", Options{Mode: Periodic}},
		{"push without a client", Options{Mode: Push, NATSURL: "nats://127.0.0.1:1", NoAnnounce: true}},
		{"publishing without an inventory", Options{Mode: None, NATSURL: "nats://127.0.0.1:1", Node: "a", URL: "http://a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(t.Context(), tc.o); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err %v, want invalid argument", err)
			}
		})
	}
}

// countingDialer counts the broker connections dialled through it.
type countingDialer struct{ dials atomic.Int32 }

func (c *countingDialer) Dial(network, address string) (net.Conn, error) {
	c.dials.Add(1)
	return (&net.Dialer{Timeout: 2 * time.Second}).Dial(network, address)
}

// TestOptionsReachTheNode: what the node announces, how often, and through
// what, come from the options.
func TestOptionsReachTheNode(t *testing.T) {
	broker := startBroker(t)
	kb := newFakeKB(t)
	inv := content.NewInventory()
	d := digest.FromString("blob")
	inv.Add(d, 42)
	dialer := &countingDialer{}
	reg := prometheus.NewRegistry()
	ix, err := New(t.Context(), Options{
		Mode: None, Node: "a", URL: "http://a:5050", Period: 20 * time.Millisecond,
		Neighbors: []resolver.Neighbor{{Name: "b", URL: "http://b"}, {Name: "c", URL: "http://c"}},
		NATSURL:   broker, KBURLs: []string{kb.URL}, Inventory: inv,
		Load:        func() peers.Load { return peers.Load{ActiveUploads: 7} },
		Registerer:  reg,
		NATSOptions: []nats.Option{nats.SetCustomDialer(dialer)},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ix.Close()
	if dialer.dials.Load() == 0 {
		t.Error("the broker connection did not use the dialer given")
	}
	watch, err := nats.Connect(broker)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close()
	events, err := watch.SubscribeSync(resolver.Subject("a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := watch.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error)
	go func() { done <- ix.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	// Published: the inventory, the load, the URL.
	m, err := events.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var ev resolver.Event
	if err := json.Unmarshal(m.Data, &ev); err != nil {
		t.Fatal(err)
	}
	if !ev.Full || ev.URL != "http://a:5050" || len(ev.Blobs) != 1 || ev.Blobs[0].Digest != d || ev.Load == nil || ev.Load.ActiveUploads != 7 {
		t.Fatalf("published %+v", ev)
	}
	// Registered with the neighbours' names, every period: three
	// registrations come long before a default period would allow two.
	for range 3 {
		select {
		case req := <-kb.registered:
			if req.Name != "a" || req.URL != "http://a:5050" || strings.Join(req.Neighbors, ",") != "b,c" {
				t.Fatalf("registered %+v", req)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("registrations do not follow the period")
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	registered := false
	for _, mf := range mfs {
		registered = registered || mf.GetName() == "coop_index_published_bytes_total"
	}
	if !registered {
		t.Error("the published-bytes metric did not reach the registerer")
	}
}

// TestPeerTimeoutReachesOnline: the online resolver gives each neighbour
// PeerTimeout.
func TestPeerTimeoutReachesOnline(t *testing.T) {
	for _, timeout := range []time.Duration{0, 30 * time.Millisecond, 5 * time.Second} {
		t.Run(timeout.String(), func(t *testing.T) {
			client := &fakePeers{}
			ix, err := New(t.Context(), Options{Mode: Online, PeerTimeout: timeout, Client: client, Neighbors: []resolver.Neighbor{{Name: "b", URL: "http://b"}}})
			if err != nil {
				t.Fatal(err)
			}
			defer ix.Close()
			if _, err := ix.Resolver().Locate(t.Context(), []digest.Digest{digest.FromString("x")}); err != nil {
				t.Fatal(err)
			}
			want := timeout
			if want == 0 {
				want = 500 * time.Millisecond
			}
			if got := time.Duration(client.budget.Load()); got > want || got < want/2 {
				t.Fatalf("a neighbour got %v to answer, want %v", got, want)
			}
		})
	}
}

// TestRunWaitsForItsLoops: Run returns only when ctx ends, and after every
// loop has, however long they take to stop.
func TestRunWaitsForItsLoops(t *testing.T) {
	for _, n := range []int{0, 1, 3} {
		t.Run(fmt.Sprint(n, " loops"), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var running atomic.Int32
				loop := func(ctx context.Context) error {
					running.Add(1)
					defer running.Add(-1)
					<-ctx.Done()
					time.Sleep(time.Second) // slow to stop
					return nil
				}
				ix := &Index{resolver: resolver.None{}}
				for range n {
					ix.loops = append(ix.loops, loop)
				}
				ctx, cancel := context.WithCancel(t.Context())
				done := make(chan error, 1)
				go func() { done <- ix.Run(ctx) }()
				synctest.Wait()
				select {
				case err := <-done:
					t.Fatalf("Run returned before its context ended: %v", err)
				default:
				}
				if got := running.Load(); got != int32(n) {
					t.Fatalf("%d loops running, want %d", got, n)
				}
				cancel()
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				if got := running.Load(); got != 0 {
					t.Fatalf("Run returned with %d loops running", got)
				}
			})
		})
	}
}
