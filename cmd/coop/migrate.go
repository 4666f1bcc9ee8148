package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/plugin/migrate"
	"github.com/coopnet/coop/plugin/mirror"
)

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := migrate.Options{}
	mirrorURL := "http://" + defaultMirrorListen
	fs.StringVar(&o.From, "from", "", "the source node's coop peer URL, e.g. https://node-a:5050 (required)")
	tlsDir := fs.String("tls-dir", "", "credentials (ca.crt, tls.crt, tls.key; this node's coop node --tls-dir will do) for mutual TLS with the source; empty: plain HTTP")
	fs.StringVar(&o.Namespace, "namespace", "default", "containerd namespace of the container (k8s.io for CRI)")
	fs.StringVar(&o.Containerd, "containerd-address", "/run/containerd/containerd.sock", "this node's containerd socket")
	fs.StringVar(&mirrorURL, "mirror", mirrorURL, "this node's coop mirror URL")
	tokenFile := fs.String("mirror-token-file", filepath.Join("/var/lib/coop", mirror.TokenFile), "the mirror's API token, which this node's coop node creates in its --root (readable by its user only)")
	fs.StringVar(&o.HostsDir, "hosts-dir", defaultHostsDir, "containerd's hosts.toml directory (the one coop containerd-config --write wrote)")
	fs.StringVar(&o.Snapshotter, "snapshotter", "", "snapshotter to use here (default: the source's)")
	fs.StringVar(&o.CgroupsPath, "cgroups-path", "", "cgroups path for the container here (default: the source's)")
	fs.StringVar(&o.RuncRoot, "runc-root", "", "runc state directory (default: runc's)")
	fs.BoolVar(&o.Start, "start", false, "start the container here")
	fs.BoolVar(&o.StopSource, "stop-source", false, "with --start: stop the source's task once this one runs")
	fs.BoolVar(&o.AllowPrivileged, "allow-privileged", false, "recreate a container that asks for more than a new container gets here (capabilities, host mounts, host namespaces, devices, hooks)")
	jsonOut := fs.Bool("json", false, "print the result as one JSON object")
	jsonFile := fs.String("json-file", "", "also write the JSON result to this file")
	timeout := fs.Duration("timeout", 30*time.Minute, "give up after this long")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: coop migrate --from URL [--namespace NS] [--start] [--stop-source] [--allow-privileged] [--json] CONTAINER\n\nRecreates a container of the source node here, its image fetched from the source and the neighbours.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 || o.From == "" {
		fs.Usage()
		return fmt.Errorf("want --from and one container: %w", errUsage)
	}
	if o.StopSource && !o.Start {
		return fmt.Errorf("--stop-source needs --start: %w", errUsage)
	}
	o.ID = fs.Arg(0)
	token, err := mirror.ReadToken(*tokenFile)
	if err != nil {
		return fmt.Errorf("--mirror-token-file: %w (coop node creates it in its --root; run as the node's user)", err)
	}
	peerTransport := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		ResponseHeaderTimeout: 30 * time.Second, // a stop waits for the source's task
	}
	self := "coop-migrate"
	if *tlsDir != "" {
		creds, err := trust.Load(*tlsDir)
		if err != nil {
			return fmt.Errorf("--tls-dir: %w", err)
		}
		peerTransport.TLSClientConfig, self = creds.ClientConfig(), creds.Name()
	}
	o.Peers = &peers.Client{Node: self, HTTP: &http.Client{Transport: peerTransport}}
	o.Mirror = &mirror.Client{URL: mirrorURL, Token: token, HTTP: &http.Client{Transport: &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		ResponseHeaderTimeout: 30 * time.Second,
	}}}
	if !*jsonOut {
		o.Progress = layerProgress{w: stderr, mirror: o.Mirror}.start
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	res, err := migrate.Run(ctx, o)
	if err != nil {
		return fmt.Errorf("migrate %s: %w", o.ID, err)
	}
	if *jsonFile != "" {
		b, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(*jsonFile, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("--json-file: %w", err)
		}
	}
	if *jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	printProvenance(stdout, res)
	return nil
}

// printProvenance prints the per-layer table and the summary.
func printProvenance(w io.Writer, res *migrate.Result) {
	nodes := map[string]bool{}
	for _, l := range res.Layers {
		for n := range l.BytesByNode {
			nodes[n] = true
		}
	}
	var cols []string
	for n := range nodes {
		cols = append(cols, n)
	}
	sort.Strings(cols)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "LAYER\tMIB\t%s\tSECONDS\t\n", strings.Join(upper(cols), "\t"))
	for _, l := range res.Layers {
		fmt.Fprintf(tw, "%s\t%.1f\t", shortDigest(l.Digest), mib(l.Size))
		for _, n := range cols {
			fmt.Fprintf(tw, "%.1f\t", mib(l.BytesByNode[n]))
		}
		fmt.Fprintf(tw, "%.2f\t\n", l.Seconds)
	}
	_ = tw.Flush()
	var fromSource, fromNeighbours, fromRegistry, local int64
	for n, b := range res.BytesByNode {
		switch n {
		case res.Source:
			fromSource += b
		case migrate.FromRegistry:
			fromRegistry += b
		case migrate.FromLocal:
			local += b
		default:
			fromNeighbours += b
		}
	}
	state := "created"
	if res.Started {
		state = "started"
	}
	fmt.Fprintf(w, "\n%s %s in %.2f s (pull %.2f s): %.1f MiB from the source (%s), %.1f MiB from neighbours, %.1f MiB from a registry, %.1f MiB already here\n",
		res.Container, state, res.Seconds, res.PullSeconds, mib(fromSource), res.Source, mib(fromNeighbours), mib(fromRegistry), mib(local))
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func upper(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strings.ToUpper(s)
	}
	return out
}
