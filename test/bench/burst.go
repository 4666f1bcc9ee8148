package main

// P5: a burst (issue 14). One source host runs the registry and a coop node
// that holds the image, behind a 100 Mbit/s uplink; 8 destination hosts,
// each behind a 100 Mbit/s uplink of its own (downlinks unshaped), start
// `ctr image pull` at the same instant, on fresh nodes for every run. Every
// destination's neighbours are the source node and the 7 other
// destinations (online index). Runs:
//
//	traditional    the registry only (index none: no peers)
//	stripe         observer mode, --swarm=false: whole blobs from whole
//	               holders only
//	swarm          observer mode, swarm on (coop's default)
//	swarm-claim    claim mode, swarm on
//	swarm-cri      the swarm run through CRI (crictl pull)
//	swarm-2killed  the swarm run; two destinations' coop and containerd are
//	               SIGKILLed once each has received a few MiB
//	swarm-corrupt  the swarm run with a 9th host, a neighbour of every
//	               destination, whose copy of the biggest layer is random
//	               bytes of the right size
//
// P5 is an image of 4 incompressible layers, P5-1layer one layer, 128 MiB
// either way; the failure runs and the CRI run are P5's only. Each run
// records when every destination's pull returned (seconds: the last one,
// against limit_seconds, the image over one 100 Mbit/s uplink, P1's
// convention), the bytes that left the source's uplink (the registry's blob
// bytes and the source node's peer server's), what each destination
// uploaded (its coop_peer_served_bytes_total), its interface counters, and
// for every surviving destination the pulls it took (up to 3) and the
// committed blobs that do not hash to their digest.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coopnet/coop/test/cluster"
	"github.com/coopnet/coop/test/harness"
)

const (
	burstPrefix   = "coopburst-"
	burstEnv      = "COOP_BENCH_BURST"
	burstOutEnv   = "COOP_BENCH_BURST_OUT"
	burstSeed     = 20261214
	burstPeerPort = 5050
	burstMbit     = 100
	burstDests    = 8
	// burstTimeTarget and burstSourceTarget are issue 14's targets for
	// the swarm runs: the last destination within 1.5 times the limit,
	// at most 1.5 images out of the source's uplink.
	burstTimeTarget   = 1.5
	burstSourceTarget = 1.5
	// burstPullTimeout bounds one pull attempt.
	burstPullTimeout = 10 * time.Minute
)

var (
	burstCtl = cluster.Host{Name: "ctl", IP: cluster.Subnet + "254"}
	burstSrc = cluster.Host{Name: "src", IP: cluster.Subnet + "10", Mbit: burstMbit}
	burstBad = cluster.Host{Name: "bad", IP: cluster.Subnet + "30", Mbit: burstMbit}
)

// burstDstHosts are the destinations d1..d8.
func burstDstHosts() []cluster.Host {
	var hs []cluster.Host
	for i := range burstDests {
		hs = append(hs, cluster.Host{Name: fmt.Sprintf("d%d", i+1), IP: fmt.Sprintf("%s%d", cluster.Subnet, 21+i), Mbit: burstMbit})
	}
	return hs
}

// BurstDest is one destination of a burst run.
type BurstDest struct {
	Name string `json:"name"`
	// Seconds is from the common start to the end of its last pull
	// attempt that succeeded (0: none did).
	Seconds float64 `json:"seconds"`
	// Uploaded is its coop_peer_served_bytes_total after the run (for a
	// killed destination, the last reading before the kill).
	Uploaded int64 `json:"uploaded_bytes"`
	// FromPeers is what its mirror took from peers
	// (coop_mirror_peer_bytes_total).
	FromPeers int64 `json:"from_peers_bytes"`
	// TxBytes and RxBytes are its interface's counters over the run
	// (frames: headers included).
	TxBytes  int64 `json:"tx_bytes"`
	RxBytes  int64 `json:"rx_bytes"`
	Attempts int   `json:"attempts"`
	Killed   bool  `json:"killed,omitempty"`
	// Error is the last attempt's error (none if it succeeded),
	// FirstError the first failed attempt's.
	Error      string `json:"error,omitempty"`
	FirstError string `json:"first_error,omitempty"`
	// BlobsChecked and Corrupt: the committed blobs hashed after the run
	// and those that do not match their digest (checkCommitted).
	BlobsChecked int `json:"blobs_checked"`
	Corrupt      int `json:"corrupt_committed"`
}

// burstRun is one run of a burst scenario.
type burstRun struct {
	label string
	// opts are the destinations' mode, index and extra flags.
	opts harness.NodeOptions
	// peers: the destinations' neighbours are the source node and the
	// other destinations.
	peers   bool
	cri     bool
	kill    int  // destinations killed mid-pull
	corrupt bool // the corrupt holder is a neighbour too
}

func burstRuns(all bool) []burstRun {
	swarm := harness.NodeOptions{Observer: true, Index: "online"}
	runs := []burstRun{
		{label: "traditional", opts: harness.NodeOptions{Observer: true, Index: "none"}},
		{label: "stripe", opts: harness.NodeOptions{Observer: true, Index: "online", ExtraCoopArgs: []string{"--swarm=false"}}, peers: true},
		{label: "swarm", opts: swarm, peers: true},
		{label: "swarm-claim", opts: harness.NodeOptions{Claim: true, Index: "online"}, peers: true},
	}
	if all {
		runs = append(runs,
			burstRun{label: "swarm-cri", opts: swarm, peers: true, cri: true},
			burstRun{label: "swarm-2killed", opts: swarm, peers: true, kill: 2},
			burstRun{label: "swarm-corrupt", opts: swarm, peers: true, corrupt: true})
	}
	return runs
}

// burstSpec is one burst scenario.
type burstSpec struct {
	name, description string
	layers            []int64
	runs              []burstRun
}

func burstSpecs(quick bool) []burstSpec {
	four := []int64{32 * mib, 32 * mib, 32 * mib, 32 * mib}
	one := []int64{128 * mib}
	if quick {
		four = []int64{8 * mib, 8 * mib, 8 * mib, 8 * mib}
		one = []int64{32 * mib}
	}
	what := func(layers []int64) string {
		return fmt.Sprintf("%d destinations pull an image of %s at the same instant from a source (registry + coop node holding it) behind a %d Mbit/s uplink; every destination's uplink %d Mbit/s, downlinks unshaped; neighbours: the source and the other destinations (online index)",
			burstDests, layersText(layers), burstMbit, burstMbit)
	}
	return []burstSpec{
		{name: "P5", description: what(four), layers: four, runs: burstRuns(true)},
		{name: "P5-1layer", description: what(one), layers: one, runs: burstRuns(false)},
	}
}

// layersText is "4 × 32 MiB layers" or "one 128 MiB layer".
func layersText(layers []int64) string {
	if len(layers) == 1 {
		return fmt.Sprintf("one %d MiB layer", layers[0]/mib)
	}
	if slices.Min(layers) == slices.Max(layers) {
		return fmt.Sprintf("%d × %d MiB layers", len(layers), layers[0]/mib)
	}
	var sum int64
	for _, l := range layers {
		sum += l
	}
	return fmt.Sprintf("%d layers, %d MiB", len(layers), sum/mib)
}

// isBurst tells a burst scenario from the others (P1/P2 also have a limit).
func isBurst(s Scenario) bool { return strings.HasPrefix(s.Name, "P5") }

// wantBurst: --only P5 runs both burst scenarios, --only P5-1layer that one.
func wantBurst(want func(string) bool, name string) bool {
	return want(name) || want("P5")
}

// runBurst builds each burst scenario's namespaces and runs it inside them.
func runBurst(ctx context.Context, o options, want func(string) bool) ([]Scenario, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("P5 builds network namespaces and starts containerd: run as root")
	}
	var out []Scenario
	for _, spec := range burstSpecs(o.quick) {
		if !wantBurst(want, spec.name) {
			continue
		}
		s, err := burstOuter(ctx, spec.name)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// burstOuter builds the topology, reruns this program in the control
// namespace for scenario name and reads what it wrote. The namespaces go
// whatever happens.
func burstOuter(ctx context.Context, name string) (Scenario, error) {
	t0 := time.Now()
	hosts := append([]cluster.Host{burstCtl, burstSrc, burstBad}, burstDstHosts()...)
	s, err := scenarioInNamespaces(ctx, burstPrefix, hosts, burstCtl.Name, burstEnv, burstOutEnv, name)
	if err != nil {
		return Scenario{}, err
	}
	fmt.Fprintf(os.Stderr, "  %s: section took %.0f s\n", name, time.Since(t0).Seconds())
	return s, nil
}

// burstEnvState is what the runs of one scenario share inside the control
// namespace.
type burstEnvState struct {
	tools   *harness.Tools
	logf    func(string, ...any)
	seedReg *harness.Registry
	srcReg  *harness.Registry
	seedImg *harness.Image
	img     *harness.Image
	bytes   int64
	source  *harness.Node
	bad     *harness.Node // the corrupt holder, once a run needs it

	mu    sync.Mutex
	nodes map[*harness.Node]bool // everything started, stopped at the end
}

func (e *burstEnvState) start(ctx context.Context, h cluster.Host, opts harness.NodeOptions) (*harness.Node, error) {
	opts.Name, opts.NetNS, opts.ListenIP, opts.PeerPort = h.Name, cluster.PathOf(burstPrefix, h.Name), h.IP, burstPeerPort
	opts.CoopLogLevel = "info"
	n, err := harness.StartNode(ctx, e.tools, opts)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.nodes[n] = true
	e.mu.Unlock()
	return n, nil
}

func (e *burstEnvState) stop(n *harness.Node) error {
	e.mu.Lock()
	delete(e.nodes, n)
	e.mu.Unlock()
	return n.Stop()
}

func (e *burstEnvState) stopAll() {
	e.mu.Lock()
	var ns []*harness.Node
	for n := range e.nodes {
		ns = append(ns, n)
	}
	e.mu.Unlock()
	stopNodes(e, ns)
}

// stopNodes stops ns side by side.
func stopNodes(e *burstEnvState, ns []*harness.Node) {
	var wg sync.WaitGroup
	for _, n := range ns {
		if n == nil {
			continue
		}
		wg.Go(func() {
			if err := e.stop(n); err != nil {
				e.logf("stop %s: %v", n.Name, err)
			}
		})
	}
	wg.Wait()
}

// burstInner runs burst scenario name from inside the control namespace
// and writes it to the file named by burstOutEnv.
func burstInner(ctx context.Context, o options, name string) error {
	var spec burstSpec
	for _, s := range burstSpecs(o.quick) {
		if s.name == name {
			spec = s
		}
	}
	if spec.name == "" {
		return fmt.Errorf("no burst scenario %q", name)
	}
	tools, err := harness.FindTools(true)
	if err != nil {
		return err
	}
	e := &burstEnvState{tools: tools, nodes: map[*harness.Node]bool{},
		logf: func(format string, args ...any) { fmt.Fprintf(os.Stderr, "  "+format+"\n", args...) }}
	defer e.stopAll()
	imageSpec := harness.ImageSpec{Repo: "coop/burst", Tag: "v1", LayerSizes: spec.layers, Seed: burstSeed}
	// The source node (and the corrupt holder) are seeded from a registry
	// behind no shaping; the destinations' registry is the source host's.
	if e.seedReg, err = harness.StartRegistry(ctx, harness.RegistryOptions{Addr: burstCtl.IP + ":0"}); err != nil {
		return err
	}
	defer e.seedReg.Close()
	e.srcReg, err = harness.StartRegistry(ctx, harness.RegistryOptions{Addr: burstSrc.IP + ":0", Listen: func(addr string) (netListener, error) {
		return cluster.ListenIn(cluster.PathOf(burstPrefix, burstSrc.Name), addr)
	}})
	if err != nil {
		return err
	}
	defer e.srcReg.Close()
	if e.seedImg, err = e.seedReg.PushRandomImage(ctx, imageSpec); err != nil {
		return err
	}
	if e.img, err = e.srcReg.PushRandomImage(ctx, imageSpec); err != nil {
		return err
	}
	if e.img.Manifest.Digest != e.seedImg.Manifest.Digest {
		return errors.New("the two registries built different images from one seed")
	}
	e.bytes = e.img.TotalBytes()
	seedUp := []harness.Upstream{harness.UpstreamOf(e.seedReg)}
	if e.source, err = e.start(ctx, burstSrc, harness.NodeOptions{Registries: seedUp, Index: "none"}); err != nil {
		return err
	}
	if err := e.source.PullCtr(ctx, e.seedImg.DigestRef); err != nil {
		return fmt.Errorf("seed the source: %w", err)
	}
	limit := float64(e.bytes) / (float64(burstMbit) * 1e6 / 8)
	e.logf("%s: %s, %d bytes; the source node holds it; limit %.2f s", name, layersText(spec.layers), e.bytes, limit)
	s := Scenario{Name: spec.name, Description: spec.description, Bytes: e.bytes, LimitSeconds: limit, Target: 1 / burstTimeTarget}
	for _, r := range spec.runs {
		if o.burstRuns != "" && !slices.Contains(strings.Split(o.burstRuns, ","), r.label) {
			continue
		}
		if r.corrupt && e.bad == nil {
			if err := e.startCorrupt(ctx); err != nil {
				return fmt.Errorf("the corrupt holder: %w", err)
			}
		}
		run, err := e.burst(ctx, r)
		if err != nil {
			return fmt.Errorf("%s %s: %w", spec.name, r.label, err)
		}
		summarizeBurst(&run, limit, e.bytes)
		e.logf("%s %s: last %.2f s (p50 %.2f s) = %.2f× the limit; source sent %.2f images (registry %d + coop %d bytes); %d of %d completed in %d pulls; %d of %d blobs corrupt",
			spec.name, r.label, run.Seconds, run.P50Seconds, run.LimitMultiple, run.SourceCopies, run.RegistryBytes, run.SourceServedBytes,
			run.Completed, len(run.Destinations), run.Attempts, derefInt(run.Corrupt), run.BlobsChecked)
		s.Runs = append(s.Runs, run)
		if r.corrupt {
			// Idle but for its run.
			if err := e.stop(e.bad); err != nil {
				e.logf("stop %s: %v", e.bad.Name, err)
			}
			e.bad = nil
		}
	}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	return os.WriteFile(os.Getenv(burstOutEnv), b, 0o644)
}

func derefInt(p *int) int {
	if p == nil {
		return 0
	}
	return *p
}

// startCorrupt starts the 9th host, seeds it with the image and overwrites
// its copy of the biggest layer with random bytes of the same size (as the
// failure matrix's corrupt fault does).
func (e *burstEnvState) startCorrupt(ctx context.Context) error {
	n, err := e.start(ctx, burstBad, harness.NodeOptions{Registries: []harness.Upstream{harness.UpstreamOf(e.seedReg)}, Index: "none"})
	if err != nil {
		return err
	}
	e.bad = n
	if err := n.PullCtr(ctx, e.seedImg.DigestRef); err != nil {
		return err
	}
	layer := e.img.Layers[0]
	for _, l := range e.img.Layers {
		if l.Size > layer.Size {
			layer = l
		}
	}
	if err := n.CorruptBlob(layer.Digest); err != nil {
		return err
	}
	e.logf("%s holds the image with layer %s (%d bytes) overwritten with random bytes", n.Name, layer.Digest, layer.Size)
	return nil
}

func neighbourOf(h cluster.Host) harness.Neighbor {
	return harness.Neighbor{Name: h.Name, URL: fmt.Sprintf("http://%s:%d", h.IP, burstPeerPort)}
}

// killAfter is what a destination of swarm-2killed receives before it is
// killed.
func killAfter(imageBytes int64) int64 { return max(imageBytes/16, 2*mib) }

// burst runs r once on fresh destinations.
func (e *burstEnvState) burst(ctx context.Context, r burstRun) (Run, error) {
	hosts := burstDstHosts()
	nodes := make([]*harness.Node, len(hosts))
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		opts := r.opts
		opts.Registries = []harness.Upstream{harness.UpstreamOf(e.srcReg)}
		if r.peers {
			opts.Neighbors = []harness.Neighbor{neighbourOf(burstSrc)}
			for _, other := range hosts {
				if other != h {
					opts.Neighbors = append(opts.Neighbors, neighbourOf(other))
				}
			}
			if r.corrupt {
				opts.Neighbors = append(opts.Neighbors, neighbourOf(burstBad))
			}
		}
		wg.Go(func() { nodes[i], errs[i] = e.start(ctx, h, opts) })
	}
	wg.Wait()
	defer stopNodes(e, nodes)
	if err := errors.Join(errs...); err != nil {
		return Run{}, err
	}

	e.srcReg.ResetCounts()
	srcServed0, err := e.source.Metric(ctx, harness.MetricPeerServedBytes)
	if err != nil {
		return Run{}, err
	}
	var badServed0 float64
	if r.corrupt {
		if badServed0, err = e.bad.Metric(ctx, harness.MetricPeerServedBytes); err != nil {
			return Run{}, err
		}
	}
	counters0, err := ifaceAll(ctx, hosts)
	if err != nil {
		return Run{}, err
	}

	dests := make([]BurstDest, len(hosts))
	killed := make([]atomic.Bool, len(hosts))
	pull := func(ctx context.Context, n *harness.Node) error {
		ctx, cancel := context.WithTimeout(ctx, burstPullTimeout)
		defer cancel()
		if r.cri {
			return n.PullCRI(ctx, e.img.DigestRef)
		}
		return n.PullCtr(ctx, e.img.DigestRef)
	}
	gate := make(chan struct{})
	var t0 time.Time
	for i, n := range nodes {
		dests[i].Name = n.Name
		wg.Go(func() {
			<-gate
			d := &dests[i]
			for attempt := 1; attempt <= maxAttempts; attempt++ {
				d.Attempts = attempt
				err := pull(ctx, n)
				if err == nil {
					d.Seconds, d.Error = time.Since(t0).Seconds(), ""
					return
				}
				d.Error = pullError(err)
				if killed[i].Load() || ctx.Err() != nil {
					return
				}
				if d.FirstError == "" {
					d.FirstError = d.Error
				}
				e.logf("%s: pull %d failed after %.1f s: %s\n%s", n.Name, attempt, time.Since(t0).Seconds(), d.Error, n.LogTail(8))
			}
		})
	}
	// The victims: the last r.kill destinations, each killed once it has
	// received killAfter bytes.
	stopKill := make(chan struct{})
	var kwg sync.WaitGroup
	for i := len(nodes) - r.kill; i < len(nodes); i++ {
		kwg.Go(func() {
			if err := e.killWhenReceived(ctx, nodes[i], hosts[i], counters0[hosts[i].Name].rx, killAfter(e.bytes), &dests[i], &killed[i], stopKill); err != nil {
				e.logf("%s: %v", nodes[i].Name, err)
			}
		})
	}
	t0 = time.Now()
	close(gate)
	wg.Wait()
	close(stopKill)
	kwg.Wait()
	if err := ctx.Err(); err != nil {
		return Run{}, err
	}

	run := Run{Label: r.label, ImageBytes: e.bytes, Destinations: dests}
	counters1, err := ifaceAll(ctx, hosts)
	if err != nil {
		return Run{}, err
	}
	run.RegistryBytes = e.srcReg.Counts().BlobBytes
	srcServed1, err := e.source.Metric(ctx, harness.MetricPeerServedBytes)
	if err != nil {
		return Run{}, err
	}
	run.SourceServedBytes = int64(srcServed1 - srcServed0)
	run.SourceTxBytes = counters1[burstSrc.Name].tx - counters0[burstSrc.Name].tx
	if r.corrupt {
		v, err := e.bad.Metric(ctx, harness.MetricPeerServedBytes)
		if err != nil {
			return Run{}, err
		}
		run.CorruptHolderServed = int64(v - badServed0)
	}
	for i, n := range nodes {
		d := &dests[i]
		h := hosts[i].Name
		d.TxBytes, d.RxBytes = counters1[h].tx-counters0[h].tx, counters1[h].rx-counters0[h].rx
		if d.Killed {
			continue
		}
		m, err := n.Metrics(ctx)
		if err != nil {
			return Run{}, fmt.Errorf("%s: %w", n.Name, err)
		}
		served, _ := m.Sum(harness.MetricPeerServedBytes)
		peers, _ := m.Sum(harness.MetricMirrorPeerBytes)
		d.Uploaded, d.FromPeers = int64(served), int64(peers)
		ns := "default"
		if r.cri {
			ns = "k8s.io"
		}
		if d.BlobsChecked, d.Corrupt, err = checkCommittedNS(ctx, n, ns); err != nil {
			return Run{}, fmt.Errorf("%s: check the committed blobs: %w", n.Name, err)
		}
	}
	return run, nil
}

// killWhenReceived SIGKILLs n's containerd and coop once its interface has
// received want bytes since its counter read rx0, unless stop closes first.
func (e *burstEnvState) killWhenReceived(ctx context.Context, n *harness.Node, h cluster.Host, rx0, want int64, d *BurstDest, killed *atomic.Bool, stop <-chan struct{}) error {
	start := time.Now()
	var got int64
	for {
		c, err := ifaceCounters(ctx, burstPrefix+h.Name)
		if err != nil {
			return err
		}
		if got = c.rx - rx0; got >= want {
			break
		}
		select {
		case <-stop:
			return errors.New("its pull ended before it could be killed")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	if v, err := n.Metric(ctx, harness.MetricPeerServedBytes); err == nil {
		d.Uploaded = int64(v)
	}
	killed.Store(true)
	d.Killed = true
	if err := n.KillContainerd(); err != nil {
		return err
	}
	if err := n.KillCoop(); err != nil {
		return err
	}
	e.logf("%s: containerd and coop killed %.1f s into the pull, having received %.1f MiB", n.Name, time.Since(start).Seconds(), float64(got)/mib)
	return nil
}

// summarizeBurst fills run's totals from its destinations: seconds (the
// last destination that completed), p50, the limit's fraction and multiple,
// the source's bytes and the attempts and corrupt blobs of the
// destinations that were not killed.
func summarizeBurst(run *Run, limit float64, imageBytes int64) {
	var secs []float64
	run.Attempts, run.BlobsChecked = 0, 0
	corrupt := 0
	for _, d := range run.Destinations {
		if d.Killed {
			continue
		}
		run.Attempts += d.Attempts
		run.BlobsChecked += d.BlobsChecked
		corrupt += d.Corrupt
		if d.Seconds > 0 {
			secs = append(secs, d.Seconds)
		}
	}
	run.Corrupt = &corrupt
	run.Completed = len(secs)
	run.Seconds, run.P50Seconds, run.FractionOfLimit, run.LimitMultiple = 0, 0, 0, 0
	if len(secs) > 0 {
		run.Seconds, run.P50Seconds = slices.Max(secs), median(secs)
		run.FractionOfLimit, run.LimitMultiple = limit/run.Seconds, run.Seconds/limit
	}
	run.Samples = []float64{run.Seconds}
	run.ImageBytes = imageBytes
	run.SourceBytes = run.RegistryBytes + run.SourceServedBytes
	if imageBytes > 0 {
		run.SourceCopies = float64(run.SourceBytes) / float64(imageBytes)
	}
}

// ifaceStats is an interface's byte counters.
type ifaceStats struct{ rx, tx int64 }

// ifaceCounters reads eth0's counters in namespace ns.
func ifaceCounters(ctx context.Context, ns string) (ifaceStats, error) {
	out, err := exec.CommandContext(ctx, "ip", "-n", ns, "-s", "-j", "link", "show", "eth0").Output()
	if err != nil {
		return ifaceStats{}, fmt.Errorf("ip -n %s -s link show eth0: %w", ns, err)
	}
	return parseIfaceStats(out)
}

// parseIfaceStats reads `ip -s -j link show DEV`.
func parseIfaceStats(b []byte) (ifaceStats, error) {
	type dir struct {
		Bytes int64 `json:"bytes"`
	}
	var links []struct {
		Stats64 *struct {
			RX dir `json:"rx"`
			TX dir `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(b, &links); err != nil {
		return ifaceStats{}, fmt.Errorf("ip -s -j link: %w", err)
	}
	if len(links) != 1 || links[0].Stats64 == nil {
		return ifaceStats{}, fmt.Errorf("ip -s -j link: %d links, no counters in %.200q", len(links), b)
	}
	return ifaceStats{rx: links[0].Stats64.RX.Bytes, tx: links[0].Stats64.TX.Bytes}, nil
}

// ifaceAll reads the counters of the source and of hosts, by host name.
func ifaceAll(ctx context.Context, hosts []cluster.Host) (map[string]ifaceStats, error) {
	m := map[string]ifaceStats{}
	for _, h := range append([]cluster.Host{burstSrc}, hosts...) {
		c, err := ifaceCounters(ctx, burstPrefix+h.Name)
		if err != nil {
			return nil, err
		}
		m[h.Name] = c
	}
	return m, nil
}

// pullError is what a failed pull said: a client command's status and the
// last line of its stderr, at most 300 bytes.
func pullError(err error) string {
	s := err.Error()
	if ce, ok := errors.AsType[*harness.CommandError](err); ok {
		lines := strings.Split(strings.TrimSpace(ce.Stderr), "\n")
		s = fmt.Sprintf("%s %v: %s", filepath.Base(ce.Args[0]), ce.Err, lines[len(lines)-1])
	}
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}

// printBurst prints the burst scenarios' table.
func printBurst(ss []Scenario) {
	fmt.Println()
	fmt.Println("| scenario | run | completed | seconds (last) | p50 s | limit s | × limit | fraction_of_limit | source bytes (× image): registry + source coop | uploaded MiB per destination | pulls | corrupt committed | target |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
	for _, s := range ss {
		for _, r := range s.Runs {
			var ups []string
			for _, d := range r.Destinations {
				u := fmt.Sprintf("%s %.0f", d.Name, float64(d.Uploaded)/mib)
				if d.Killed {
					u += " (killed)"
				} else if d.Seconds == 0 {
					u += " (failed)"
				}
				ups = append(ups, u)
			}
			src := fmt.Sprintf("%.2f: %.0f + %.0f MiB", r.SourceCopies, float64(r.RegistryBytes)/mib, float64(r.SourceServedBytes)/mib)
			if r.CorruptHolderServed > 0 {
				src += fmt.Sprintf(" (corrupt holder %.0f MiB)", float64(r.CorruptHolderServed)/mib)
			}
			fmt.Printf("| %s | %s | %d/%d | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %s | %d | %d of %d | %s |\n",
				s.Name, r.Label, r.Completed, len(r.Destinations), r.Seconds, r.P50Seconds, s.LimitSeconds, r.LimitMultiple, r.FractionOfLimit,
				src, strings.Join(ups, ", "), r.Attempts, derefInt(r.Corrupt), r.BlobsChecked, burstVerdict(r))
		}
	}
}

// burstVerdict is the target line of a run: the swarm runs' (the last
// destination within burstTimeTarget limits, at most burstSourceTarget
// images from the source), nothing for the others.
func burstVerdict(r Run) string {
	switch r.Label {
	case "swarm", "swarm-claim", "swarm-cri":
	default:
		return "—"
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "missed"
	}
	return fmt.Sprintf("≤ %.1f× limit (%s), ≤ %.1f images (%s)", burstTimeTarget, verdict(r.Completed > 0 && r.LimitMultiple <= burstTimeTarget),
		burstSourceTarget, verdict(r.SourceCopies <= burstSourceTarget))
}

// burstPlotPath is where scenario name's plot goes, beside the results.
func burstPlotPath(out, name string) string {
	return strings.TrimSuffix(out, filepath.Ext(out)) + "-" + name + ".png"
}

// sortedDestNames are the destination names of s's runs, in order.
func sortedDestNames(s Scenario) []string {
	seen := map[string]bool{}
	var names []string
	for _, r := range s.Runs {
		for _, d := range r.Destinations {
			if !seen[d.Name] {
				seen[d.Name] = true
				names = append(names, d.Name)
			}
		}
	}
	sort.Slice(names, func(i, j int) bool {
		a, _ := strconv.Atoi(strings.TrimPrefix(names[i], "d"))
		b, _ := strconv.Atoi(strings.TrimPrefix(names[j], "d"))
		if a != b {
			return a < b
		}
		return names[i] < names[j]
	})
	return names
}
