//go:build integration

package e2e

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/coopnet/coop/test/cluster"
	"github.com/coopnet/coop/test/harness"
)

const linksInside = "COOP_E2E_LINKS_INSIDE"

// insideNamespaces says whether this test runs inside the control host
// ctl's namespace of a topology of hosts. When not, it builds the topology,
// runs the test again inside ctl (which reaches every host, with envKey
// set), logs what it printed, fails when it failed, and tears the topology
// down: the caller returns.
func (e *env) insideNamespaces(prefix, envKey, ctl string, hosts []cluster.Host) bool {
	t := e.t
	t.Helper()
	if os.Getenv(envKey) != "" {
		return true
	}
	topo, err := cluster.Build(e.ctx, prefix, hosts)
	if err != nil {
		t.Fatal(err)
	}
	defer topo.Close()
	bin, args := topo.InNS(ctl, os.Args[0], "-test.run", "^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd := exec.CommandContext(e.ctx, bin, args...)
	cmd.Env = append(os.Environ(), envKey+"=1")
	out, err := cmd.CombinedOutput()
	t.Logf("inside the namespaces:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	return false
}

// TestStripeOnShapedLinks: a striped pull from three peers behind 40, 80
// and 160 Mbit/s uplinks, in network namespaces. Every byte arrives (the
// content verifies), the fastest peer sends more than the slowest, and a
// peer killed in the middle of the pull does not break it. No timing is
// asserted.
func TestStripeOnShapedLinks(t *testing.T) {
	e := newEnv(t, true)
	const prefix = "coope2e-"
	ctl := cluster.Host{Name: "ctl", IP: cluster.Subnet + "254"}
	dst := cluster.Host{Name: "dst", IP: cluster.Subnet + "20"}
	peersH := []cluster.Host{{Name: "p40", IP: cluster.Subnet + "11", Mbit: 40}, {Name: "p80", IP: cluster.Subnet + "12", Mbit: 80}, {Name: "p160", IP: cluster.Subnet + "13", Mbit: 160}}
	if !e.insideNamespaces(prefix, linksInside, ctl.Name, append([]cluster.Host{ctl, dst}, peersH...)) {
		return
	}

	reg, err := harness.StartRegistry(e.ctx, harness.RegistryOptions{Addr: ctl.IP + ":0", Logf: e.logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })
	img := e.push(reg, "coop/links", 48<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	node := func(h cluster.Host, opts harness.NodeOptions) *harness.Node {
		opts.Name, opts.NetNS, opts.ListenIP = h.Name, cluster.PathOf(prefix, h.Name), h.IP
		return e.node(opts)
	}
	var holders []*harness.Node
	var neighbours []harness.Neighbor
	for _, h := range peersH {
		n := node(h, harness.NodeOptions{Registries: up, Index: "none"})
		if err := n.PullCtr(e.ctx, img.DigestRef); err != nil {
			t.Fatal(err)
		}
		holders = append(holders, n)
		neighbours = append(neighbours, n.AsNeighbor())
	}
	if err := reg.Stop(); err != nil { // from now on, peers only
		t.Fatal(err)
	}

	// 1. Every byte, and bytes per peer follow bandwidth.
	d1 := node(dst, harness.NodeOptions{Registries: up, Neighbors: neighbours})
	if err := e.timed("striped pull", pullTimeout, func(ctx context.Context) error { return d1.PullCtr(ctx, img.DigestRef) }); err != nil {
		t.Fatal(err)
	}
	e.verifyContent(d1, "default")
	e.requireHolds(d1, img.Blobs())
	slow := e.metric(d1, "coop_mirror_peer_bytes_total", "node", "p40")
	fast := e.metric(d1, "coop_mirror_peer_bytes_total", "node", "p160")
	mid := e.metric(d1, "coop_mirror_peer_bytes_total", "node", "p80")
	t.Logf("bytes from p40 %.0f, p80 %.0f, p160 %.0f", slow, mid, fast)
	if fast <= slow || slow+mid+fast < float64(img.LayerBytes()) {
		t.Fatalf("bytes by peer p40 %.0f, p80 %.0f, p160 %.0f: want all %d bytes, the 160 Mbit/s peer ahead of the 40", slow, mid, fast, img.LayerBytes())
	}
	if err := d1.Stop(); err != nil {
		t.Fatal(err)
	}

	// 2. The fastest peer dies mid-pull: the others finish it.
	d2 := node(dst, harness.NodeOptions{Registries: up, Neighbors: neighbours})
	ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- d2.PullCtr(ctx, img.DigestRef) }()
	for {
		select {
		case err := <-done:
			t.Fatalf("pull ended (%v) before p160 was killed", err)
		case <-time.After(20 * time.Millisecond):
		}
		if got, _ := d2.Metric(e.ctx, "coop_mirror_peer_bytes_total", "node", "p160"); got > 4<<20 {
			break
		}
	}
	if err := holders[2].KillCoop(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("pull after p160 died: %v", err)
	}
	e.verifyContent(d2, "default")
	e.requireHolds(d2, img.Blobs())
}
