package main

// P4 at 1 Gbit/s: the registry sits behind a tbf-shaped 1 Gbit/s uplink,
// closer to a real node's than loopback; a fresh destination pulls one
// 256 MiB layer through ctr, with containerd's built-in store and with coop
// in its default mode, alternated. It runs inside network namespaces, like
// P1 and P2.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/coopnet/coop/test/cluster"
	"github.com/coopnet/coop/test/harness"
)

const (
	p4ShapedPrefix = "coopp4-"
	p4ShapedEnv    = "COOP_BENCH_P4SHAPED"
	p4ShapedOutEnv = "COOP_BENCH_P4SHAPED_OUT"
	p4ShapedMbit   = 1000
)

var (
	p4Ctl = cluster.Host{Name: "ctl", IP: cluster.Subnet + "254"}
	p4Reg = cluster.Host{Name: "reg", IP: cluster.Subnet + "10", Mbit: p4ShapedMbit}
	p4Dst = cluster.Host{Name: "dst", IP: cluster.Subnet + "20"}
)

// runP4Shaped builds the namespaces and runs the scenario inside them.
func runP4Shaped(ctx context.Context, o options) (Scenario, error) {
	if os.Geteuid() != 0 {
		return Scenario{}, fmt.Errorf("P4 at 1 Gbit/s builds network namespaces and starts containerd: run as root")
	}
	return scenarioInNamespaces(ctx, p4ShapedPrefix, []cluster.Host{p4Ctl, p4Reg, p4Dst}, p4Ctl.Name, p4ShapedEnv, p4ShapedOutEnv, "P4-1gbit")
}

// p4ShapedInner runs inside the control namespace.
func p4ShapedInner(ctx context.Context, o options) error {
	tools, err := harness.FindTools(true)
	if err != nil {
		return err
	}
	reg, err := harness.StartRegistry(ctx, harness.RegistryOptions{Addr: p4Reg.IP + ":0", Listen: func(addr string) (netListener, error) {
		return cluster.ListenIn(cluster.PathOf(p4ShapedPrefix, p4Reg.Name), addr)
	}})
	if err != nil {
		return err
	}
	defer reg.Close()
	layers := []int64{256 * mib}
	if o.quick {
		layers = []int64{64 * mib}
	}
	img, err := reg.PushRandomImage(ctx, harness.ImageSpec{Repo: "bench/p4-1gbit", LayerSizes: layers})
	if err != nil {
		return err
	}
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	opts := func(name string) harness.NodeOptions {
		return harness.NodeOptions{Name: name, Registries: up, NetNS: cluster.PathOf(p4ShapedPrefix, p4Dst.Name), ListenIP: p4Dst.IP}
	}
	pull := func(n *harness.Node) error { return n.PullCtr(ctx, img.Ref) }
	var builtinCPU, coopCPU cpuTally
	builtin := func() (float64, error) {
		o := opts("p4-builtin")
		o.Plain = true
		return timedPull(ctx, tools, o, pull, &builtinCPU)
	}
	coop := func() (float64, error) {
		o := opts("p4-coop")
		o.Default = true
		return timedPull(ctx, tools, o, pull, &coopCPU)
	}
	runs, err := compare(ctx, o.runs, builtin, coop, "built-in store", "coop default")
	if err != nil {
		return err
	}
	builtinCPU.perGiB(&runs[0], img.TotalBytes())
	coopCPU.perGiB(&runs[1], img.TotalBytes())
	runs[1].Default = true
	limit := float64(img.TotalBytes()) / (float64(p4ShapedMbit) * 1e6 / 8)
	for i := range runs {
		runs[i].LimitSeconds = limit
	}
	s := Scenario{
		Name:        "P4-1gbit-ctr",
		Description: fmt.Sprintf("pull+unpack of a %d MiB layer through ctr, the registry behind a 1 Gbit/s uplink: coop in its default mode vs the built-in store", img.LayerBytes()/mib),
		Bytes:       img.TotalBytes(),
		Runs:        runs,
		Ratio:       runs[1].Seconds / runs[0].Seconds,
		Target:      1.05,
	}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(os.Getenv(p4ShapedOutEnv), b, 0o644)
}
