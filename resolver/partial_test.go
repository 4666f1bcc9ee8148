package resolver

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// partialOf returns the nodes Locate says are downloading d, sorted.
func partialOf(x *Index, d digest.Digest) (whole, partial []string) {
	for _, c := range x.Locate([]digest.Digest{d}, LocateOptions{Exclude: "me"})[d] {
		if c.Partial {
			partial = append(partial, c.Node)
		} else {
			whole = append(whole, c.Node)
		}
	}
	slices.Sort(partial)
	return whole, partial
}

// TestIndexPartials: the blobs nodes are downloading are candidates marked
// Partial, after the whole holders; a node's list replaces its last one;
// a node holding the blob whole is not listed twice; bad entries, unknown
// nodes and the asking node are ignored; a dropped node's list goes.
func TestIndexPartials(t *testing.T) {
	a, b := digest.FromString("a"), digest.FromString("b")
	now := time.Now()
	x := NewIndex()
	for _, n := range []string{"n1", "n2", "n3", "me"} {
		if err := x.Full(n, "http://"+n, "e", 1, nil, now); err != nil {
			t.Fatal(err)
		}
	}
	if err := x.Full("n3", "http://n3", "e", 2, blobs(a), now); err != nil {
		t.Fatal(err)
	}
	x.SetPartial("n1", []content.Blob{{Digest: a, Size: 10}, {Digest: b, Size: 11}, {Digest: "sha256:nope", Size: 1}, {Digest: b, Size: 0}})
	x.SetPartial("n2", []content.Blob{{Digest: a, Size: 10}})
	x.SetPartial("n3", []content.Blob{{Digest: a, Size: 10}}) // holds it whole
	x.SetPartial("me", []content.Blob{{Digest: a, Size: 10}})
	x.SetPartial("stranger", []content.Blob{{Digest: a, Size: 10}})
	whole, partial := partialOf(x, a)
	if !slices.Equal(whole, []string{"n3"}) || !slices.Equal(partial, []string{"n1", "n2"}) {
		t.Fatalf("a: whole %v partial %v", whole, partial)
	}
	cs := x.Locate([]digest.Digest{a}, LocateOptions{})[a]
	if cs[0].Partial || cs[0].Node != "n3" {
		t.Errorf("whole holders come first: %+v", cs)
	}
	if _, p := partialOf(x, b); !slices.Equal(p, []string{"n1"}) {
		t.Errorf("b: partial %v", p)
	}
	x.SetPartial("n1", []content.Blob{{Digest: b, Size: 11}})
	if _, p := partialOf(x, a); !slices.Equal(p, []string{"n2"}) {
		t.Errorf("after n1's new list: a partial at %v", p)
	}
	x.Drop("n2")
	x.SetPartial("n1", nil)
	if got := x.Locate([]digest.Digest{a, b}, LocateOptions{Exclude: "me"}); len(got[b]) != 0 || len(got[a]) != 1 {
		t.Errorf("after n2 dropped and n1 done: %v", got)
	}
	many := make([]content.Blob, MaxPartials+10)
	for i := range many {
		many[i] = content.Blob{Digest: digest.FromString(string(rune(i))), Size: 1}
	}
	x.SetPartial("n1", many)
	if _, p := partialOf(x, many[MaxPartials+5].Digest); len(p) != 0 {
		t.Error("more than MaxPartials kept")
	}
}

// TestPartialsFeeds: an inventory answer (periodic) and a broker event
// (push, and ClusterKB's feed) carry the node's partial list into the
// index.
func TestPartialsFeeds(t *testing.T) {
	a := digest.FromString("a")
	r := &fullReader{inv: peers.InventoryResponse{Node: "n1", Epoch: "e", Seq: 1, Full: true, Partial: []content.Blob{{Digest: a, Size: 5}}}}
	x := NewIndex()
	if err := Sync(context.Background(), x, r, Neighbor{Name: "n1", URL: "http://n1"}, nil, "poll"); err != nil {
		t.Fatal(err)
	}
	if _, p := partialOf(x, a); !slices.Equal(p, []string{"n1"}) {
		t.Fatalf("after a sync: partial at %v", p)
	}
	m, _ := NewMetrics(nil)
	s := &Subscriber{
		opts:      SubscriberOptions{Index: x, Members: Neighborhood{Source: Static{{Name: "n1", URL: "http://n1"}}}, Reader: r, Period: time.Second, Metrics: m},
		repairing: map[string]bool{},
	}
	ev, _ := json.Marshal(Event{Node: "n1", URL: "http://n1", Epoch: "e", Seq: 1, Time: time.Now(), Partials: true})
	s.apply(context.Background(), "n1", ev, "event")
	if _, p := partialOf(x, a); len(p) != 0 {
		t.Fatalf("after an empty partials event: partial at %v", p)
	}
	ev, _ = json.Marshal(Event{Node: "n1", URL: "http://n1", Epoch: "e", Seq: 1, Time: time.Now(), Full: true, Partials: true, Partial: []content.Blob{{Digest: a, Size: 5}}})
	s.apply(context.Background(), "n1", ev, "event")
	s.stop()
	if _, p := partialOf(x, a); !slices.Equal(p, []string{"n1"}) {
		t.Fatalf("after a full event with partials: partial at %v", p)
	}
}

// fakePartials is a PartialSource set by the test.
type fakePartials struct {
	mu    sync.Mutex
	blobs []content.Blob
	fn    func()
}

func (f *fakePartials) Blobs() []content.Blob {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.blobs)
}

func (f *fakePartials) Watch(fn func()) func() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fn = fn
	return func() {}
}

func (f *fakePartials) set(bs ...content.Blob) {
	f.mu.Lock()
	f.blobs = bs
	fn := f.fn
	f.mu.Unlock()
	if fn != nil {
		fn()
	}
}

// TestPublisherPartials: through a real broker, a node's partial list
// reaches another node's index as downloads start and end.
func TestPublisherPartials(t *testing.T) {
	ns := startNATS(t, "127.0.0.1:0", t.TempDir())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pc, err := ConnectBroker(ctx, ns.ClientURL(), "src")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	sc, err := ConnectBroker(ctx, ns.ClientURL(), "dst")
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	fp := &fakePartials{}
	pub, err := NewPublisher(PublisherOptions{Node: "src", URL: "http://src", Inventory: content.NewInventory(), Conn: pc, Period: time.Hour, Partials: fp})
	if err != nil {
		t.Fatal(err)
	}
	x := NewIndex()
	sub, err := NewSubscriber(SubscriberOptions{Index: x, Conn: sc, Reader: &fullReader{inv: peers.InventoryResponse{Node: "src", Epoch: "e", Full: true}},
		Period: time.Hour, Members: Neighborhood{Source: Static{{Name: "src", URL: "http://src"}}}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { _ = sub.Run(ctx) })
	// The subscriber knows src (its inventory) before src publishes.
	for x.Nodes() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	wg.Go(func() { _ = pub.Run(ctx) })
	a := digest.FromString("a")
	waitPartial := func(want []string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, p := partialOf(x, a)
			if slices.Equal(p, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("partial at %v, want %v", p, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	time.Sleep(100 * time.Millisecond) // the publisher watches
	fp.set(content.Blob{Digest: a, Size: 7})
	waitPartial([]string{"src"})
	fp.set()
	waitPartial(nil)
}
