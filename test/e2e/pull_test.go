//go:build integration

package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
)

const pullTimeout = 3 * time.Minute

// TestMirrorMissFallsBackToRegistry: node A pulls through its mirror; nobody
// holds the blobs, so every blob falls back to the registry, the pull
// succeeds, and the mirror counts its misses.
func TestMirrorMissFallsBackToRegistry(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/miss", 2<<20, 2<<20, 1<<20)
	a := e.node(harness.NodeOptions{Name: "a", Registries: []harness.Upstream{harness.UpstreamOf(reg)}})

	reg.ResetCounts()
	if err := e.timed("a: ctr pull (registry)", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	c := reg.Counts()
	if want := int64(len(img.Layers)) + 1; c.BlobGets < want {
		t.Fatalf("registry served %d blob GETs, want at least %d (layers + config)", c.BlobGets, want)
	}
	if c.BlobBytes < img.LayerBytes() {
		t.Fatalf("registry served %d blob bytes, want at least the layers' %d", c.BlobBytes, img.LayerBytes())
	}
	m, err := a.Metrics(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	misses, _ := m.Sum(harness.MetricMirrorRequests, "result", "miss")
	if misses < float64(len(img.Layers)) {
		t.Fatalf("mirror counted %g misses, want at least %d (one per layer); series:\n%s",
			misses, len(img.Layers), m.Series(harness.MetricMirrorRequests))
	}
	if served, _ := m.Sum(harness.MetricPeerServedBytes); served != 0 {
		t.Fatalf("A's peer server served %g bytes with no neighbour", served)
	}
	e.requireHolds(a, img.Blobs())
	if got := e.snapshotCount(a, "default"); got < len(img.Layers) {
		t.Fatalf("%d snapshots after the pull, want %d (unpacked layers)", got, len(img.Layers))
	}
	e.verifyContent(a, "default")
}

// TestNeighbourServesWhileRegistryDown: A pulls from the registry, the
// registry stops, and B (A as its neighbour) pulls the image by digest, once
// with ctr and once through CRI, each on a fresh B: every blob comes from A.
func TestNeighbourServesWhileRegistryDown(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/coop", 3<<20, 3<<20, 2<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up})
	if err := e.timed("a: ctr pull (registry)", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	e.requireHolds(a, img.Blobs())
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		ns   string
		pull func(ctx context.Context, b *harness.Node) error
	}{
		{"ctr", "default", func(ctx context.Context, b *harness.Node) error { return b.PullCtr(ctx, img.DigestRef) }},
		{"crictl", "k8s.io", func(ctx context.Context, b *harness.Node) error { return b.PullCRI(ctx, img.DigestRef) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := e.sub(t)
			b := e.node(harness.NodeOptions{Name: "b-" + tc.name, Registries: up, Neighbors: []harness.Neighbor{a.AsNeighbor()}})
			served0 := e.metric(a, harness.MetricPeerServedBytes)
			reg.ResetCounts()
			if err := e.timed("b: "+tc.name+" pull (from A, registry down)", pullTimeout, func(ctx context.Context) error { return tc.pull(ctx, b) }); err != nil {
				t.Fatal(err)
			}
			served := e.metric(a, harness.MetricPeerServedBytes) - served0
			if served < float64(img.LayerBytes()) {
				t.Fatalf("A served %g bytes during B's pull, want at least the layers' %d", served, img.LayerBytes())
			}
			if c := reg.Counts(); c.Requests != 0 {
				t.Fatalf("registry saw %d requests during B's pull, want 0", c.Requests)
			}
			t.Logf("A served %g bytes (layers %d, all blobs %d)", served, img.LayerBytes(), img.TotalBytes())
			e.requireHolds(b, img.Blobs())
			if got := e.snapshotCount(b, tc.ns); got < len(img.Layers) {
				t.Fatalf("%d snapshots in %s after the pull, want %d", got, tc.ns, len(img.Layers))
			}
			e.verifyContent(b, tc.ns)
		})
	}
}

// TestPeerKilledMidBlob: A serves slowly (upload limit) and is killed once it
// has sent part of B's 64 MiB layer; the registry is up, and B's pull
// finishes from it.
func TestPeerKilledMidBlob(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/big", 64<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, UploadLimit: 8 << 20})
	if err := e.timed("a: ctr pull (registry)", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Neighbors: []harness.Neighbor{a.AsNeighbor()}})

	ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
	defer cancel()
	pulled := make(chan error, 1)
	start := time.Now()
	go func() { pulled <- b.PullCtr(ctx, img.Ref) }()

	// A is inside the layer once it has served more than the manifest and
	// config, or once it has been sending a blob for a while: coop adds to
	// its served-bytes counter only when a response ends, so the gauge of
	// active uploads is the live signal (the config blob takes microseconds;
	// at 8 MiB/s, 500 ms is about 4 MiB into the layer).
	const threshold = 1 << 20
	var served float64
	var uploadingSince time.Time
	for {
		select {
		case err := <-pulled:
			t.Fatalf("B's pull ended (err=%v) before A was inside the layer (served %g): the layer did not come from A", err, served)
		case <-time.After(50 * time.Millisecond):
		}
		m, err := a.Metrics(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		served, _ = m.Sum(harness.MetricPeerServedBytes)
		active, _ := m.Sum(harness.MetricActiveUploads)
		switch {
		case active < 1:
			uploadingSince = time.Time{}
		case uploadingSince.IsZero():
			uploadingSince = time.Now()
		}
		if served >= threshold || (!uploadingSince.IsZero() && time.Since(uploadingSince) >= 500*time.Millisecond) {
			break
		}
	}
	reg.ResetCounts()
	if err := a.KillCoop(); err != nil {
		t.Fatal(err)
	}
	e.logf("killed A after %v (served-bytes counter %g; layer %d bytes)", time.Since(start).Round(time.Millisecond), served, img.Layers[0].Size)
	if served >= float64(img.Layers[0].Size) {
		t.Fatalf("A had served the whole layer (%g bytes) before the kill: raise the layer size or lower the upload limit", served)
	}
	if err := <-pulled; err != nil {
		t.Fatalf("B's pull after A died: %v", err)
	}
	e.logf("b: pull done in %v", time.Since(start).Round(time.Millisecond))
	c := reg.Counts()
	if c.BlobGets == 0 || c.BlobBytes == 0 {
		t.Fatalf("registry counts after the kill %+v: the rest of the layer did not come from the registry", c)
	}
	if c.RangeGets > 0 && c.BlobBytes < img.Layers[0].Size {
		t.Logf("the registry finished the layer from a Range resume: %d of %d bytes", c.BlobBytes, img.Layers[0].Size)
	}
	t.Logf("registry after the kill: %+v", c)
	e.requireHolds(b, img.Blobs())
	e.verifyContent(b, "default")
	e.verifyStoreFiles(b)
}

// TestCorruptPeerNeverCommitted: B's only neighbour claims every blob and
// serves random bytes of the right size; the pull succeeds from the registry
// and everything B holds hashes to its digest.
func TestCorruptPeerNeverCommitted(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/corrupt", 2<<20, 2<<20)
	evil := startCorruptPeer(t, img)
	b := e.node(harness.NodeOptions{
		Name:       "b",
		Registries: []harness.Upstream{harness.UpstreamOf(reg)},
		Neighbors:  []harness.Neighbor{{Name: "evil", URL: evil.URL()}},
	})
	reg.ResetCounts()
	if err := e.timed("b: ctr pull (corrupt neighbour)", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	haves, blobGets, bytesOut := evil.counts()
	t.Logf("corrupt peer: %d have requests, %d blob/manifest GETs, %d bytes sent; registry: %+v", haves, blobGets, bytesOut, reg.Counts())
	if haves == 0 {
		t.Fatal("B never asked the corrupt peer: the test proves nothing (is --neighbors wired?)")
	}
	if c := reg.Counts(); c.BlobBytes < img.LayerBytes() {
		t.Fatalf("registry served %d blob bytes, want at least the layers' %d", c.BlobBytes, img.LayerBytes())
	}
	checked := e.verifyContent(b, "default")
	for _, d := range img.Digests() {
		if !contains(checked, d) {
			t.Fatalf("B's containerd does not list %s after the pull", d)
		}
	}
	inv := e.inventory(b)
	for _, d := range inv.Digests() {
		if size, _ := inv.Size(d); !contains(img.Digests(), d) {
			t.Fatalf("B's inventory lists %s (%d bytes), not a blob of the image", d, size)
		}
	}
	e.requireHolds(b, img.Blobs())
	t.Logf("store files checked: %d", e.verifyStoreFiles(b))
}

// TestCoopRestartUnderRunningContainerd: coop restarts (SIGTERM, then
// SIGKILL) while containerd runs; the inventory comes back with the same
// blobs and a new epoch, and containerd pulls and unpacks again.
func TestCoopRestartUnderRunningContainerd(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/restart", 2<<20, 1<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up})
	if err := e.timed("a: ctr pull", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	before := e.inventory(a)

	for i, restart := range []struct {
		name string
		do   func() error
	}{
		{"sigterm", func() error { return a.RestartCoop(e.ctx) }},
		{"sigkill", func() error {
			if err := a.KillCoop(); err != nil {
				return err
			}
			return a.StartCoop(e.ctx)
		}},
	} {
		if err := restart.do(); err != nil {
			t.Fatalf("%s restart: %v", restart.name, err)
		}
		after := e.inventory(a)
		if after.Epoch == before.Epoch {
			t.Fatalf("%s restart: epoch %q unchanged", restart.name, after.Epoch)
		}
		if !sameBlobs(before, after) {
			t.Fatalf("%s restart: inventory before %v, after %v", restart.name, before.Blobs, after.Blobs)
		}
		// containerd reads old content through the restarted proxy...
		e.verifyContent(a, "default")
		// ...and pulls and unpacks a new image through it.
		img2 := e.push(reg, fmt.Sprintf("coop/restart-next-%d", i), 1<<20, int64(i+1)<<20) // its own name: a replaced image's snapshots may be collected
		if err := e.timed("a: pull after "+restart.name+" restart", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img2.Ref) }); err != nil {
			t.Fatalf("pull after %s restart: %v", restart.name, err)
		}
		e.requireHolds(a, img2.Blobs())
		before = e.inventory(a)
	}
	if got := e.snapshotCount(a, "default"); got < len(img.Layers)+4 {
		t.Fatalf("%d snapshots, want %d (three images unpacked)", got, len(img.Layers)+4)
	}
	if err := e.timed("a: crictl pull after restarts", pullTimeout, func(ctx context.Context) error { return a.PullCRI(ctx, img.DigestRef) }); err != nil {
		t.Fatal(err)
	}
}

// TestImageRemoveDropsInventory: `ctr images rm --sync` on A removes the
// layers from A's store; A's inventory and /coop/v1/have drop them, and B
// then gets them from the registry, not from A.
func TestImageRemoveDropsInventory(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/rm", 2<<20, 2<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up})
	if err := e.timed("a: ctr pull", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	have, err := a.Have(e.ctx, img.LayerDigests())
	if err != nil {
		t.Fatal(err)
	}
	if len(have.Blobs) != len(img.Layers) {
		t.Fatalf("before rm, A's have lists %v, want the %d layers", have.Blobs, len(img.Layers))
	}
	seq0 := e.inventory(a).Seq

	if _, err := a.Ctr(e.ctx, "images", "rm", "--sync", img.Ref); err != nil {
		t.Fatal(err)
	}
	// --sync waits for containerd's GC, which deletes through coop; allow
	// a moment for the inventory anyway.
	deadline := time.Now().Add(10 * time.Second)
	for {
		inv := e.inventory(a)
		held := heldOf(inv, img.LayerDigests())
		if len(held) == 0 {
			if inv.Seq <= seq0 {
				t.Fatalf("inventory seq %d after deletes, was %d", inv.Seq, seq0)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10 s after images rm --sync, A's inventory still lists %v", held)
		}
		time.Sleep(100 * time.Millisecond)
	}
	have, err = a.Have(e.ctx, img.LayerDigests())
	if err != nil {
		t.Fatal(err)
	}
	if len(have.Blobs) != 0 {
		t.Fatalf("after rm, A's have still lists %v", have.Blobs)
	}

	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Neighbors: []harness.Neighbor{a.AsNeighbor()}})
	served0 := e.metric(a, harness.MetricPeerServedBytes)
	reg.ResetCounts()
	if err := e.timed("b: ctr pull (A no longer holds)", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	if served := e.metric(a, harness.MetricPeerServedBytes) - served0; served != 0 {
		t.Fatalf("A served %g bytes after dropping the image", served)
	}
	if c := reg.Counts(); c.BlobBytes < img.LayerBytes() {
		t.Fatalf("registry served %d blob bytes, want at least the layers' %d", c.BlobBytes, img.LayerBytes())
	}
	e.verifyContent(b, "default")
}

func contains(ds []digest.Digest, d digest.Digest) bool {
	for _, x := range ds {
		if x == d {
			return true
		}
	}
	return false
}

func heldOf(inv *harness.Inventory, ds []digest.Digest) []digest.Digest {
	var held []digest.Digest
	for _, d := range ds {
		if inv.Has(d) {
			held = append(held, d)
		}
	}
	return held
}

func sameBlobs(a, b *harness.Inventory) bool {
	if len(a.Blobs) != len(b.Blobs) {
		return false
	}
	for _, x := range a.Blobs {
		if size, ok := b.Size(x.Digest); !ok || size != x.Size {
			return false
		}
	}
	return true
}
