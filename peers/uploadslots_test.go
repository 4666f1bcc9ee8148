package peers

import (
	"io"
	"net/http"
	"testing"
	"testing/synctest"
	"time"

	"github.com/containerd/log/logtest"
	"github.com/prometheus/client_golang/prometheus"
)

// TestServerUploadsPerClient: a client (by IP, or as ClientKey says) past
// its share (MaxUploadsPerClient) is answered 429 with Retry-After once one
// more upload would leave fewer than a share free, while other clients are
// served; alone, a client uses all but one share; a slot given back is taken
// again.
func TestServerUploadsPerClient(t *testing.T) {
	byHeader := func(r *http.Request) string { return r.Header.Get("X-Test-Node") }
	type get struct {
		from, node string // remote address, X-Test-Node
		busy       bool   // answered 429
	}
	for _, tc := range []struct {
		name             string
		opts             ServerOptions
		gets             []get
		busy, clientBusy float64 // refusals counted by the global and the per-client bound
	}{
		{"default: a client alone keeps the others' share free", ServerOptions{MaxUploads: 8}, []get{
			{from: "192.0.2.1:1"}, {from: "192.0.2.1:2"}, {from: "192.0.2.1:3"}, {from: "192.0.2.1:4"},
			{from: "192.0.2.1:5", busy: true}, // past its share of 4, with only 4 free
			{from: "192.0.2.2:1"}, {from: "192.0.2.2:2"}, {from: "[2001:db8::1]:1"}, {from: "[2001:db8::1]:2"},
			{from: "192.0.2.3:1", busy: true}, // all 8 running
		}, 1, 1},
		{"configured per-client share", ServerOptions{MaxUploads: 6, MaxUploadsPerClient: 2}, []get{
			{from: "192.0.2.2:1"},
			{from: "192.0.2.1:1"}, {from: "192.0.2.1:2"}, {from: "192.0.2.1:3"}, // past its share while 2 stay free
			{from: "192.0.2.1:4", busy: true},
			{from: "192.0.2.2:2"},
			{from: "192.0.2.2:3", busy: true}, // past its share too, with 1 free
		}, 0, 2},
		{"global bound below the per-client one", ServerOptions{MaxUploads: 2, MaxUploadsPerClient: 4}, []get{
			{from: "192.0.2.1:1"}, {from: "192.0.2.2:1"},
			{from: "192.0.2.3:1", busy: true},
		}, 1, 0},
		{"client key from the request", ServerOptions{MaxUploads: 3, MaxUploadsPerClient: 1, ClientKey: byHeader}, []get{
			{from: "192.0.2.1:1", node: "b"},
			{from: "192.0.2.1:2", node: "a"},
			{from: "192.0.2.2:1", node: "a", busy: true}, // another address, the same node
		}, 0, 1},
		{"no per-client bound", ServerOptions{MaxUploads: 6, MaxUploadsPerClient: -1}, []get{
			{from: "192.0.2.1:1"}, {from: "192.0.2.1:2"}, {from: "192.0.2.1:3"},
			{from: "192.0.2.1:4"}, {from: "192.0.2.1:5"}, {from: "192.0.2.1:6"},
		}, 0, 0},
		{"no global bound: nothing to share", ServerOptions{}, []get{
			{from: "192.0.2.1:1"}, {from: "192.0.2.1:2"}, {from: "192.0.2.1:3"},
			{from: "192.0.2.1:4"}, {from: "192.0.2.1:5"}, {from: "192.0.2.1:6"},
		}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx := logtest.WithT(t.Context(), t)
				f := newFixture(ctx, t, 1<<20)
				opts := tc.opts
				reg := prometheus.NewRegistry()
				opts.Node, opts.Store, opts.Inventory, opts.Registerer = "n", f.store, f.inv, reg
				srv, err := NewServer(opts)
				if err != nil {
					t.Fatal(err)
				}
				ln := servePipe(ctx, t, srv, HTTPServerOptions{})
				do := func(g get) *http.Response {
					t.Helper()
					tr := ln.transportFrom(g.from)
					t.Cleanup(tr.CloseIdleConnections)
					req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://peer/v2/x/blobs/"+f.bigD.String(), nil)
					if err != nil {
						t.Fatal(err)
					}
					req.Header.Set("X-Test-Node", g.node)
					resp, err := (&http.Client{Transport: tr}).Do(req)
					if err != nil {
						t.Fatal(err)
					}
					return resp
				}
				// Every upload held stays open: its client does not read.
				var held []*http.Response
				for i, g := range tc.gets {
					resp := do(g)
					switch {
					case g.busy && resp.StatusCode == http.StatusTooManyRequests:
						body, err := io.ReadAll(resp.Body)
						resp.Body.Close()
						if err != nil || resp.Header.Get("Retry-After") != "1" || errorCode(body) != CodeTooManyRequests {
							t.Fatalf("get %d (%+v): 429 with Retry-After %q and body %s", i, g, resp.Header.Get("Retry-After"), body)
						}
					case !g.busy && resp.StatusCode == http.StatusOK:
						held = append(held, resp)
					default:
						resp.Body.Close()
						t.Fatalf("get %d (%+v): %s, want busy %v", i, g, resp.Status, g.busy)
					}
				}
				if n := srv.Load().ActiveUploads; n != len(held) {
					t.Fatalf("%d uploads counted, %d held", n, len(held))
				}
				busy := metricValue(t, reg, "coop_peer_busy_total", nil)
				clientBusy := metricValue(t, reg, "coop_peer_client_busy_total", nil)
				if busy != tc.busy || clientBusy != tc.clientBusy {
					t.Fatalf("busy %v, client busy %v; want %v, %v", busy, clientBusy, tc.busy, tc.clientBusy)
				}
				// Given back, a slot is taken again by the same client.
				held[0].Body.Close()
				synctest.Wait()
				again := tc.gets[0]
				resp := do(again)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("after a slot was given back: %s", resp.Status)
				}
				held = append(held[1:], resp)
				for _, resp := range held {
					resp.Body.Close()
				}
				synctest.Wait()
				if n := srv.Load().ActiveUploads; n != 0 {
					t.Fatalf("%d uploads counted after every client went away", n)
				}
				if srv.byClient[ClientIP(&http.Request{RemoteAddr: again.from})] != 0 || len(srv.byClient) != 0 {
					t.Fatalf("slots by client %v after every client went away", srv.byClient)
				}
			})
		})
	}
}

func TestServerUploadOptions(t *testing.T) {
	ctx := logtest.WithT(t.Context(), t)
	f := newFixture(ctx, t, 1024)
	key := func(*http.Request) string { return "k" }
	for _, tc := range []struct {
		name      string
		opts      ServerOptions
		perClient int
		stall     time.Duration
		keyed     string
	}{
		{"defaults", ServerOptions{}, DefaultMaxUploadsPerClient, DefaultWriteStall, "192.0.2.1"},
		{"set", ServerOptions{MaxUploadsPerClient: 7, WriteStall: time.Second, ClientKey: key}, 7, time.Second, "k"},
		{"no per-client bound", ServerOptions{MaxUploadsPerClient: -1}, 0, DefaultWriteStall, "192.0.2.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			opts.Node, opts.Store, opts.Inventory = "n", f.store, f.inv
			srv, err := NewServer(opts)
			if err != nil {
				t.Fatal(err)
			}
			if srv.maxPerClient != tc.perClient || srv.writeStall != tc.stall || srv.clientKey(&http.Request{RemoteAddr: "192.0.2.1:5"}) != tc.keyed {
				t.Fatalf("server has %d a client, stall %v, key %q", srv.maxPerClient, srv.writeStall, srv.clientKey(&http.Request{RemoteAddr: "192.0.2.1:5"}))
			}
		})
	}
	if _, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: f.inv, WriteStall: -1}); err == nil {
		t.Fatal("negative write stall accepted")
	}
}
