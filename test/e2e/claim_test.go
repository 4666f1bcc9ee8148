//go:build integration

package e2e

import (
	"context"
	"testing"

	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
)

// claimPeriod is the periodic index's poll period in the claim tests: the
// claim decision is taken from it.
const claimPeriod = "500ms"

// claimNode starts a node with --claim and the periodic index over nbs.
func (e *env) claimNode(name string, up []harness.Upstream, nbs ...harness.Neighbor) *harness.Node {
	e.t.Helper()
	return e.node(harness.NodeOptions{Name: name, Registries: up, Neighbors: nbs, Claim: true, Index: "periodic",
		ExtraCoopArgs: []string{"--period", claimPeriod}})
}

// waitKnown waits until n's index knows a holder of every digest.
func (e *env) waitKnown(n *harness.Node, dgsts []digest.Digest) {
	e.t.Helper()
	e.eventually("the index knows every blob", func() bool {
		got, err := n.Locate(e.ctx, dgsts)
		if err != nil {
			e.t.Fatal(err)
		}
		return len(got) == len(dgsts)
	})
}

func (e *env) claims(n *harness.Node, result string) float64 {
	e.t.Helper()
	m, err := n.Metrics(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	v, _ := m.Sum(harness.MetricClaims, "result", result)
	return v
}

// intoClaim waits until n has received 4 MiB more than before from its peers
// (a claim is under way, well short of its end at 16 MiB/s for 48 MiB).
func (e *env) intoClaim(n *harness.Node, before float64) {
	e.t.Helper()
	e.eventually("4 MiB of the claimed layer received", func() bool {
		return e.metric(n, harness.MetricMirrorPeerBytes) >= before+4<<20
	})
}

// TestClaimedPulls: B claims every blob A holds at containerd's Info and
// unpacks it as it streams in, through ctr and through CRI; the registry
// serves no blob; two namespaces pulling the same image at once share the
// claims.
func TestClaimedPulls(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img1 := e.push(reg, "coop/claim1", 4<<20, 8<<20)
	img2 := e.push(reg, "coop/claim2", 6<<20)
	img3 := e.push(reg, "coop/claim3", 3<<20, 1<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up})
	for _, img := range []*harness.Image{img1, img2, img3} {
		if err := e.timed("a: ctr pull "+img.Ref, pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
			t.Fatal(err)
		}
	}
	b := e.claimNode("b", up, a.AsNeighbor())
	var all []digest.Digest
	for _, img := range []*harness.Image{img1, img2, img3} {
		all = append(all, img.Digests()...)
	}
	e.waitKnown(b, all)
	reg.ResetCounts()

	// ctr.
	if err := e.timed("b: ctr pull (claimed)", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img1.Ref) }); err != nil {
		t.Fatal(err)
	}
	if done := e.claims(b, "done"); done < float64(len(img1.Layers)) {
		t.Fatalf("claims done after the ctr pull = %g, want at least the %d layers", done, len(img1.Layers))
	}
	if snaps := e.snapshotCount(b, "default"); snaps < len(img1.Layers) {
		t.Fatalf("%d snapshots after the claimed pull, want the %d layers unpacked", snaps, len(img1.Layers))
	}

	// Two namespaces at once: one claim per blob.
	made := e.claims(b, "made")
	var g errgroup.Group
	for _, ns := range []string{"one", "two"} {
		g.Go(func() error {
			ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
			defer cancel()
			_, err := b.CtrNamespace(ctx, ns, "image", "pull", "--hosts-dir", b.HostsDir, img2.Ref)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("concurrent claimed pulls: %v", err)
	}
	// Blobs under 1 MiB (the manifest, the config) go the mirror's way.
	claimable := 0
	for _, bl := range img2.Blobs() {
		if bl.Size >= 1<<20 {
			claimable++
		}
	}
	if got := e.claims(b, "made") - made; got != float64(claimable) {
		t.Fatalf("concurrent pulls of one image made %g claims, want one per blob of 1 MiB or more (%d)", got, claimable)
	}

	// CRI.
	if err := e.timed("b: crictl pull (claimed)", pullTimeout, func(ctx context.Context) error { return b.PullCRI(ctx, img3.Ref) }); err != nil {
		t.Fatal(err)
	}

	if c := reg.Counts(); c.BlobGets != 0 {
		t.Fatalf("the registry served blobs (%+v): the claims did not take them", c)
	}
	if f := e.claims(b, "failed"); f != 0 {
		t.Fatalf("%g claims failed", f)
	}
	// The configs (under 1 MiB) came through the mirror, every layer by a claim.
	small := map[digest.Digest]bool{}
	for _, img := range []*harness.Image{img1, img2, img3} {
		for _, bl := range append([]harness.Blob{img.Config}, img.Layers...) {
			if bl.Size < 1<<20 {
				small[bl.Digest] = true
			}
		}
	}
	if hits := e.metric(b, harness.MetricMirrorRequests, "kind", "blob", "result", "hit"); hits != float64(len(small)) {
		t.Fatalf("the mirror fetched %g blobs, want the %d under 1 MiB: the claims did not take the others", hits, len(small))
	}
	for _, ns := range []string{"default", "one", "two", "k8s.io"} {
		e.verifyContent(b, ns)
	}
	e.requireHolds(b, append(append(img1.Blobs(), img2.Blobs()...), img3.Blobs()...))
	t.Logf("store files checked: %d", e.verifyStoreFiles(b))
}

// TestClaimSurvivesGC: containerd's garbage collector runs while a claimed
// layer is still arriving; the claim is referenced and survives.
func TestClaimSurvivesGC(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	big := e.push(reg, "coop/claimgc", 48<<20)
	other := e.push(reg, "coop/other", 1<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, UploadLimit: 16 << 20})
	if err := e.timed("a: ctr pull", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, big.Ref) }); err != nil {
		t.Fatal(err)
	}
	b := e.claimNode("b", up, a.AsNeighbor())
	if err := b.PullCtr(e.ctx, other.Ref); err != nil {
		t.Fatal(err)
	}
	e.waitKnown(b, big.Digests())
	reg.ResetCounts()
	pulled := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
		defer cancel()
		pulled <- b.PullCtr(ctx, big.Ref)
	}()
	e.eventually("the layer claimed", func() bool { return e.claims(b, "made") >= 1 })
	e.intoClaim(b, 0) // the GC runs while the layer streams in (3 s at 16 MiB/s)
	if _, err := b.Ctr(e.ctx, "image", "rm", "--sync", other.Ref); err != nil {
		t.Fatal(err)
	}
	if err := <-pulled; err != nil {
		t.Fatalf("claimed pull with a GC in the middle: %v", err)
	}
	if c := e.claims(b, "cancelled") + e.claims(b, "failed"); c != 0 {
		t.Fatalf("%g claims cancelled or failed: the GC took a claimed blob", c)
	}
	e.verifyContent(b, "default")
	e.requireHolds(b, big.Blobs())
	if inv := e.inventory(b); inv.Has(other.Layers[0].Digest) {
		t.Fatal("the GC did not delete the removed image's layer: it did not run")
	}
}

// TestClaimFailsThenRetrySucceeds: the only peer dies in the middle of a
// claimed layer; the pull fails, containerd forgets the claim, and the
// retried pull completes from the registry with nothing corrupt. Then coop
// itself is killed in the middle of a claim and restarted: the retry
// completes too.
func TestClaimFailsThenRetrySucceeds(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/claimfail", 48<<20)
	img2 := e.push(reg, "coop/claimrestart", 48<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, UploadLimit: 16 << 20})
	for _, im := range []*harness.Image{img, img2} {
		if err := a.PullCtr(e.ctx, im.Ref); err != nil {
			t.Fatal(err)
		}
	}
	// Without the registry as the claims' fallback (--claim-registry=false;
	// with it, TestFailureMatrix): a failed claim fails its pull once.
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Neighbors: []harness.Neighbor{a.AsNeighbor()}, Claim: true, Index: "periodic",
		ExtraCoopArgs: []string{"--period", claimPeriod, "--claim-registry=false"}})
	e.waitKnown(b, append(img.Digests(), img2.Digests()...))

	// The peer dies.
	pulled := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
		defer cancel()
		pulled <- b.PullCtr(ctx, img.Ref)
	}()
	e.eventually("the layer claimed", func() bool { return e.claims(b, "made") >= 1 })
	e.intoClaim(b, 0)
	if err := a.KillCoop(); err != nil {
		t.Fatal(err)
	}
	first := <-pulled
	t.Logf("first pull with the peer killed: %v", first)
	if first == nil && e.claims(b, "failed") == 0 {
		t.Fatal("the pull succeeded with no failed claim: the peer was killed too late to test anything")
	}
	if err := e.timed("b: retried pull", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatalf("retry after a failed claim: %v", err)
	}
	e.verifyContent(b, "default")
	e.requireHolds(b, img.Blobs())
	e.verifyStoreFiles(b)

	// coop itself restarts in the middle of a claim.
	if err := a.StartCoop(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.waitKnown(b, img2.Digests())
	made := e.claims(b, "made")
	got := e.metric(b, harness.MetricMirrorPeerBytes)
	go func() {
		ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
		defer cancel()
		pulled <- b.PullCtr(ctx, img2.Ref)
	}()
	e.eventually("the second layer claimed", func() bool { return e.claims(b, "made") > made })
	e.intoClaim(b, got)
	if err := b.KillCoop(); err != nil {
		t.Fatal(err)
	}
	if err := b.StartCoop(e.ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("pull with coop killed under it: %v", <-pulled)
	if err := e.timed("b: pull after coop restarted", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img2.Ref) }); err != nil {
		t.Fatalf("pull after coop restarted mid-claim: %v", err)
	}
	e.verifyContent(b, "default")
	e.requireHolds(b, img2.Blobs())
	e.verifyStoreFiles(b)
}
