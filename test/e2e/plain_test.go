//go:build integration

package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
)

// TestPlainContainerdBaseline checks the harness itself, without coop: a
// containerd with its built-in content store pulls from the loopback
// registry through ctr and through CRI (the benchmarks' baseline).
func TestPlainContainerdBaseline(t *testing.T) {
	e := newEnv(t, false)
	reg := e.registry()
	img := e.push(reg, "coop/plain", 2<<20, 1<<20)
	n := e.node(harness.NodeOptions{Name: "plain", Plain: true, Registries: []harness.Upstream{harness.UpstreamOf(reg)}})

	reg.ResetCounts()
	if err := e.timed("plain: ctr pull", 2*time.Minute, func(ctx context.Context) error { return n.PullCtr(ctx, img.Ref) }); err != nil {
		t.Fatal(err)
	}
	if got := reg.Counts().BlobGets; got < int64(len(img.Layers))+1 {
		t.Fatalf("registry served %d blob GETs, want at least %d", got, len(img.Layers)+1)
	}
	if got := e.snapshotCount(n, "default"); got < len(img.Layers) {
		t.Fatalf("%d snapshots after ctr pull, want %d (unpacked layers)", got, len(img.Layers))
	}
	if err := e.timed("plain: crictl pull", 2*time.Minute, func(ctx context.Context) error { return n.PullCRI(ctx, img.DigestRef) }); err != nil {
		t.Fatal(err)
	}
	out, err := n.Crictl(e.ctx, "images", "--digests")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("crictl images:\n%s", out)
	if got := e.snapshotCount(n, "k8s.io"); got < len(img.Layers) {
		t.Fatalf("%d snapshots in k8s.io after crictl pull, want %d", got, len(img.Layers))
	}
	e.verifyContent(n, "default")
}
