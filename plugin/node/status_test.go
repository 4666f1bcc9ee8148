package node

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/modes"
)

// TestStatus: a node's status, read on its mirror listener, has its
// neighbours up or down as they are, its certificate's expiry, and a problem
// only when no neighbour answers.
func TestStatus(t *testing.T) {
	pki := newTestPKI(t)
	ao := proxyOptions(t)
	ao.Name, ao.TLS, ao.MaxUploads = "node-a", pki.creds("node-a"), 16
	ao.PeerListen = freeAddr(t)
	ao.Advertise = "https://" + ao.PeerListen
	startNode(t, ao)
	dead := resolver.Neighbor{Name: "dead", URL: "https://" + freeAddr(t)}

	for _, tc := range []struct {
		name      string
		neighbors []resolver.Neighbor
		wantUp    map[string]bool
		problem   string // "" when none is expected
	}{
		{"one up, one down", []resolver.Neighbor{{Name: "node-a", URL: ao.Advertise}, dead}, map[string]bool{"node-a": true, "dead": false}, ""},
		{"every neighbour down", []resolver.Neighbor{dead}, map[string]bool{"dead": false}, "none of the 1 neighbours answers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bo := proxyOptions(t)
			bo.Name, bo.TLS = "node-b", pki.creds("node-b")
			bo.Advertise = "https://127.0.0.1:1"
			bo.Index = modes.Options{Mode: modes.Online, Neighbors: tc.neighbors}
			bo.Errors = NewErrorLog(0)
			b := startNode(t, bo)
			resp, err := http.Get("http://" + b.MirrorAddr().String() + StatusPath)
			if err != nil {
				t.Fatal(err)
			}
			var s Status
			err = json.NewDecoder(resp.Body).Decode(&s)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("status: %s, %v", resp.Status, err)
			}
			if s.Node != "node-b" || s.ContentMode != ContentProxy || s.Index.Mode != modes.Online {
				t.Fatalf("status names %q, %q, %q", s.Node, s.ContentMode, s.Index.Mode)
			}
			if left := time.Until(s.TLSNotAfter); left < 24*time.Hour {
				t.Fatalf("certificate expiry %v: want the issued certificate's", s.TLSNotAfter)
			}
			got := map[string]bool{}
			for _, nb := range s.Neighbors {
				got[nb.Name] = nb.Up
				if !nb.Up && nb.Error == "" {
					t.Errorf("%s is down without a reason", nb.Name)
				}
				if nb.Up && nb.MaxUploads == 0 {
					t.Errorf("%s is up without its load", nb.Name)
				}
			}
			if len(got) != len(tc.wantUp) {
				t.Fatalf("neighbours %v, want %v", got, tc.wantUp)
			}
			for name, up := range tc.wantUp {
				if got[name] != up {
					t.Fatalf("neighbours %v, want %v", got, tc.wantUp)
				}
			}
			switch {
			case tc.problem == "" && len(s.Problems) > 0:
				t.Fatalf("problems %q, want none", s.Problems)
			case tc.problem != "" && (len(s.Problems) != 1 || !strings.Contains(s.Problems[0], tc.problem)):
				t.Fatalf("problems %q, want %q", s.Problems, tc.problem)
			}
		})
	}
}

func TestErrorLog(t *testing.T) {
	l := NewErrorLog(2)
	levels := map[log.Level]bool{}
	for _, lv := range l.Levels() {
		levels[lv] = true
	}
	if levels[log.InfoLevel] || !levels[log.WarnLevel] || !levels[log.ErrorLevel] {
		t.Fatalf("levels %v: want warnings and worse", l.Levels())
	}
	for _, e := range []*log.Entry{
		{Level: log.WarnLevel, Message: "first"},
		{Level: log.ErrorLevel, Message: "second", Data: log.Fields{"error": "boom"}},
		{Level: log.WarnLevel, Message: "third"},
	} {
		if err := l.Fire(e); err != nil {
			t.Fatal(err)
		}
	}
	got := l.Recent()
	if len(got) != 2 || got[0].Message != "second" || got[0].Error != "boom" || got[1].Message != "third" || got[1].Level != "warning" {
		t.Fatalf("recent %+v; want second (boom) then third", got)
	}
	var none *ErrorLog
	if none.Recent() != nil {
		t.Fatal("a nil ErrorLog has entries")
	}
}

// TestStatusBounded: any local user may ask for the status, and each status
// asks every neighbour: requests that arrive while one is made share it.
func TestStatusBounded(t *testing.T) {
	var asked atomic.Int64
	nb := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == peers.HavePath {
			asked.Add(1)
			time.Sleep(300 * time.Millisecond) // a slow neighbour: the requests below arrive meanwhile
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"node":"nb","epoch":"e","seq":1,"blobs":[]}`)
	}))
	defer nb.Close()
	o := proxyOptions(t)
	o.Index = modes.Options{Mode: modes.Online, Neighbors: []resolver.Neighbor{{Name: "nb", URL: nb.URL}}}
	n := startNode(t, o)
	const requests = 20
	var wg sync.WaitGroup
	for range requests {
		wg.Go(func() {
			resp, err := http.Get("http://" + n.MirrorAddr().String() + StatusPath)
			if err != nil {
				t.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("status: %s", resp.Status)
			}
		})
	}
	wg.Wait()
	if got := asked.Load(); got == 0 || got > 2 {
		t.Fatalf("%d status requests at once asked the neighbour %d times; want once", requests, got)
	}
}
