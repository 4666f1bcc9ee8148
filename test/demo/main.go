// Command demo runs coop's main job on one machine: a cooperative pull
// between two real containerd nodes. Node A pulls an image through the
// registry; the registry goes down; node B pulls the same image through coop,
// entirely from A. It prints who served what and how long each pull took,
// and tears everything down on exit, on failure and on Ctrl-C.
//
// Run it with `make demo` (as root). DEMO_JSON=path also writes a JSON
// summary; DEMO_LAYERS=3 and DEMO_LAYER_MIB=32 size the image.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/test/harness"
)

// pullResult is one row of the summary.
type pullResult struct {
	Node              string  `json:"node"`
	Source            string  `json:"source"`
	Seconds           float64 `json:"seconds"`
	RegistryRequests  int64   `json:"registryRequests"`
	RegistryBlobBytes int64   `json:"registryBlobBytes"`
	PeerServedBytes   int64   `json:"peerServedBytes"`
}

// summary is what DEMO_JSON receives.
type summary struct {
	Image      string       `json:"image"`
	Layers     int          `json:"layers"`
	LayerBytes int64        `json:"layerBytes"`
	Pulls      []pullResult `json:"pulls"`
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Stdout)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("interrupted: %w", err)
	}
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
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

func run(ctx context.Context, out io.Writer) (retErr error) {
	if os.Geteuid() != 0 {
		return errors.New("the demo starts containerd and needs root: run make demo as root")
	}
	layers, err := envInt("DEMO_LAYERS", 3)
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
	_ = log.SetLevel("info")
	logf := func(format string, args ...any) { log.G(ctx).Infof(format, args...) }

	reg, err := harness.StartRegistry(ctx, harness.RegistryOptions{})
	if err != nil {
		return err
	}
	defer reg.Close()

	sizes := make([]int64, layers)
	for i := range sizes {
		sizes[i] = int64(layerMiB) << 20
	}
	logf("building an image of %d × %d MiB random layers", layers, layerMiB)
	img, err := reg.PushRandomImage(ctx, harness.ImageSpec{Repo: "coop/demo", Tag: "v1", LayerSizes: sizes})
	if err != nil {
		return err
	}
	logf("pushed %s", img.DigestRef)

	up := []harness.Upstream{harness.UpstreamOf(reg)}
	var nodes []*harness.Node
	defer func() {
		for _, n := range nodes {
			if retErr != nil && ctx.Err() == nil {
				fmt.Fprintf(os.Stderr, "%s\n", n.LogTail(30))
			}
			if err := n.Stop(); err != nil {
				log.G(ctx).WithError(err).Warnf("stop node %s", n.Name)
			}
		}
	}()
	a, err := harness.StartNode(ctx, tools, harness.NodeOptions{Name: "a", Registries: up, CoopLogLevel: "info", Logf: logf})
	if err != nil {
		return err
	}
	nodes = append(nodes, a)
	b, err := harness.StartNode(ctx, tools, harness.NodeOptions{Name: "b", Registries: up, Neighbors: []harness.Neighbor{a.AsNeighbor()}, CoopLogLevel: "info", Logf: logf})
	if err != nil {
		return err
	}
	nodes = append(nodes, b)

	sum := summary{Image: img.DigestRef, Layers: len(img.Layers), LayerBytes: img.LayerBytes()}
	pull := func(n *harness.Node, source string) error {
		served0, err := a.Metric(ctx, harness.MetricPeerServedBytes)
		if err != nil {
			return err
		}
		reg.ResetCounts()
		pctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		start := time.Now()
		if err := n.PullCtr(pctx, img.DigestRef); err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
		took := time.Since(start)
		served, err := a.Metric(ctx, harness.MetricPeerServedBytes)
		if err != nil {
			return err
		}
		c := reg.Counts()
		sum.Pulls = append(sum.Pulls, pullResult{
			Node: n.Name, Source: source, Seconds: took.Seconds(),
			RegistryRequests: c.Requests, RegistryBlobBytes: c.BlobBytes,
			PeerServedBytes: int64(served - served0),
		})
		logf("node %s pulled in %v", n.Name, took.Round(time.Millisecond))
		return nil
	}

	if err := pull(a, "registry (through A's mirror: no peer holds it)"); err != nil {
		return err
	}
	if err := reg.Stop(); err != nil {
		return err
	}
	logf("registry stopped")
	if err := pull(b, "node A (registry down)"); err != nil {
		return err
	}
	if p := sum.Pulls[1]; p.PeerServedBytes < img.LayerBytes() || p.RegistryRequests != 0 {
		return fmt.Errorf("node B's pull was not served by A: A sent %d bytes of %d, registry saw %d requests",
			p.PeerServedBytes, img.LayerBytes(), p.RegistryRequests)
	}

	fmt.Fprintf(out, "\nimage %s: %d layers, %s\n\n", img.DigestRef, len(img.Layers), mib(img.LayerBytes()))
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PULL\tNODE\tTIME\tREGISTRY REQUESTS\tREGISTRY BLOB BYTES\tSERVED BY A (PEER)\tSOURCE")
	for i, p := range sum.Pulls {
		fmt.Fprintf(tw, "%d\t%s\t%.2fs\t%d\t%s\t%s\t%s\n", i+1, p.Node, p.Seconds, p.RegistryRequests,
			mib(p.RegistryBlobBytes), mib(p.PeerServedBytes), p.Source)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out)

	if path := os.Getenv("DEMO_JSON"); path != "" {
		b, err := json.MarshalIndent(sum, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			return err
		}
		logf("summary written to %s", path)
	}
	return nil
}

func mib(n int64) string {
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}
