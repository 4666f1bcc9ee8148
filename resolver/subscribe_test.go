package resolver

import (
	"context"
	"encoding/json"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestSubscriberBadInput(t *testing.T) {
	a, b := digest.FromString("a"), digest.FromString("b")
	ev := func(e Event) []byte {
		e.Time = time.Now()
		buf, _ := json.Marshal(e)
		return buf
	}
	for _, tc := range []struct {
		name    string
		token   string
		data    []byte
		bad     string // metric reason expected
		repairs int32
		want    []digest.Digest // what n1 holds afterwards
	}{
		{"in order", "n1", ev(Event{Node: "n1", URL: "http://evil", Epoch: "e", Seq: 2, Added: blobs(b)}), "", 0, []digest.Digest{a, b}},
		{"garbled", "n1", []byte("{not json"), "garbled", 0, []digest.Digest{a}},
		{"no epoch", "n1", ev(Event{Node: "n1", Seq: 2}), "garbled", 0, []digest.Digest{a}},
		{"seq zero", "n1", ev(Event{Node: "n1", Epoch: "e", Seq: 0, Added: blobs(b)}), "garbled", 0, []digest.Digest{a}},
		{"oversized", "n1", []byte(`{"node":"n1","pad":"` + strings.Repeat("x", MaxEventSize) + `"}`), "oversized", 0, []digest.Digest{a}},
		{"another node's subject", "n2", ev(Event{Node: "n1", Epoch: "e", Seq: 2, Added: blobs(b)}), "wrong_subject", 0, []digest.Digest{a}},
		// A node may write only its own key: a retained full inventory
		// under n2's key that claims to be n1's changes nothing.
		{"retained value under another node's key", Token("n2"), ev(Event{Node: "n1", Full: true, Epoch: "e", Seq: 3, Blobs: blobs(b)}), "wrong_subject", 0, []digest.Digest{a}},
		{"seq backwards ignored", "n1", ev(Event{Node: "n1", Epoch: "e", Seq: 1, Removed: []digest.Digest{a}}), "", 0, []digest.Digest{a}},
		{"gap repaired from the node", "n1", ev(Event{Node: "n1", Epoch: "e", Seq: 5, Added: blobs(b)}), "", 1, []digest.Digest{b}},
		{"new epoch repaired", "n1", ev(Event{Node: "n1", Epoch: "f", Seq: 1, Added: blobs(b)}), "", 1, []digest.Digest{b}},
		{"unfollowed node ignored", "n3", ev(Event{Node: "n3", Epoch: "e", Seq: 1, Added: blobs(b)}), "", 0, []digest.Digest{a}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := NewMetrics(nil)
			x := NewIndex()
			if err := x.Full("n1", "http://n1", "e", 1, blobs(a), time.Now()); err != nil {
				t.Fatal(err)
			}
			r := &fullReader{inv: peers.InventoryResponse{Node: "n1", Epoch: "e", Seq: 9, Full: true, Blobs: []content.Blob{{Digest: b, Size: 10}}}}
			s := &Subscriber{
				opts: SubscriberOptions{Index: x, Members: Neighborhood{Source: Static{{Name: "n1", URL: "http://n1"}, {Name: "n2", URL: "http://n2"}}}, Reader: r, Period: time.Second, Metrics: m},
				subs: nil, repairing: map[string]bool{},
			}
			s.apply(context.Background(), tc.token, tc.data, "event")
			s.stop() // waits for a repair to land
			if got := r.calls.Load(); got != tc.repairs {
				t.Fatalf("repairs %d, want %d", got, tc.repairs)
			}
			if tc.bad != "" {
				if n := testutil.ToFloat64(m.BadInput.WithLabelValues(tc.bad)); n != 1 {
					t.Fatalf("bad input %q counted %v times", tc.bad, n)
				}
			}
			got := x.Locate([]digest.Digest{a, b}, LocateOptions{})
			for _, d := range []digest.Digest{a, b} {
				want := false
				for _, w := range tc.want {
					want = want || w == d
				}
				if (len(got[d]) > 0) != want {
					t.Fatalf("%s held: %v, want %v", d, got[d], want)
				}
				for _, c := range got[d] {
					if c.URL != "http://n1" {
						t.Fatalf("candidate URL %q: the event's claimed URL must not win over the configured one", c.URL)
					}
				}
			}
		})
	}
}

// stuckReader is a peer that answers nothing: each read blocks until its
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

// TestSubscriberRunWaitsForRepairs: Run returns only once the repairs it
// started have ended.
func TestSubscriberRunWaitsForRepairs(t *testing.T) {
	ns := startNATS(t, "127.0.0.1:0", t.TempDir())
	nc, err := ConnectBroker(t.Context(), ns.ClientURL(), "dest")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	r := &stuckReader{started: make(chan struct{}, 1)}
	sub, err := NewSubscriber(SubscriberOptions{Index: NewIndex(), Conn: nc, Reader: r, Period: time.Hour,
		Members: Neighborhood{Source: Static{{Name: "x", URL: "http://x"}}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { _ = sub.Run(ctx); close(done) }()
	<-r.started // x is read at start: nothing is retained for it
	cancel()
	<-done
	if n := r.inFlight.Load(); n != 0 {
		t.Fatalf("Run returned with %d repairs still reading", n)
	}
}
