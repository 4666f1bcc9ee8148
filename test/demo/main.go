// Command demo runs coop's main job on one machine: a stateless container
// migration, cooperatively. It builds a small cluster in network namespaces
// (ClusterKB with its NATS broker, a source, three neighbours and a
// destination, uplinks shaped to 100 Mbit/s), runs a tiny HTTP server on
// busybox at the source from an image that exists only there (and, in part,
// on the neighbours), migrates it to the destination twice — traditional
// (from the source only) and cooperative (source and neighbours, found
// through ClusterKB) — checks that it answers HTTP at the destination, and
// prints both provenance tables and the comparison. Act 2: the service
// scales out to three fresh nodes at once, traditional (each from the
// source) and cooperative (a swarm: the nodes take chunks from each other
// while they download), and the demo prints the rollout's time and the
// bytes that left the source. Everything is torn down on exit, on failure
// and on Ctrl-C.
//
// Run it with `make demo` (as root). DEMO_JSON=path also writes
// {"traditional_seconds":…,"cooperative_seconds":…,"answered":…,
// "rollout_traditional_seconds":…,"rollout_cooperative_seconds":…, ...};
// DEMO_LAYERS (default 4) and DEMO_LAYER_MIB (default 32) size the image.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/plugin/migrate"
	"github.com/coopnet/coop/test/cluster"
	"github.com/coopnet/coop/test/harness"
)

// The cluster.
var (
	kbHost     = cluster.Host{Name: "kb", IP: cluster.Subnet + "2"}
	sourceHost = cluster.Host{Name: "src", IP: cluster.Subnet + "10", Mbit: 100}
	neighbours = []cluster.Host{{Name: "n1", IP: cluster.Subnet + "11", Mbit: 100}, {Name: "n2", IP: cluster.Subnet + "12", Mbit: 100}, {Name: "n3", IP: cluster.Subnet + "13", Mbit: 100}}
	destHost   = cluster.Host{Name: "dst", IP: cluster.Subnet + "20"}
	// Act 2: fresh nodes the service scales out to, all at once.
	scaleHosts = []cluster.Host{{Name: "s1", IP: cluster.Subnet + "21", Mbit: 100}, {Name: "s2", IP: cluster.Subnet + "22", Mbit: 100}, {Name: "s3", IP: cluster.Subnet + "23", Mbit: 100}}
	ctlHost    = cluster.Host{Name: "ctl", IP: cluster.Subnet + "254"}
)

const (
	nsPrefix = "coopdemo-"
	innerEnv = "COOP_DEMO_INNER"
)

func nsPath(name string) string { return cluster.PathOf(nsPrefix, name) }

func inNS(name, bin string, args ...string) (string, []string) {
	return "nsenter", append([]string{"--net=" + nsPath(name), bin}, args...)
}

const (
	period    = "2s"
	container = "web"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	var err error
	if os.Getenv(innerEnv) != "" {
		err = inner(ctx, os.Stdout)
	} else {
		err = outer(ctx)
	}
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("interrupted: %w", err)
	}
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

// outer builds the namespaces, runs the demo inside the control namespace,
// and removes the namespaces whatever happened.
func outer(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces and starts containerd: run make demo as root")
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		return errors.New("nsenter is missing (util-linux)")
	}
	hosts := append(append([]cluster.Host{ctlHost, kbHost, sourceHost, destHost}, neighbours...), scaleHosts...)
	t, err := cluster.Build(ctx, nsPrefix, hosts)
	if err != nil {
		return fmt.Errorf("network namespaces: %w", err)
	}
	defer t.Close()
	return t.Reexec(ctx, ctlHost.Name, innerEnv+"=1")
}

func envInt(name string, def int) (int, error) {
	v := os.Getenv(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%s=%q: want a positive integer", name, v)
	}
	return n, nil
}

// demo is the running cluster, seen from the control namespace.
type demo struct {
	ctx   context.Context
	tools *harness.Tools
	logf  func(string, ...any)
	nodes []*harness.Node
	kb    *exec.Cmd
	dir   string
	// pki is the demo cluster's CA: every coop process speaks mutual TLS.
	pki *harness.PKI
}

func (d *demo) node(h cluster.Host, opts harness.NodeOptions) (*harness.Node, error) {
	opts.Name, opts.NetNS, opts.ListenIP = h.Name, nsPath(h.Name), h.IP
	// coop as an operator gets it: the default mode (claims).
	opts.CoopLogLevel, opts.Logf, opts.PKI, opts.Default = "info", d.logf, d.pki, true
	n, err := harness.StartNode(d.ctx, d.tools, opts)
	if err != nil {
		return nil, err
	}
	d.nodes = append(d.nodes, n)
	return n, nil
}

func (d *demo) stopNode(n *harness.Node) error {
	for i, x := range d.nodes {
		if x == n {
			d.nodes = append(d.nodes[:i], d.nodes[i+1:]...)
		}
	}
	return n.Stop()
}

// indexArgs makes a node publish to the broker, register with ClusterKB
// and, in kb mode, locate through it.
func indexArgs(index string) []string {
	kb := "https://" + kbHost.IP + ":5060"
	return []string{"--index", index, "--kb", kb, "--nats-url", "nats://" + kbHost.IP + ":4222", "--period", period, "--neighbors-from-kb"}
}

func inner(ctx context.Context, out io.Writer) (retErr error) {
	layers, err := envInt("DEMO_LAYERS", 4)
	if err != nil {
		return err
	}
	layerMiB, err := envInt("DEMO_LAYER_MIB", 32)
	if err != nil {
		return err
	}
	tools, err := harness.FindTools(true)
	if err != nil {
		return err
	}
	if tools.Runc == "" {
		return errors.New("runc is not on PATH: apt-get install -y runc")
	}
	_ = log.SetLevel("info")
	dir, err := os.MkdirTemp("", "coop-demo-")
	if err != nil {
		return err
	}
	d := &demo{ctx: ctx, tools: tools, dir: dir, logf: func(format string, args ...any) { log.G(ctx).Infof(format, args...) }}
	if d.pki, err = harness.NewPKI(filepath.Join(dir, "pki")); err != nil {
		os.RemoveAll(dir)
		return err
	}
	kbTLS := filepath.Join(dir, "kb-tls")
	if err := d.pki.Issue("coop-kb", kbTLS); err != nil {
		os.RemoveAll(dir)
		return err
	}
	defer func() {
		for i := len(d.nodes) - 1; i >= 0; i-- {
			n := d.nodes[i]
			if retErr != nil && ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "%s\n", n.LogTail(20))
			}
			if err := n.Stop(); err != nil {
				log.G(ctx).WithError(err).Warnf("stop node %s", n.Name)
			}
		}
		if d.kb != nil && d.kb.Process != nil {
			_ = d.kb.Process.Signal(syscall.SIGTERM)
			_ = d.kb.Wait()
		}
		os.RemoveAll(dir)
	}()

	// ClusterKB with its embedded broker, in its own namespace.
	bin, args := inNS(kbHost.Name, tools.Coop, "kb", "--listen", kbHost.IP+":5060", "--nats-listen", kbHost.IP+":4222",
		"--feed", "push", "--period", period, "--root", filepath.Join(dir, "kb"), "--log-level", "warn", "--tls-dir", kbTLS)
	d.kb = exec.Command(bin, args...)
	kbLog, err := os.Create(filepath.Join(dir, "kb.log"))
	if err != nil {
		return err
	}
	d.kb.Stdout, d.kb.Stderr = kbLog, kbLog
	d.kb.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.kb.Start(); err != nil {
		return fmt.Errorf("coop kb: %w", err)
	}
	if err := waitHTTP(ctx, d.pki.HTTPClient(), "https://"+kbHost.IP+":5060/healthz"); err != nil {
		return fmt.Errorf("coop kb: %w", err)
	}

	// A registry, only to build the image; it is gone before the migrations.
	reg, err := harness.StartRegistry(ctx, harness.RegistryOptions{Addr: ctlHost.IP + ":0"})
	if err != nil {
		return err
	}
	defer reg.Close()
	sizes := make([]int64, layers)
	for i := range sizes {
		sizes[i] = int64(layerMiB) << 20
	}
	d.logf("building the image: busybox httpd and %d × %d MiB of random layers", layers, layerMiB)
	img, err := reg.PushRandomImage(ctx, harness.ImageSpec{Repo: "coop/web", Tag: "v1", LayerSizes: sizes, Busybox: harness.BusyboxPath})
	if err != nil {
		return err
	}
	up := []harness.Upstream{harness.UpstreamOf(reg)}

	// The source and the neighbours pull from the registry (index none):
	// they only publish what they hold, to ClusterKB through the broker.
	src, err := d.node(sourceHost, harness.NodeOptions{Registries: up, Migrations: true, ExtraCoopArgs: indexArgs("none")})
	if err != nil {
		return err
	}
	if err := src.PullCtr(ctx, img.Ref); err != nil {
		return fmt.Errorf("source: pull: %w", err)
	}
	if _, err := src.Ctr(ctx, "run", "-d", "--runc-root", src.RuncRoot, "--cgroup", "/coopdemo-src-"+container, img.Ref, container); err != nil {
		return fmt.Errorf("source: run: %w", err)
	}
	// Each neighbour holds the image but one random layer (a different one
	// each): together they hold it all, none alone does.
	for i, h := range neighbours {
		n, err := d.node(h, harness.NodeOptions{Registries: up, ExtraCoopArgs: indexArgs("none")})
		if err != nil {
			return err
		}
		if err := n.PullCtr(ctx, img.Ref); err != nil {
			return fmt.Errorf("%s: pull: %w", h.Name, err)
		}
		missing := img.Layers[1+i%layers] // layer 0 is busybox
		if _, err := n.Ctr(ctx, "content", "rm", missing.Digest.String()); err != nil {
			return fmt.Errorf("%s: drop a layer: %w", h.Name, err)
		}
	}
	if err := reg.Close(); err != nil {
		return err
	}
	d.logf("the registry is gone: the image now exists only on the source and, in part, on the neighbours")
	if got := answers(ctx, src); !strings.Contains(got, "coop") {
		return fmt.Errorf("the source's container does not answer: %q", got)
	}

	type run struct {
		label string
		index string
		res   *migrate.Result
	}
	runs := []*run{{label: "traditional (source only)", index: "none"}, {label: "cooperative (source + neighbours, through ClusterKB)", index: "kb"}}
	answered := true
	for _, r := range runs {
		dst, err := d.node(destHost, harness.NodeOptions{Registries: up, Migrations: true, ExtraCoopArgs: indexArgs(r.index)})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "\n=== migration %s\n", r.label)
		if r.res, err = runMigration(ctx, dst, src, filepath.Join(dir, r.index+".json"), out); err != nil {
			return err
		}
		got := answers(ctx, dst)
		fmt.Fprintf(out, "the container answers at the destination: %q\n", strings.TrimSpace(got))
		answered = answered && strings.Contains(got, "coop")
		if err := d.stopNode(dst); err != nil {
			return err
		}
	}

	trad, coop := runs[0].res.Seconds, runs[1].res.Seconds
	image := float64(img.LayerBytes())
	fmt.Fprintf(out, "\n=== comparison (image %.0f MiB; uplinks 100 Mbit/s)\n", image/(1<<20))
	for _, r := range runs {
		fmt.Fprintf(out, "  %-52s %6.2f s\n", r.label, r.res.Seconds)
	}
	fmt.Fprintf(out, "  speedup: %.2f×\n\n", trad/coop)

	// Act 2: the service scales out to fresh nodes, all at once.
	type rollout struct {
		label, index string
		swarm        bool
		seconds      float64
		sourceBytes  float64
	}
	rollouts := []*rollout{
		{label: "traditional (each from the source only)", index: "none"},
		{label: "cooperative (swarm: source, neighbours, each other)", index: "kb", swarm: true},
	}
	for _, r := range rollouts {
		fmt.Fprintf(out, "\n=== act 2: the service scales out to %d more nodes at once, %s\n", len(scaleHosts), r.label)
		if r.seconds, r.sourceBytes, err = d.scaleOut(ctx, src, up, r.index, r.swarm, out); err != nil {
			return err
		}
	}
	fmt.Fprintf(out, "\n=== rollout to %d nodes at once (image %.0f MiB; uplinks 100 Mbit/s)\n", len(scaleHosts), image/(1<<20))
	for _, r := range rollouts {
		fmt.Fprintf(out, "  %-52s %6.2f s   the source sent %.2f images\n", r.label, r.seconds, r.sourceBytes/image)
	}
	fmt.Fprintf(out, "  speedup: %.2f×\n\n", rollouts[0].seconds/rollouts[1].seconds)
	if path := os.Getenv("DEMO_JSON"); path != "" {
		b, err := json.Marshal(map[string]any{"traditional_seconds": trad, "cooperative_seconds": coop, "answered": answered,
			"rollout_nodes": len(scaleHosts), "rollout_traditional_seconds": rollouts[0].seconds, "rollout_cooperative_seconds": rollouts[1].seconds,
			"rollout_traditional_source_images": rollouts[0].sourceBytes / image, "rollout_cooperative_source_images": rollouts[1].sourceBytes / image})
		if err != nil {
			return err
		}
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	if !answered {
		return errors.New("the migrated container did not answer HTTP")
	}
	return nil
}

// scaleOut starts a fresh node on every scale host (index; swarm or not),
// migrates the service from src to all of them at once, checks that each
// answers, stops them, and returns the seconds until the last one runs and
// the bytes the source sent meanwhile.
func (d *demo) scaleOut(ctx context.Context, src *harness.Node, up []harness.Upstream, index string, swarm bool, out io.Writer) (float64, float64, error) {
	var nodes []*harness.Node
	defer func() {
		for _, n := range nodes {
			_ = d.stopNode(n)
		}
	}()
	for _, h := range scaleHosts {
		args := append(indexArgs(index), "--swarm="+strconv.FormatBool(swarm))
		n, err := d.node(h, harness.NodeOptions{Registries: up, Migrations: true, ExtraCoopArgs: args})
		if err != nil {
			return 0, 0, err
		}
		nodes = append(nodes, n)
	}
	sent0, err := src.Metric(ctx, "coop_peer_served_bytes_total")
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	errs := make([]error, len(nodes))
	took := make([]float64, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			_, errs[i] = runMigration(ctx, n, src, filepath.Join(d.dir, fmt.Sprintf("%s-%s.json", index, n.Name)), io.Discard)
			took[i] = time.Since(start).Seconds()
		})
	}
	wg.Wait()
	last := time.Since(start).Seconds()
	sent1, err := src.Metric(ctx, "coop_peer_served_bytes_total")
	if err != nil {
		return 0, 0, err
	}
	for i, n := range nodes {
		if errs[i] != nil {
			return 0, 0, fmt.Errorf("%s: %w", n.Name, errs[i])
		}
		got := answers(ctx, n)
		if !strings.Contains(got, "coop") {
			return 0, 0, fmt.Errorf("%s: the migrated container does not answer: %q", n.Name, got)
		}
		up, _ := n.Metric(ctx, "coop_peer_served_bytes_total")
		fmt.Fprintf(out, "  %s: running and answering after %6.2f s; it sent %.1f MiB to the others\n", n.Name, took[i], up/(1<<20))
	}
	return last, sent1 - sent0, nil
}

// runMigration runs coop migrate at dst from src, its live display and table on
// out, and returns its JSON result.
func runMigration(ctx context.Context, dst, src *harness.Node, jsonPath string, out io.Writer) (*migrate.Result, error) {
	mctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	bin, args := inNS(dst.Name, dst.Tools().Coop, "migrate", "--from", src.PeerURL(), "--containerd-address", dst.Address,
		"--mirror", dst.MirrorURL(), "--mirror-token-file", dst.MirrorTokenFile(), "--tls-dir", dst.TLSDir(),
		"--hosts-dir", dst.HostsDir, "--runc-root", dst.RuncRoot,
		"--cgroups-path", "/coopdemo-"+dst.Name+"-"+container, "--json-file", jsonPath, "--start", container)
	cmd := exec.CommandContext(mctx, bin, args...)
	cmd.Stdout, cmd.Stderr = out, os.Stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("coop migrate: %w", err)
	}
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		return nil, err
	}
	var res migrate.Result
	if err := json.Unmarshal(b, &res); err != nil {
		return nil, err
	}
	return &res, nil
}

// answers asks the container's httpd from inside the container.
func answers(ctx context.Context, n *harness.Node) string {
	for range 50 {
		got, err := n.Ctr(ctx, "task", "exec", "--exec-id", fmt.Sprintf("probe-%d", time.Now().UnixNano()), container,
			"/bin/busybox", "wget", "-qO-", "http://127.0.0.1:8080/")
		if err == nil {
			return got
		}
		time.Sleep(100 * time.Millisecond)
	}
	return ""
}

func waitHTTP(ctx context.Context, c *http.Client, url string) error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		if err := harness.HTTPOK(ctx, c, url); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
