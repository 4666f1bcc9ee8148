package clusterkb_test

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/coopnet/coop/resolver/modes"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// exact fails unless the resolver names h for every digest in have and for
// none in gone.
func exactNow(ctx context.Context, r resolver.Resolver, node string, have, gone []digest.Digest) bool {
	all := append(append([]digest.Digest(nil), have...), gone...)
	got, err := r.Locate(ctx, all)
	if err != nil {
		return false
	}
	for _, d := range have {
		if !hasNode(got[d], node) {
			return false
		}
	}
	for _, d := range gone {
		if hasNode(got[d], node) {
			return false
		}
	}
	return true
}

func hasNode(cs []peers.Candidate, node string) bool {
	for _, c := range cs {
		if c.Node == node {
			return true
		}
	}
	return false
}

// waitFor waits until cond holds, looking again at each change of idx (the
// index cond depends on), and fails after bound.
func waitFor(t *testing.T, idx *resolver.Index, bound time.Duration, what string, cond func() bool) {
	t.Helper()
	timeout := time.NewTimer(bound)
	defer timeout.Stop()
	for {
		changed := idx.Changed()
		if cond() {
			return
		}
		select {
		case <-changed:
		case <-timeout.C:
			t.Fatalf("not within %v: %s", bound, what)
		}
	}
}

// pushDestination is a push-mode node following nb through the broker; it
// returns its resolver and its metrics.
func pushDestination(ctx context.Context, t *testing.T, broker string, nb resolver.NeighborSource, p time.Duration) (*resolver.Local, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	d := newNode(ctx, t, "dest", "", modes.Options{Mode: modes.Push, NATSURL: broker, Period: p, NeighborSource: nb, Registerer: reg})
	return d.index.Resolver().(*resolver.Local), reg
}

// counter returns the value of the counter name with labels in reg.
func counter(t *testing.T, reg prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if v, ok := labels[l.GetName()]; ok && v != l.GetValue() {
					continue metrics
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// TestDroppedEventsRepaired: a quarter of the holder's change events are
// lost and its full updates are a minute apart; once any later event gets
// through, the destination is exact again after one repair round trip.
func TestDroppedEventsRepaired(t *testing.T) {
	ctx := t.Context()
	broker := startBroker(t)
	nb := &resolver.DynamicNeighbors{}
	h := newHolder(ctx, t, "x", holderOptions{broker: broker, dropRate: 0.25, period: time.Minute})
	nb.Set([]resolver.Neighbor{{Name: "x", URL: h.URL()}})
	res, reg := pushDestination(ctx, t, broker, nb, time.Minute)
	var have, gone []digest.Digest
	for i := range 100 {
		d, err := h.Commit(ctx, int64(100+i))
		if err != nil {
			t.Fatal(err)
		}
		have = append(have, d)
	}
	for _, d := range have[:20] {
		if err := h.Delete(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	gone, have = have[:20], have[20:]
	// Commit sentinels until one is seen: an event after the last loss.
	// A lost event has no event of its own: after a quiet while, the next
	// sentinel goes out.
	timeout := time.After(10 * time.Second)
	for {
		changed := res.Index.Changed()
		d, err := h.Commit(ctx, 7)
		if err != nil {
			t.Fatal(err)
		}
		have = append(have, d)
		select {
		case <-changed:
		case <-time.After(100 * time.Millisecond):
		case <-timeout:
			t.Fatal("no sentinel event got through")
		}
		if exactNow(ctx, res, "x", []digest.Digest{d}, nil) {
			break
		}
	}
	waitFor(t, res.Index, time.Second, "exact after one repair", func() bool { return exactNow(ctx, res, "x", have, gone) })
	if n := counter(t, reg, "coop_index_updates_total", map[string]string{"source": "repair", "result": "ok"}); n == 0 {
		t.Fatal("exact without any repair: were events dropped at all?")
	}
}

// TestKBRestarted: ClusterKB comes back empty on the same address and is
// complete again within one period (the nodes re-register and are read at
// once), for both feeds.
func TestKBRestarted(t *testing.T) {
	for _, feed := range []string{clusterkb.FeedPull, clusterkb.FeedPush} {
		t.Run(feed, func(t *testing.T) {
			ctx := t.Context()
			broker := ""
			if feed == clusterkb.FeedPush {
				broker = startBroker(t)
			}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := l.Addr().String()
			start := func(l net.Listener) (kb *clusterkb.KB, stop func()) {
				opts := clusterkb.Options{Feed: feed, Period: period, Reader: peerClient("kb")}
				kctx, cancel := context.WithCancel(ctx)
				var nc interface{ Close() }
				if broker != "" {
					c, err := resolver.ConnectBroker(kctx, broker, "kb")
					if err != nil {
						t.Fatal(err)
					}
					opts.Conn, nc = c, c
				}
				kb, err := clusterkb.New(opts)
				if err != nil {
					t.Fatal(err)
				}
				srv := &http.Server{Handler: kb, ReadHeaderTimeout: 5 * time.Second}
				var wg sync.WaitGroup
				wg.Go(func() { _ = kb.Run(kctx) })
				wg.Go(func() { _ = srv.Serve(l) })
				return kb, func() {
					cancel()
					_ = srv.Close()
					if nc != nil {
						nc.Close()
					}
					wg.Wait()
				}
			}
			kb, stop := start(l)
			var ds []digest.Digest
			for i := range 3 {
				h := newHolder(ctx, t, "n"+strconv.Itoa(i), holderOptions{broker: broker, kb: "http://" + addr})
				d, err := h.Commit(ctx, 64)
				if err != nil {
					t.Fatal(err)
				}
				ds = append(ds, d)
			}
			client, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: []string{"http://" + addr}, Node: "dest"})
			if err != nil {
				t.Fatal(err)
			}
			complete := func() bool {
				got, err := client.Locate(ctx, ds)
				return err == nil && len(got) == len(ds)
			}
			waitFor(t, kb.Index(), 2*time.Second, "KB complete at first", complete)
			stop()
			if _, err := client.Locate(ctx, ds); err == nil {
				t.Fatal("a stopped KB answered")
			}
			l2, err := net.Listen("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			restarted := time.Now()
			kb, stop = start(l2)
			defer stop()
			waitFor(t, kb.Index(), period+time.Second, "KB complete again within one period", complete)
			t.Logf("complete again %v after the restart", time.Since(restarted).Round(time.Millisecond))
		})
	}
}

// TestBrokerDownAndBack: with the broker gone, a push-mode destination
// keeps answering what it knows (and drops nobody for silence); a blob
// committed meanwhile shows once the broker is back.
func TestBrokerDownAndBack(t *testing.T) {
	ctx := t.Context()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	ns, err := clusterkb.StartBroker(clusterkb.BrokerOptions{Listen: addr, StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	broker := ns.ClientURL()
	nb := &resolver.DynamicNeighbors{}
	h := newHolder(ctx, t, "x", holderOptions{broker: broker})
	nb.Set([]resolver.Neighbor{{Name: "x", URL: h.URL()}})
	res, _ := pushDestination(ctx, t, broker, nb, period)
	before, err := h.Commit(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, res.Index, 2*time.Second, "commit shows", func() bool { return exactNow(ctx, res, "x", []digest.Digest{before}, nil) })

	ns.Shutdown()
	ns.WaitForShutdown()
	during, err := h.Commit(ctx, 11)
	if err != nil {
		t.Fatal(err)
	}
	// What is tested is that nothing happens: for well past the silence
	// bound (3 periods), x stays after every change of the index.
	quiet := time.After(5 * period)
	for waiting := true; waiting; {
		changed := res.Index.Changed()
		if !exactNow(ctx, res, "x", []digest.Digest{before}, nil) {
			t.Fatal("the destination forgot x while the broker was down")
		}
		select {
		case <-changed:
		case <-quiet:
			waiting = false
		}
	}
	ns2, err := clusterkb.StartBroker(clusterkb.BrokerOptions{Listen: addr, StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns2.Shutdown)
	waitFor(t, res.Index, 10*time.Second, "the blob committed while the broker was down shows", func() bool {
		return exactNow(ctx, res, "x", []digest.Digest{before, during}, nil)
	})
}

// TestNodeRestartedNewEpoch: a holder comes back with a new epoch and other
// content; periodic and push destinations follow it.
func TestNodeRestartedNewEpoch(t *testing.T) {
	for _, mode := range []string{"periodic", "push"} {
		t.Run(mode, func(t *testing.T) {
			c := newCluster(t, mode)
			ctx := t.Context()
			root := t.TempDir()
			x := newHolder(c.ctx, t, "x", holderOptions{broker: c.hopts.broker, root: root})
			c.neighbors.Set([]resolver.Neighbor{{Name: "x", URL: x.URL()}})
			keep, err := x.Commit(ctx, 100)
			if err != nil {
				t.Fatal(err)
			}
			drop, err := x.Commit(ctx, 200)
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, c.idx, c.bound, "both show", func() bool { return exactNow(ctx, c.res, "x", []digest.Digest{keep, drop}, nil) })
			_ = x.Kill(ctx)
			x2 := newHolder(c.ctx, t, "x", holderOptions{broker: c.hopts.broker, root: root})
			c.neighbors.Set([]resolver.Neighbor{{Name: "x", URL: x2.URL()}})
			if err := x2.Delete(ctx, drop); err != nil {
				t.Fatal(err)
			}
			added, err := x2.Commit(ctx, 300)
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, c.idx, c.dead+c.bound, "the new epoch's state", func() bool {
				return exactNow(ctx, c.res, "x", []digest.Digest{keep, added}, []digest.Digest{drop})
			})
		})
	}
}

// TestAsymmetricNeighbours: a lists b, b lists only c; b never gets a.
func TestAsymmetricNeighbours(t *testing.T) {
	ctx := t.Context()
	kb, err := clusterkb.New(clusterkb.Options{Feed: clusterkb.FeedPull, Period: period, Reader: peerClient("kb")})
	if err != nil {
		t.Fatal(err)
	}
	kctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = kb.Run(kctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	srv := httptest.NewServer(kb)
	t.Cleanup(srv.Close)
	a := newHolder(ctx, t, "a", holderOptions{kb: srv.URL, neighbors: []string{"b"}})
	b := newHolder(ctx, t, "b", holderOptions{kb: srv.URL, neighbors: []string{"c"}})
	da, err := a.Commit(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	db, err := b.Commit(ctx, 20)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(node string) resolver.Resolver {
		c, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: []string{srv.URL}, Node: node})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	atA, atB, atAny := ask("a"), ask("b"), ask("")
	waitFor(t, kb.Index(), 2*time.Second, "a finds b's blob", func() bool { return exactNow(ctx, atA, "b", []digest.Digest{db}, nil) })
	waitFor(t, kb.Index(), 2*time.Second, "the KB knows a's blob", func() bool { return exactNow(ctx, atAny, "a", []digest.Digest{da}, nil) })
	if !exactNow(ctx, atB, "a", nil, []digest.Digest{da}) {
		t.Fatal("b was offered a, which it does not list")
	}
}
