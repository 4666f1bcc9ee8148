//go:build integration

package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
)

// TestObserverMode: containerd keeps its built-in store; coop beside it
// learns the blobs from containerd's events, serves them to a neighbour,
// forgets them when containerd deletes them, and picks up again after
// containerd restarts under it.
func TestObserverMode(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/obs", 4<<20, 4<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Observer: true})
	if err := e.timed("a: ctr pull", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	e.eventually("a's inventory lists the image", func() bool { return e.holds(a, img.Blobs()) })

	// B pulls from A while the registry is down.
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Observer: true, Neighbors: []harness.Neighbor{a.AsNeighbor()}})
	if err := e.timed("b: ctr pull from a", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img.DigestRef) }); err != nil {
		t.Fatal(err)
	}
	if served := e.metric(a, harness.MetricPeerServedBytes); served < float64(img.LayerBytes()) {
		t.Fatalf("a served %g bytes, want at least the layers' %d", served, img.LayerBytes())
	}
	e.eventually("b's inventory lists the image", func() bool { return e.holds(b, img.Blobs()) })

	// containerd restarted under coop: coop resubscribes and relists.
	if err := a.RestartContainerd(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Ctr(e.ctx, "image", "rm", "--sync", img.Ref); err != nil {
		t.Fatal(err)
	}
	e.eventually("a forgets the layers containerd deleted", func() bool {
		inv := e.inventory(a)
		for _, l := range img.Layers {
			if inv.Has(l.Digest) {
				return false
			}
		}
		return true
	})
}

// eventually fails unless cond holds within 10 s.
func (e *env) eventually(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("not within 10 s: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// holds reports whether n's inventory lists every blob with its size.
func (e *env) holds(n *harness.Node, blobs []harness.Blob) bool {
	inv := e.inventory(n)
	for _, b := range blobs {
		if size, ok := inv.Size(b.Digest); !ok || size != b.Size {
			return false
		}
	}
	return true
}
