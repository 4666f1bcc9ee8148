package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/node"
)

// errProblems is returned when the node answers but something is wrong: the
// exit status is then 1, after the status was printed.
var errProblems = errors.New("coop does not work fully on this node")

// maxStatusAnswer bounds the node's status answer.
const maxStatusAnswer = 16 << 20

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	nodeURL := fs.String("node", "http://"+defaultMirrorListen, "the node's mirror URL (its loopback address)")
	jsonOut := fs.Bool("json", false, "print the status as JSON")
	all := fs.Bool("all", false, "also list every node ClusterKB knows, one line each (the node must use --kb)")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after this long")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: coop status [--node URL] [--json] [--all]\n\nSays whether coop works on this node; exits 1 when something is wrong, 2 when the node does not answer.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	u, err := peers.JoinURL(*nodeURL, node.StatusPath)
	if err != nil {
		return fmt.Errorf("--node: %v: %w", err, errUsage)
	}
	if *all {
		u += "?all=1"
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("--node: %v: %w", err, errUsage)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("no coop node answers at %s (is coop node running? --node sets its mirror address): %v: %w", *nodeURL, err, errUsage)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s (a coop node older than coop status?): %w", u, resp.Status, errUsage)
	}
	var s node.Status
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxStatusAnswer)).Decode(&s); err != nil {
		return fmt.Errorf("%s: not a status: %v: %w", u, err, errUsage)
	}
	if *jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(s); err != nil {
			return err
		}
	} else {
		printStatus(stdout, s, time.Now())
	}
	if len(s.Problems) > 0 {
		return errProblems
	}
	return nil
}

// printStatus draws one screen of s.
func printStatus(w io.Writer, s node.Status, now time.Time) {
	verdict := "OK"
	if len(s.Problems) > 0 {
		verdict = fmt.Sprintf("%d PROBLEM(S)", len(s.Problems))
	}
	fmt.Fprintf(w, "coop node %s: %s (up %s)\n", s.Node, verdict, now.Sub(s.Started).Round(time.Second))
	for _, p := range s.Problems {
		fmt.Fprintf(w, "  ! %s\n", p)
	}
	mode := s.ContentMode
	if s.Claim {
		mode += " + claim"
		if s.ClaimRegistry {
			mode += " (registry fallback)"
		}
	}
	fmt.Fprintf(w, "content   %s; advertised at %s\n", mode, s.Advertise)
	if !s.TLSNotAfter.IsZero() {
		fmt.Fprintf(w, "tls       certificate valid until %s (%s)\n", s.TLSNotAfter.Format(time.RFC3339), s.TLSNotAfter.Sub(now).Round(time.Hour))
	} else {
		fmt.Fprintln(w, "tls       off (--insecure or loopback)")
	}
	idx := "index     " + s.Index.Mode
	if s.Index.Broker != "" {
		idx += "; broker " + s.Index.Broker
	}
	if s.Index.KB != "" {
		idx += "; ClusterKB " + s.Index.KB
	}
	if s.Index.Entries > 0 {
		idx += fmt.Sprintf("; %d entries", s.Index.Entries)
	}
	if len(s.Index.Updates) > 0 {
		idx += "; updates " + counts(s.Index.Updates)
	}
	fmt.Fprintln(w, idx)
	shared := "swarm off"
	if s.Blobs.Shared >= 0 {
		shared = fmt.Sprintf("%d shared as they arrive", s.Blobs.Shared)
	}
	fmt.Fprintf(w, "blobs     %d held, %d in flight (%s), %s unverified on disk\n", s.Blobs.Held, s.Blobs.InFlight, shared, bytesString(s.Blobs.UnverifiedBytes))
	var fromPeers int64
	for _, v := range s.Bytes.FromPeers {
		fromPeers += v
	}
	fmt.Fprintf(w, "bytes     served to peers %s; from peers %s", bytesString(s.Bytes.ServedToPeers), bytesString(fromPeers))
	if len(s.Bytes.FromPeers) > 0 {
		parts := make([]string, 0, len(s.Bytes.FromPeers))
		for _, k := range sortedKeys(s.Bytes.FromPeers) {
			parts = append(parts, k+" "+bytesString(s.Bytes.FromPeers[k]))
		}
		fmt.Fprintf(w, " (%s)", strings.Join(parts, ", "))
	}
	fmt.Fprintf(w, "; from registries %s\n", bytesString(s.Bytes.FromRegistries))
	if s.Claim {
		fmt.Fprintf(w, "claims    %s\n", counts(s.Claims))
	}
	if len(s.Neighbors) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NEIGHBOUR\tSTATE\tUPLOADS\tMEASURED\tINDEX\tURL")
		for _, nb := range s.Neighbors {
			state := fmt.Sprintf("up %s", nb.RTT.Round(time.Millisecond))
			if !nb.Up {
				state = "DOWN"
			}
			up := "-"
			if nb.MaxUploads > 0 {
				up = fmt.Sprintf("%d/%d", nb.ActiveUploads, nb.MaxUploads)
			}
			bw := "-"
			if nb.Bandwidth > 0 {
				bw = bytesString(int64(nb.Bandwidth)) + "/s"
			}
			seen := "-"
			if !nb.LastSeen.IsZero() {
				seen = fmt.Sprintf("%d blobs, %s ago", nb.Blobs, now.Sub(nb.LastSeen).Round(time.Second))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", nb.Name, state, up, bw, seen, nb.URL)
		}
		tw.Flush()
		for _, nb := range s.Neighbors {
			if !nb.Up {
				fmt.Fprintf(w, "  %s: %s\n", nb.Name, nb.Error)
			}
		}
	} else {
		fmt.Fprintln(w, "neighbours none")
	}
	if len(s.Members) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "MEMBER\tHEARTBEAT\tBLOBS\tINVENTORY\tURL")
		for _, m := range s.Members {
			hb := "static"
			if !m.LastHeartbeat.IsZero() {
				hb = now.Sub(m.LastHeartbeat).Round(time.Second).String() + " ago"
			}
			inv := "-"
			if !m.LastSeen.IsZero() {
				inv = fmt.Sprintf("seq %d, %s ago", m.Seq, now.Sub(m.LastSeen).Round(time.Second))
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", m.Name, hb, m.Blobs, inv, m.URL)
		}
		tw.Flush()
	}
	if len(s.Errors) > 0 {
		fmt.Fprintln(w, "\nlast warnings and errors:")
		for _, e := range s.Errors {
			msg := e.Message
			if e.Error != "" {
				msg += ": " + e.Error
			}
			fmt.Fprintf(w, "  %s %-5s %s\n", e.Time.Format("15:04:05"), e.Level, msg)
		}
	}
}

func counts(m map[string]int64) string {
	if len(m) == 0 {
		return "none"
	}
	parts := make([]string, 0, len(m))
	for _, k := range sortedKeys(m) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func sortedKeys(m map[string]int64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// bytesString prints n in B, KiB, MiB or GiB.
func bytesString(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
