package main

// P1 and P2: a pull at a destination whose candidates sit behind shaped
// uplinks, in network namespaces (test/cluster), against the physical
// limit: bytes ÷ min(destination downlink, Σ candidate uplinks). The
// destination's downlink is unshaped. The source is a registry and a coop
// node behind the same uplink; the neighbours are coop nodes. Runs:
// traditional (the destination's index is none: the registry only), first
// (--policy first: one candidate, the first found, which is the source),
// stripe (--policy stripe: every candidate), the same in claim mode and in
// observer mode, and stripe, claim and observer again over mutual TLS
// (labels with -tls: a second set of holders with certificates of one CA,
// seeded as the first, and a destination with one of its own; the two sets
// are up together, idle but for the runs against them, so that each TLS run
// follows its plain twin). Each run uses a fresh destination; after its
// pull, the bytes of blobs on the destination's disk (coop's store and
// containerd's) are recorded with the copies of the image they amount to,
// and the holders' coop processes' CPU time over the pull, per GiB their
// peer servers sent.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
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
		s, err := scenarioInNamespaces(ctx, linksPrefix, append([]cluster.Host{linksCtl, linksDst}, spec.holders...), linksCtl.Name, linksEnv, linksOutEnv, spec.name)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// scenarioInNamespaces builds a topology of hosts, runs this program again
// inside host ctl with envKey=name and outKey naming a file, and returns
// the scenario it wrote there. The namespaces go whatever happens.
func scenarioInNamespaces(ctx context.Context, prefix string, hosts []cluster.Host, ctl, envKey, outKey, name string) (Scenario, error) {
	t, err := cluster.Build(ctx, prefix, hosts)
	if err != nil {
		return Scenario{}, err
	}
	defer t.Close()
	f, err := os.CreateTemp("", "coop-bench-"+name+"-*.json")
	if err != nil {
		return Scenario{}, err
	}
	f.Close()
	defer os.Remove(f.Name())
	if err := t.Reexec(ctx, ctl, envKey+"="+name, outKey+"="+f.Name()); err != nil {
		return Scenario{}, fmt.Errorf("%s: %w", name, err)
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		return Scenario{}, err
	}
	var s Scenario
	if err := json.Unmarshal(b, &s); err != nil {
		return Scenario{}, fmt.Errorf("%s: %w", name, err)
	}
	return s, nil
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
	var sumMbit int
	for _, h := range spec.holders {
		sumMbit += h.Mbit
	}
	type shapedRun struct {
		label    string
		args     []string
		mbit     int
		claim    bool
		observer bool
		tls      bool
		dflt     bool // coop's defaults: no mode flag
	}
	stripe := []string{"--index", "online", "--policy", "stripe"}
	// Claim mode decides from a local index: periodic, warmed before the
	// clock starts, as on a node that has been up for a while.
	claimStripe := []string{"--index", "periodic", "--period", "1s", "--policy", "stripe"}
	var runs []shapedRun
	for _, r := range []shapedRun{
		{label: "traditional", args: []string{"--index", "none"}, mbit: source.Mbit},
		{label: "first", args: []string{"--index", "online", "--policy", "first"}, mbit: source.Mbit},
		{label: "stripe", args: stripe, mbit: sumMbit},
		{label: "stripe-tls", args: stripe, mbit: sumMbit, tls: true},
		{label: "claim-stripe", args: claimStripe, mbit: sumMbit, claim: true},
		{label: "claim-stripe-tls", args: claimStripe, mbit: sumMbit, claim: true, tls: true},
		{label: "observer-stripe", args: stripe, mbit: sumMbit, observer: true},
		{label: "observer-stripe-tls", args: stripe, mbit: sumMbit, observer: true, tls: true},
		{label: "default", mbit: sumMbit, dflt: true},
		{label: "default-tls", mbit: sumMbit, dflt: true, tls: true},
	} {
		if o.shapedRuns == "" || strings.Contains(","+o.shapedRuns+",", ","+r.label+",") {
			runs = append(runs, r)
		}
	}
	// The holders, plain and with certificates, each set seeded only if a
	// run needs it.
	seed := func(tls bool) (*holderSet, error) {
		hs := &holderSet{}
		if tls {
			dir, err := os.MkdirTemp("", "coop-bench-pki-")
			if err != nil {
				return nil, err
			}
			hs.pkiDir = dir
			if hs.pki, err = harness.NewPKI(dir); err != nil {
				return hs, err
			}
		}
		for _, h := range spec.holders {
			n, err := start(h, harness.NodeOptions{Registries: []harness.Upstream{harness.UpstreamOf(seedReg)}, Index: "none", PKI: hs.pki})
			if err != nil {
				return hs, err
			}
			nodes = append(nodes, n)
			if err := n.PullCtr(ctx, seedImg.DigestRef); err != nil {
				return hs, fmt.Errorf("seed %s: %w", h.Name, err)
			}
			hs.nodes, hs.pids = append(hs.nodes, n), append(hs.pids, n.CoopPID())
			hs.neighbours = append(hs.neighbours, n.AsNeighbor())
		}
		logf("%s: %d holders seeded with %d bytes each (tls %v)", spec.name, len(spec.holders), bytes, tls)
		return hs, nil
	}
	sets := map[bool]*holderSet{}
	defer func() {
		for _, hs := range sets {
			if hs != nil && hs.pkiDir != "" {
				os.RemoveAll(hs.pkiDir)
			}
		}
	}()
	for _, r := range runs {
		if _, ok := sets[r.tls]; ok {
			continue
		}
		hs, err := seed(r.tls)
		sets[r.tls] = hs
		if err != nil {
			return err
		}
	}

	limit := func(mbit int) float64 { return float64(bytes) / (float64(mbit) * 1e6 / 8) }
	s := Scenario{Name: spec.name, Description: spec.description, Bytes: bytes, LimitSeconds: limit(sumMbit), Target: map[string]float64{"P1": 0.90, "P2": 0.85}[spec.name]}
	for _, r := range runs {
		hs := sets[r.tls]
		dst, err := start(linksDst, harness.NodeOptions{Registries: []harness.Upstream{harness.UpstreamOf(srcReg)}, Neighbors: hs.neighbours, ExtraCoopArgs: r.args,
			Claim: r.claim, Observer: r.observer, Default: r.dflt, PKI: hs.pki})
		if err != nil {
			return err
		}
		if r.claim {
			if err := waitIndexed(ctx, dst, img.Digests()); err != nil {
				_ = dst.Stop()
				return err
			}
		}
		// The holders' CPU time is read right around the pull, the metric
		// scrapes outside that window.
		servedBefore, err := hs.served(ctx)
		var cpuBefore float64
		if err == nil {
			cpuBefore, err = hs.cpuSeconds()
		}
		if err != nil {
			_ = dst.Stop()
			return err
		}
		t0 := time.Now()
		pctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		err = dst.PullCtr(pctx, img.DigestRef)
		cancel()
		took := time.Since(t0).Seconds()
		cpuAfter, cerr := hs.cpuSeconds()
		servedAfter, serr := hs.served(ctx)
		if err == nil {
			err = errors.Join(cerr, serr)
		}
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
		cpu, served := cpuAfter-cpuBefore, servedAfter-servedBefore
		run := Run{Label: r.label, Seconds: took, Samples: []float64{took}, LimitSeconds: limit(r.mbit),
			FractionOfLimit: s.LimitSeconds / took, OwnFraction: limit(r.mbit) / took, BytesByNode: byNode,
			BlobDiskBytes: disk.Total(), BlobDiskByStore: map[string]int64{"coop": disk.Coop, "containerd": disk.Containerd},
			Copies: float64(disk.Total()) / float64(bytes), TLS: r.tls, ServerCPUSeconds: cpu, ServedBytes: served, Default: r.dflt}
		if served > 0 {
			run.ServerCPUSecondsPerGiB = cpu / (float64(served) / gib)
		}
		logf("%s %s: %.2f s (limit %.2f s for its candidates, %.2f s for all): %v; blobs on disk %d bytes (coop %d, containerd %d): %.2f copies; holders' coop %.2f CPU s for %d bytes served (%.2f s/GiB)",
			spec.name, r.label, took, run.LimitSeconds, s.LimitSeconds, byNode, disk.Total(), disk.Coop, disk.Containerd, run.Copies, cpu, served, run.ServerCPUSecondsPerGiB)
		s.Runs = append(s.Runs, run)
	}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(os.Getenv(linksOutEnv), b, 0o644)
}

// tlsCostTarget is the most mutual TLS may cost a run, in fraction of the
// limit against the same run in plain HTTP.
const tlsCostTarget = 0.03

// printShaped prints the P1/P2 table and what TLS cost each mode.
func printShaped(ss []Scenario) {
	fmt.Println()
	fmt.Println("| scenario | run | tls | seconds | limit s (its candidates) | fraction of its limit | limit s (all candidates) | fraction_of_limit | bytes by node | blob_disk_bytes (coop + containerd) | copies | server CPU s/GiB | target |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
	for _, s := range ss {
		for _, r := range s.Runs {
			target := "—"
			if base := strings.TrimSuffix(r.Label, "-tls"); base == "stripe" || base == "claim-stripe" {
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
			tls, cpu := "no", "—"
			if r.TLS {
				tls = "yes"
			}
			if r.ServerCPUSecondsPerGiB > 0 {
				cpu = fmt.Sprintf("%.2f", r.ServerCPUSecondsPerGiB)
			}
			fmt.Printf("| %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %d (%d + %d) | %.2f | %s | %s |\n", s.Name, r.Label, tls, r.Seconds, r.LimitSeconds, r.OwnFraction,
				s.LimitSeconds, r.FractionOfLimit, strings.Join(parts, ", "), r.BlobDiskBytes, r.BlobDiskByStore["coop"], r.BlobDiskByStore["containerd"], r.Copies, cpu, target)
		}
	}
	for _, s := range ss {
		if line := tlsCost(s); line != "" {
			fmt.Printf("\n%s %s\n", s.Name, line)
		}
	}
}

// tlsCost compares each run that has a -tls twin in s with it: fraction of
// the limit and the holders' CPU per GiB, plain -> TLS ("" when no run has
// a twin).
func tlsCost(s Scenario) string {
	byLabel := map[string]Run{}
	for _, r := range s.Runs {
		byLabel[r.Label] = r
	}
	var parts []string
	for _, m := range []struct{ name, label string }{{"stripe", "stripe"}, {"claim", "claim-stripe"}, {"observer", "observer-stripe"}} {
		plain, ok1 := byLabel[m.label]
		tls, ok2 := byLabel[m.label+"-tls"]
		if !ok1 || !ok2 {
			continue
		}
		cost := plain.FractionOfLimit - tls.FractionOfLimit
		verdict := "met"
		if cost > tlsCostTarget {
			verdict = "missed"
		}
		parts = append(parts, fmt.Sprintf("%s %.2f -> %.2f (delta %+.2f, %s), CPU %.2f -> %.2f s/GiB",
			m.name, plain.FractionOfLimit, tls.FractionOfLimit, tls.FractionOfLimit-plain.FractionOfLimit, verdict,
			plain.ServerCPUSecondsPerGiB, tls.ServerCPUSecondsPerGiB))
	}
	if len(parts) == 0 {
		return ""
	}
	return fmt.Sprintf("TLS cost (target: at most %.2f of the limit): %s", tlsCostTarget, strings.Join(parts, "; "))
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

const gib = 1 << 30

// holderSet is one set of seeded holders: plain, or with certificates of
// pki's CA.
type holderSet struct {
	nodes      []*harness.Node
	pids       []int // their coop processes
	neighbours []harness.Neighbor
	pki        *harness.PKI
	pkiDir     string
}

// cpuSeconds is the CPU time the holders' coop processes have spent so
// far.
func (hs *holderSet) cpuSeconds() (float64, error) {
	var sum float64
	for _, pid := range hs.pids {
		s, err := cpuSeconds(pid)
		if err != nil {
			return 0, err
		}
		sum += s
	}
	return sum, nil
}

// served is the bytes the holders' peer servers have sent so far.
func (hs *holderSet) served(ctx context.Context) (int64, error) {
	var sum int64
	for _, n := range hs.nodes {
		v, err := n.Metric(ctx, harness.MetricPeerServedBytes)
		if err != nil {
			return 0, fmt.Errorf("node %s: %w", n.Name, err)
		}
		sum += int64(v)
	}
	return sum, nil
}

// userHZ is the unit of /proc/<pid>/stat's times: Linux's USER_HZ, 100 on
// every architecture coop runs on.
const userHZ = 100

// cpuSeconds is the user and system CPU time of process pid (all its
// threads), from /proc/<pid>/stat.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid ...: comm may hold spaces and parentheses, so
	// the fields count from the last ')'; utime and stime are fields 14
	// and 15, the 12th and 13th after it.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	var ticks int64
	for _, s := range f[11:13] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += v
	}
	return float64(ticks) / userHZ, nil
}
