//go:build integration

package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/coopnet/coop/test/cluster"
	"github.com/coopnet/coop/test/harness"
)

const swarmInside = "COOP_E2E_SWARM_INSIDE"

// swarmPeerPort is every node's peer port in TestSwarmBurst: each has its
// own address, so the nodes know each other before they start.
const swarmPeerPort = 5050

// TestSwarmBurst: four destinations pull one image at the same instant from
// a source node, every uplink shaped to 100 Mbit/s, in network namespaces,
// the registry gone; in observer mode and in claim mode. Every destination
// completes and every blob verifies; the destinations uploaded to each
// other; the source sent fewer bytes than four images. No timing is
// asserted (make bench P5 measures it).
func TestSwarmBurst(t *testing.T) {
	e := newEnv(t, true)
	const prefix = "coopsw-"
	ctl := cluster.Host{Name: "ctl", IP: cluster.Subnet + "254"}
	src := cluster.Host{Name: "src", IP: cluster.Subnet + "10", Mbit: 100}
	var dsts []cluster.Host
	for i := range 4 {
		dsts = append(dsts, cluster.Host{Name: fmt.Sprintf("d%d", i+1), IP: fmt.Sprintf("%s%d", cluster.Subnet, 21+i), Mbit: 100})
	}
	if !e.insideNamespaces(prefix, swarmInside, ctl.Name, append([]cluster.Host{ctl, src}, dsts...)) {
		return
	}

	reg, err := harness.StartRegistry(e.ctx, harness.RegistryOptions{Addr: ctl.IP + ":0", Logf: e.logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })
	img := e.push(reg, "coop/swarm", 24<<20, 8<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	neighbour := func(h cluster.Host) harness.Neighbor {
		return harness.Neighbor{Name: h.Name, URL: fmt.Sprintf("%s%s:%d", e.pki.Scheme(), h.IP, swarmPeerPort)}
	}
	node := func(h cluster.Host, opts harness.NodeOptions) *harness.Node {
		opts.Name, opts.NetNS, opts.ListenIP, opts.PeerPort = h.Name, cluster.PathOf(prefix, h.Name), h.IP, swarmPeerPort
		opts.Registries = up
		return e.node(opts)
	}
	source := node(src, harness.NodeOptions{Index: "none"})
	if err := source.PullCtr(e.ctx, img.DigestRef); err != nil {
		t.Fatal(err)
	}
	if err := reg.Stop(); err != nil { // the source node alone holds the image
		t.Fatal(err)
	}
	image := float64(img.LayerBytes())

	for _, mode := range []struct {
		name string
		opts harness.NodeOptions
	}{
		{"observer", harness.NodeOptions{Observer: true}},
		{"claim", harness.NodeOptions{Claim: true}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			e := e.sub(t)
			servedBefore := e.metric(source, "coop_peer_served_bytes_total")
			var nodes []*harness.Node
			for _, d := range dsts {
				o := mode.opts
				o.Index = "online"
				o.Neighbors = []harness.Neighbor{neighbour(src)}
				for _, other := range dsts {
					if other != d {
						o.Neighbors = append(o.Neighbors, neighbour(other))
					}
				}
				nodes = append(nodes, node(d, o))
			}
			// At the same instant.
			start := make(chan struct{})
			errs := make([]error, len(nodes))
			var wg sync.WaitGroup
			for i, n := range nodes {
				wg.Go(func() {
					<-start
					errs[i] = e.timed("pull at "+n.Name, pullTimeout, func(ctx context.Context) error { return n.PullCtr(ctx, img.DigestRef) })
				})
			}
			close(start)
			wg.Wait()
			var uploaded float64
			for i, n := range nodes {
				if errs[i] != nil {
					t.Fatalf("%s: %v", n.Name, errs[i])
				}
				e.verifyContent(n, "default")
				e.requireHolds(n, img.Blobs())
				up := e.metric(n, "coop_peer_served_bytes_total")
				uploaded += up
				t.Logf("%s uploaded %.1f MiB", n.Name, up/(1<<20))
			}
			sent := e.metric(source, "coop_peer_served_bytes_total") - servedBefore
			t.Logf("the source sent %.2f images; the destinations uploaded %.2f", sent/image, uploaded/image)
			if uploaded < image/4 {
				t.Errorf("the destinations uploaded %.0f bytes to each other, want at least a quarter image (%.0f)", uploaded, image/4)
			}
			if sent >= float64(len(nodes))*image {
				t.Errorf("the source sent %.0f bytes, as much as %d images", sent, len(nodes))
			}
			for _, n := range nodes {
				if err := n.Stop(); err != nil {
					t.Error(err)
				}
			}
		})
	}
}
