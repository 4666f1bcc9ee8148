package main

// P1 and P2: a pull at a destination whose candidates sit behind shaped
// uplinks, in network namespaces (test/cluster), against the physical
// limit: bytes ÷ min(destination downlink, Σ candidate uplinks). The
// destination's downlink is unshaped. The source is a registry and a coop
// node behind the same uplink; the neighbours are coop nodes. Runs:
// traditional (the destination's index is none: the registry only), first
// (--policy first: one candidate, the first found, which is the source),
// stripe (--policy stripe: every candidate), the same in claim mode and in
// observer mode. Each run uses a fresh destination; after its pull, the
// bytes of blobs on the destination's disk (coop's store and containerd's)
// are recorded with the copies of the image they amount to.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/coopnet/coop/test/cluster"
	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
)

const (
	linksPrefix   = "coopbench-"
	linksEnv      = "COOP_BENCH_SHAPED"
	linksOutEnv   = "COOP_BENCH_SHAPED_OUT"
	linksSeed     = 20261128
	mirrorPeerSum = "coop_mirror_peer_bytes_total"
)

type netListener = net.Listener

// shapedSpec is one shaped scenario.
type shapedSpec struct {
	name        string
	description string
	layers      []int64
	holders     []cluster.Host // the source first
}

func shapedSpecs(quick bool) []shapedSpec {
	h := func(name, ip string, mbit int) cluster.Host {
		return cluster.Host{Name: name, IP: cluster.Subnet + ip, Mbit: mbit}
	}
	p1 := []int64{512 * mib}
	p2 := make([]int64, 8)
	for i := range p2 {
		p2[i] = 64 * mib
	}
	if quick {
		p1 = []int64{64 * mib}
		for i := range p2 {
			p2[i] = 8 * mib
		}
	}
	return []shapedSpec{
		{name: "P1", description: "one layer; the source and 3 neighbours hold it, 100 Mbit/s uplink each; destination downlink unshaped",
			layers: p1, holders: []cluster.Host{h("h0", "10", 100), h("h1", "11", 100), h("h2", "12", 100), h("h3", "13", 100)}},
		{name: "P2", description: "8 layers; uplinks 100 (source), 25, 50, 200 Mbit/s; destination downlink unshaped",
			layers: p2, holders: []cluster.Host{h("h0", "10", 100), h("h1", "11", 25), h("h2", "12", 50), h("h3", "13", 200)}},
	}
}

var (
	linksCtl = cluster.Host{Name: "ctl", IP: cluster.Subnet + "254"}
	linksDst = cluster.Host{Name: "dst", IP: cluster.Subnet + "20"}
)

// runShaped builds each scenario's namespaces and runs it inside them.
func runShaped(ctx context.Context, o options, want func(string) bool) ([]Scenario, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("P1 and P2 build network namespaces and start containerd: run as root")
	}
	var out []Scenario
	for _, spec := range shapedSpecs(o.quick) {
		if !want(spec.name) {
			continue
		}
		t, err := cluster.Build(ctx, linksPrefix, append([]cluster.Host{linksCtl, linksDst}, spec.holders...))
		if err != nil {
			return nil, err
		}
		f, err := os.CreateTemp("", "coop-bench-shaped-*.json")
		if err != nil {
			t.Close()
			return nil, err
		}
		f.Close()
		err = t.Reexec(ctx, linksCtl.Name, linksEnv+"="+spec.name, linksOutEnv+"="+f.Name())
		t.Close()
		if err != nil {
			os.Remove(f.Name())
			return nil, fmt.Errorf("%s: %w", spec.name, err)
		}
		b, err := os.ReadFile(f.Name())
		os.Remove(f.Name())
		if err != nil {
			return nil, err
		}
		var s Scenario
		if err := json.Unmarshal(b, &s); err != nil {
			return nil, fmt.Errorf("%s: %w", spec.name, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// shapedInner runs one scenario from inside the control namespace and
// writes it to the file named by linksOutEnv.
func shapedInner(ctx context.Context, o options, name string) error {
	var spec shapedSpec
	for _, s := range shapedSpecs(o.quick) {
		if s.name == name {
			spec = s
		}
	}
	if spec.name == "" {
		return fmt.Errorf("no scenario %q", name)
	}
	tools, err := harness.FindTools(true)
	if err != nil {
		return err
	}
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "  "+format+"\n", args...) }
	imageSpec := harness.ImageSpec{Repo: "coop/shaped", Tag: "v1", LayerSizes: spec.layers, Seed: linksSeed}
	// The holders are seeded from a registry behind no shaping; the
	// destination's registry is the source's, behind the source's uplink.
	seedReg, err := harness.StartRegistry(ctx, harness.RegistryOptions{Addr: linksCtl.IP + ":0"})
	if err != nil {
		return err
	}
	defer seedReg.Close()
	source := spec.holders[0]
	srcReg, err := harness.StartRegistry(ctx, harness.RegistryOptions{Addr: source.IP + ":0", Listen: func(addr string) (netListener, error) {
		return cluster.ListenIn(cluster.PathOf(linksPrefix, source.Name), addr)
	}})
	if err != nil {
		return err
	}
	defer srcReg.Close()
	seedImg, err := seedReg.PushRandomImage(ctx, imageSpec)
	if err != nil {
		return err
	}
	img, err := srcReg.PushRandomImage(ctx, imageSpec)
	if err != nil {
		return err
	}
	if img.Manifest.Digest != seedImg.Manifest.Digest {
		return errors.New("the two registries built different images from one seed")
	}
	bytes := img.LayerBytes() + img.Config.Size + img.Manifest.Size

	var nodes []*harness.Node
	defer func() {
		for _, n := range nodes {
			_ = n.Stop()
		}
	}()
	start := func(h cluster.Host, opts harness.NodeOptions) (*harness.Node, error) {
		opts.Name, opts.NetNS, opts.ListenIP, opts.CoopLogLevel = h.Name, cluster.PathOf(linksPrefix, h.Name), h.IP, "info"
		return harness.StartNode(ctx, tools, opts)
	}
	var neighbours []harness.Neighbor
	var sumMbit int
	for _, h := range spec.holders {
		n, err := start(h, harness.NodeOptions{Registries: []harness.Upstream{harness.UpstreamOf(seedReg)}, Index: "none"})
		if err != nil {
			return err
		}
		nodes = append(nodes, n)
		if err := n.PullCtr(ctx, seedImg.DigestRef); err != nil {
			return fmt.Errorf("seed %s: %w", h.Name, err)
		}
		neighbours = append(neighbours, n.AsNeighbor())
		sumMbit += h.Mbit
	}
	logf("%s: %d holders seeded with %d bytes each", spec.name, len(spec.holders), bytes)

	limit := func(mbit int) float64 { return float64(bytes) / (float64(mbit) * 1e6 / 8) }
	s := Scenario{Name: spec.name, Description: spec.description, Bytes: bytes, LimitSeconds: limit(sumMbit), Target: map[string]float64{"P1": 0.90, "P2": 0.85}[spec.name]}
	for _, r := range []struct {
		label    string
		args     []string
		mbit     int
		claim    bool
		observer bool
	}{
		{label: "traditional", args: []string{"--index", "none"}, mbit: source.Mbit},
		{label: "first", args: []string{"--index", "online", "--policy", "first"}, mbit: source.Mbit},
		{label: "stripe", args: []string{"--index", "online", "--policy", "stripe"}, mbit: sumMbit},
		// Claim mode decides from a local index: periodic, warmed before
		// the clock starts, as on a node that has been up for a while.
		{label: "claim-stripe", args: []string{"--index", "periodic", "--period", "1s", "--policy", "stripe"}, mbit: sumMbit, claim: true},
		{label: "observer-stripe", args: []string{"--index", "online", "--policy", "stripe"}, mbit: sumMbit, observer: true},
	} {
		if o.shapedRuns != "" && !strings.Contains(","+o.shapedRuns+",", ","+r.label+",") {
			continue
		}
		dst, err := start(linksDst, harness.NodeOptions{Registries: []harness.Upstream{harness.UpstreamOf(srcReg)}, Neighbors: neighbours, ExtraCoopArgs: r.args,
			Claim: r.claim, Observer: r.observer})
		if err != nil {
			return err
		}
		if r.claim {
			if err := waitIndexed(ctx, dst, img.Digests()); err != nil {
				_ = dst.Stop()
				return err
			}
		}
		t0 := time.Now()
		pctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		err = dst.PullCtr(pctx, img.DigestRef)
		cancel()
		took := time.Since(t0).Seconds()
		byNode := map[string]int64{}
		if m, merr := dst.Metrics(ctx); merr == nil {
			for _, smp := range m {
				if smp.Name == mirrorPeerSum {
					byNode[smp.Labels["node"]] += int64(smp.Value)
				}
			}
		}
		var disk harness.BlobDisk
		if err == nil {
			disk, err = settledDisk(ctx, dst, logf)
		}
		_ = dst.Stop()
		if err != nil {
			return fmt.Errorf("%s %s: %w", spec.name, r.label, err)
		}
		var fromPeers int64
		for _, v := range byNode {
			fromPeers += v
		}
		if rest := bytes - fromPeers; rest > 0 {
			byNode["registry"] = rest
		}
		run := Run{Label: r.label, Seconds: took, Samples: []float64{took}, LimitSeconds: limit(r.mbit),
			FractionOfLimit: s.LimitSeconds / took, OwnFraction: limit(r.mbit) / took, BytesByNode: byNode,
			BlobDiskBytes: disk.Total(), BlobDiskByStore: map[string]int64{"coop": disk.Coop, "containerd": disk.Containerd},
			Copies: float64(disk.Total()) / float64(bytes)}
		logf("%s %s: %.2f s (limit %.2f s for its candidates, %.2f s for all): %v; blobs on disk %d bytes (coop %d, containerd %d): %.2f copies",
			spec.name, r.label, took, run.LimitSeconds, s.LimitSeconds, byNode, disk.Total(), disk.Coop, disk.Containerd, run.Copies)
		s.Runs = append(s.Runs, run)
	}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(os.Getenv(linksOutEnv), b, 0o644)
}

// printShaped prints the P1/P2 table.
func printShaped(ss []Scenario) {
	fmt.Println()
	fmt.Println("| scenario | run | seconds | limit s (its candidates) | fraction of its limit | limit s (all candidates) | fraction_of_limit | bytes by node | blob_disk_bytes (coop + containerd) | copies | target |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|")
	for _, s := range ss {
		for _, r := range s.Runs {
			target := "—"
			if r.Label == "stripe" || r.Label == "claim-stripe" {
				verdict := "met"
				if r.FractionOfLimit < s.Target {
					verdict = "missed"
				}
				target = fmt.Sprintf("≥ %.2f (%s)", s.Target, verdict)
			}
			var parts []string
			for n, b := range r.BytesByNode {
				parts = append(parts, fmt.Sprintf("%s %.0f MiB", n, float64(b)/mib))
			}
			sort.Strings(parts)
			fmt.Printf("| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %d (%d + %d) | %.2f | %s |\n", s.Name, r.Label, r.Seconds, r.LimitSeconds, r.OwnFraction,
				s.LimitSeconds, r.FractionOfLimit, strings.Join(parts, ", "), r.BlobDiskBytes, r.BlobDiskByStore["coop"], r.BlobDiskByStore["containerd"], r.Copies, target)
		}
	}
}

// Blob disk readings settle when unchanged for diskQuiet; diskLimit bounds
// the wait (observer mode drops coop's copy of a blob on containerd's event
// for it, after the pull may have returned).
const (
	diskQuiet = time.Second
	diskLimit = 5 * time.Second
)

// settledDisk measures the blobs on n's disk once the reading has settled.
func settledDisk(ctx context.Context, n *harness.Node, logf func(string, ...any)) (harness.BlobDisk, error) {
	d, settled, err := n.SettledBlobDisk(ctx, diskQuiet, diskLimit)
	if err != nil {
		return harness.BlobDisk{}, fmt.Errorf("blobs on disk: %w", err)
	}
	if !settled {
		logf("node %s: blobs on disk still changing after %v; last reading %d bytes", n.Name, diskLimit, d.Total())
	}
	return d, nil
}

// waitIndexed waits until n's index knows a holder of every digest.
func waitIndexed(ctx context.Context, n *harness.Node, dgsts []digest.Digest) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := n.Locate(ctx, dgsts)
		if err == nil && len(got) == len(dgsts) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %s: the index knows %d of %d blobs after 30 s (err=%v)", n.Name, len(got), len(dgsts), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
