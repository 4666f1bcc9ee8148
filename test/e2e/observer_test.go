//go:build integration

package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
)

// TestObserverMode: containerd keeps its built-in store; coop beside it
// learns the blobs from containerd's events, serves them to a neighbour,
// forgets them when containerd deletes them, and picks up again after
// containerd restarts under it.
func TestObserverMode(t *testing.T) {
	e := newEnv(t, true)
	_, img, a, b := e.observerPair("coop/obs", 4<<20, 4<<20)
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

// TestObserverOneCopy: in observer mode a blob the mirror lands for
// containerd is on the node's disk once. B pulls from A with the registry
// down, so every layer comes through B's mirror, which lands it in coop's
// store; once containerd has committed it, coop's copy is gone and only
// containerd's remains, and B still serves it: from containerd's store,
// to a direct fetch and to C's pull (A stopped, so B is C's only source).
func TestObserverOneCopy(t *testing.T) {
	e := newEnv(t, true)
	reg, img, a, b := e.observerPair("coop/obs-once", 4<<20, 3<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	e.requireOneCopy(b, img)

	// B serves what only containerd's store now holds.
	for _, l := range img.Layers {
		if err := e.fetchBlob(b, l); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	c := e.node(harness.NodeOptions{Name: "c", Registries: up, Observer: true, Neighbors: []harness.Neighbor{b.AsNeighbor()}})
	before := e.metric(b, harness.MetricPeerServedBytes)
	if err := e.timed("c: ctr pull from b", pullTimeout, func(ctx context.Context) error { return c.PullCtr(ctx, img.DigestRef) }); err != nil {
		t.Fatal(err)
	}
	if served := e.metric(b, harness.MetricPeerServedBytes) - before; served < float64(img.LayerBytes()) {
		t.Fatalf("b served c %g bytes, want at least the layers' %d", served, img.LayerBytes())
	}
	e.requireOneCopy(c, img)
}

// requireOneCopy fails unless, within 10 s, every layer of img is in n's
// containerd store with its size and not in coop's (coop drops its copy
// when containerd's event for the blob arrives).
func (e *env) requireOneCopy(n *harness.Node, img *harness.Image) {
	e.t.Helper()
	for _, l := range img.Layers {
		fi, err := os.Stat(n.ContainerdBlobPath(l.Digest))
		if err != nil {
			e.t.Fatalf("node %s: containerd's store lacks layer %s: %v", n.Name, l.Digest, err)
		}
		if fi.Size() != l.Size {
			e.t.Fatalf("node %s: containerd's store holds layer %s with %d bytes, want %d", n.Name, l.Digest, fi.Size(), l.Size)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []digest.Digest
		for _, l := range img.Layers {
			if _, err := os.Stat(n.BlobPath(l.Digest)); !errors.Is(err, os.ErrNotExist) {
				left = append(left, l.Digest)
			}
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("node %s: 10 s after the pull coop's store still holds %d of the %d layers containerd holds (two copies on disk): %v",
				n.Name, len(left), len(img.Layers), left)
		}
		time.Sleep(50 * time.Millisecond)
	}
	d, err := n.BlobDisk()
	if err != nil {
		e.t.Fatal(err)
	}
	e.logf("node %s: blobs on disk: coop %d, containerd %d bytes; the image is %d", n.Name, d.Coop, d.Containerd, img.TotalBytes())
}

// fetchBlob GETs blob l from n's peer server, as a peer would, and checks
// its digest and size.
func (e *env) fetchBlob(n *harness.Node, l harness.Blob) error {
	ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.PeerURL()+"/v2/coop/blobs/"+l.Digest.String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("X-Coop-Forwarded", "e2e")
	resp, err := n.HTTP().Do(req)
	if err != nil {
		return fmt.Errorf("node %s: GET %s: %w", n.Name, l.Digest, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("node %s: GET %s: %s", n.Name, l.Digest, resp.Status)
	}
	h := digest.Canonical.Digester()
	size, err := io.Copy(h.Hash(), resp.Body)
	if err != nil {
		return fmt.Errorf("node %s: GET %s: %w", n.Name, l.Digest, err)
	}
	if h.Digest() != l.Digest || size != l.Size {
		return fmt.Errorf("node %s: GET %s: %d bytes hashing to %s, want %d", n.Name, l.Digest, size, h.Digest(), l.Size)
	}
	return nil
}

// observerPair: observer node a pulls an image of layers of the given sizes
// from the registry, the registry stops, and observer node b, a's
// neighbour, pulls it from a: every layer through b's mirror (a served at
// least the layers' bytes). The registry is returned stopped.
func (e *env) observerPair(repo string, sizes ...int64) (*harness.Registry, *harness.Image, *harness.Node, *harness.Node) {
	e.t.Helper()
	reg := e.registry()
	img := e.push(reg, repo, sizes...)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Observer: true})
	if err := e.timed("a: ctr pull", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
		e.t.Fatal(err)
	}
	e.eventually("a's inventory lists the image", func() bool { return e.holds(a, img.Blobs()) })
	if err := reg.Stop(); err != nil {
		e.t.Fatal(err)
	}
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Observer: true, Neighbors: []harness.Neighbor{a.AsNeighbor()}})
	if err := e.timed("b: ctr pull from a", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img.DigestRef) }); err != nil {
		e.t.Fatal(err)
	}
	if served := e.metric(a, harness.MetricPeerServedBytes); served < float64(img.LayerBytes()) {
		e.t.Fatalf("a served %g bytes, want at least the layers' %d: the layers did not come through b's mirror", served, img.LayerBytes())
	}
	return reg, img, a, b
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
