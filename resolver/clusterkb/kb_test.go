package clusterkb_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	digest "github.com/opencontainers/go-digest"
)

func TestClientBadKB(t *testing.T) {
	d := digest.FromString("d")
	other := digest.FromString("other")
	good := resolver.LocateResponse{Candidates: map[digest.Digest][]peers.Candidate{
		d:     {{Node: "n1", URL: "http://n1:5050", Size: 3}, {Node: "me", URL: "http://me:5050", Size: 3}, {Node: "bad", URL: "ftp://x", Size: 3}, {Node: "neg", URL: "http://neg", Size: -1}},
		other: {{Node: "n2", URL: "http://n2:5050", Size: 9}},
	}}
	handlers := map[string]http.HandlerFunc{
		"good": func(w http.ResponseWriter, _ *http.Request) { _ = json.NewEncoder(w).Encode(good) },
		"garbage": func(w http.ResponseWriter, _ *http.Request) {
			_, _ = w.Write([]byte("<html>oops"))
		},
		"500": func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(500) },
		"slow": func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(3 * time.Second):
			}
		},
	}
	url := func(name string) string {
		srv := httptest.NewServer(handlers[name])
		t.Cleanup(srv.Close)
		return srv.URL
	}
	for _, tc := range []struct {
		name string
		kbs  []string
		ok   bool
	}{
		{"good", []string{"good"}, true},
		{"fail over from garbage", []string{"garbage", "good"}, true},
		{"fail over from 500", []string{"500", "good"}, true},
		{"fail over from a hang", []string{"slow", "good"}, true},
		{"all bad", []string{"garbage", "500", "slow"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var urls []string
			for _, k := range tc.kbs {
				urls = append(urls, url(k))
			}
			c, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: urls, Node: "me", Timeout: 200 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			got, err := c.Locate(context.Background(), []digest.Digest{d})
			if !tc.ok {
				if err == nil || !errdefs.IsUnavailable(err) {
					t.Fatalf("err %v, want unavailable", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			// Only the sane candidate for the digest asked, never the asker.
			if len(got) != 1 || len(got[d]) != 1 || got[d][0].Node != "n1" {
				t.Fatalf("candidates %v", got)
			}
		})
	}
}

func TestClientRejectsBadURL(t *testing.T) {
	for _, urls := range [][]string{nil, {"not a url"}, {"ftp://kb"}} {
		if _, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: urls}); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: err %v, want invalid argument", urls, err)
		}
	}
}

func TestKBAPI(t *testing.T) {
	kb, err := clusterkb.New(clusterkb.Options{Feed: clusterkb.FeedPull, Period: time.Hour, Reader: peerClient("kb")})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(kb)
	defer srv.Close()
	d := digest.FromString("d")
	for _, n := range []string{"a", "b", "c"} {
		if err := kb.Index().Full(n, "http://"+n, "e", 1, []content.Blob{{Digest: d, Size: 1}}, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	// a may fetch from b only.
	if err := kb.Register(context.Background(), clusterkb.RegisterRequest{Name: "a", URL: "http://127.0.0.1:1", Neighbors: []string{"b"}}); err != nil {
		t.Fatal(err)
	}
	many := make([]string, resolver.MaxLocateDigests+1)
	for i := range many {
		many[i] = `"` + d.String() + `"`
	}
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		nodes                    []string
	}{
		{"locate all", "POST", "/coop/v1/locate", `{"digests":["` + d.String() + `"]}`, 200, []string{"a", "b", "c"}},
		{"locate as a: neighbours only, never itself", "POST", "/coop/v1/locate", `{"node":"a","digests":["` + d.String() + `"]}`, 200, []string{"b"}},
		{"locate as c: all but itself", "POST", "/coop/v1/locate", `{"node":"c","digests":["` + d.String() + `"]}`, 200, []string{"a", "b"}},
		{"bad json", "POST", "/coop/v1/locate", `{"digests":`, 400, nil},
		{"bad digest", "POST", "/coop/v1/locate", `{"digests":["sha256:zz"]}`, 400, nil},
		{"too many digests", "POST", "/coop/v1/locate", `{"digests":[` + strings.Join(many, ",") + `]}`, 400, nil},
		{"oversized body", "POST", "/coop/v1/locate", `{"digests":[],"pad":"` + strings.Repeat("x", 3<<20) + `"}`, 413, nil},
		{"locate by GET", "GET", "/coop/v1/locate", "", 405, nil},
		{"register without url", "POST", "/coop/v1/nodes", `{"name":"x"}`, 400, nil},
		{"register bad name", "POST", "/coop/v1/nodes", `{"name":"a b","url":"http://x"}`, 400, nil},
		{"register", "POST", "/coop/v1/nodes", `{"name":"x","url":"http://127.0.0.1:1"}`, 200, nil},
		{"nodes", "GET", "/coop/v1/nodes", "", 200, nil},
		{"unknown path", "GET", "/nope", "", 404, nil},
		{"health", "GET", "/healthz", "", 200, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, srv.URL+tc.path, bytes.NewReader([]byte(tc.body)))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if tc.nodes == nil {
				return
			}
			var lr resolver.LocateResponse
			if err := json.NewDecoder(resp.Body).Decode(&lr); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, c := range lr.Candidates[d] {
				got = append(got, c.Node)
			}
			if strings.Join(got, ",") != strings.Join(tc.nodes, ",") {
				t.Fatalf("candidates %v, want %v", got, tc.nodes)
			}
		})
	}
}

// stuckReader is a node that answers nothing: each read blocks until its
// context ends and then takes a while to give up.
type stuckReader struct {
	started  chan struct{}
	inFlight atomic.Int32
}

func (r *stuckReader) Inventory(ctx context.Context, _, _ string, _ uint64) (*peers.InventoryResponse, error) {
	r.inFlight.Add(1)
	defer r.inFlight.Add(-1)
	select {
	case r.started <- struct{}{}:
	default:
	}
	<-ctx.Done()
	time.Sleep(50 * time.Millisecond) // slow to give up; not a synchronisation
	return nil, ctx.Err()
}

// TestKBRunWaitsForFirstReads: the first read of a registered node belongs
// to Run, which returns only once it has ended; a KB that is not running
// reads nobody.
func TestKBRunWaitsForFirstReads(t *testing.T) {
	for _, feed := range []string{clusterkb.FeedPull, clusterkb.FeedPush} {
		t.Run(feed, func(t *testing.T) {
			r := &stuckReader{started: make(chan struct{}, 1)}
			opts := clusterkb.Options{Feed: feed, Period: time.Hour, PollTimeout: time.Hour, Reader: r}
			if feed == clusterkb.FeedPush {
				nc, err := resolver.ConnectBroker(t.Context(), startBroker(t), "kb")
				if err != nil {
					t.Fatal(err)
				}
				defer nc.Close()
				opts.Conn = nc
			}
			kb, err := clusterkb.New(opts)
			if err != nil {
				t.Fatal(err)
			}
			if err := kb.Register(t.Context(), clusterkb.RegisterRequest{Name: "x", URL: "http://127.0.0.1:1"}); err != nil {
				t.Fatal(err)
			}
			if n := r.inFlight.Load(); n != 0 {
				t.Fatalf("a KB that is not running reads %d nodes", n)
			}
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error)
			go func() { done <- kb.Run(ctx) }()
			<-r.started
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if n := r.inFlight.Load(); n != 0 {
				t.Fatalf("Run returned with %d reads in flight", n)
			}
		})
	}
}
