//go:build integration

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
)

// TestStatus: `coop status` on real nodes says where the bytes came from
// (the registry for the first node, the first node for the second), that
// the neighbour is up, and exits 1 naming the problem once it is down.
func TestStatus(t *testing.T) {
	e := newEnv(t, true)
	for _, observer := range []bool{false, true} {
		mode := map[bool]string{false: "proxy", true: "observer"}[observer]
		t.Run(mode, func(t *testing.T) {
			e := e.sub(t)
			reg := e.registry()
			img := e.push(reg, "coop/status-"+mode, 4<<20, 2<<20)
			up := []harness.Upstream{harness.UpstreamOf(reg)}
			a := e.node(harness.NodeOptions{Name: "a", Registries: up, Observer: observer})
			if err := e.timed("a: ctr pull", pullTimeout, func(ctx context.Context) error { return a.PullCtr(ctx, img.Ref) }); err != nil {
				t.Fatal(err)
			}
			e.eventually("a's inventory lists the image", func() bool { return e.holds(a, img.Blobs()) })
			b := e.node(harness.NodeOptions{Name: "b", Registries: up, Observer: observer, Neighbors: []harness.Neighbor{a.AsNeighbor()}})
			if err := e.timed("b: ctr pull", pullTimeout, func(ctx context.Context) error { return b.PullCtr(ctx, img.DigestRef) }); err != nil {
				t.Fatal(err)
			}

			sa, code, err := a.Status(e.ctx)
			if err != nil || code != 0 {
				t.Fatalf("a's status: exit %d, %v, problems %q", code, err, sa.Problems)
			}
			if sa.ContentMode != mode || sa.TLSNotAfter.Before(time.Now()) {
				t.Fatalf("a's status: mode %q, certificate until %v", sa.ContentMode, sa.TLSNotAfter)
			}
			if sa.Bytes.FromRegistries < img.LayerBytes() {
				t.Errorf("a's status: %d bytes from registries, want at least the layers' %d", sa.Bytes.FromRegistries, img.LayerBytes())
			}
			if sa.Bytes.ServedToPeers < img.LayerBytes() {
				t.Errorf("a's status: served %d bytes to peers, want at least %d", sa.Bytes.ServedToPeers, img.LayerBytes())
			}
			sb, code, err := b.Status(e.ctx)
			if err != nil || code != 0 {
				t.Fatalf("b's status: exit %d, %v, problems %q", code, err, sb.Problems)
			}
			if sb.Bytes.FromPeers["a"] < img.LayerBytes() {
				t.Errorf("b's status: %v bytes from peers, want at least the layers' %d from a", sb.Bytes.FromPeers, img.LayerBytes())
			}
			if sb.Bytes.FromRegistries >= img.LayerBytes() {
				t.Errorf("b's status: %d bytes from registries; the layers came from a", sb.Bytes.FromRegistries)
			}
			if len(sb.Neighbors) != 1 || !sb.Neighbors[0].Up || sb.Neighbors[0].MaxUploads == 0 {
				t.Fatalf("b's neighbours: %+v, want a up with its load", sb.Neighbors)
			}

			if err := a.StopCoop(); err != nil {
				t.Fatal(err)
			}
			sb, code, err = b.Status(e.ctx)
			if err != nil || code != 1 || len(sb.Problems) == 0 || !strings.Contains(strings.Join(sb.Problems, "; "), "none of the 1 neighbours") {
				t.Fatalf("b's status with a down: exit %d (%v), problems %q; want exit 1 naming the neighbour", code, err, sb.Problems)
			}
			if sb.Neighbors[0].Up || sb.Neighbors[0].Error == "" {
				t.Fatalf("b's neighbours with a down: %+v", sb.Neighbors)
			}
		})
	}
	// coop in proxy mode beside a containerd set up for observer mode (its
	// own content store): coop status says so.
	t.Run("proxy beside containerd's own store", func(t *testing.T) {
		e := e.sub(t)
		c := e.node(harness.NodeOptions{Name: "c", Observer: true, ExtraCoopArgs: []string{"--content-mode", "proxy"}})
		s, code, err := c.Status(e.ctx)
		if err != nil || code != 1 || !strings.Contains(strings.Join(s.Problems, "; "), "containerd runs its own content store") {
			t.Fatalf("status: exit %d (%v), mode %q, problems %q; want exit 1 naming containerd's own store", code, err, s.ContentMode, s.Problems)
		}
	})
}
