package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
)

// locateRow is one line of coop locate's output.
type locateRow struct {
	Digest digest.Digest `json:"digest"`
	Node   string        `json:"node"`
	URL    string        `json:"url"`
	Size   int64         `json:"size"`
}

func runLocate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("locate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	node := fs.String("node", "http://"+defaultMirrorListen, "the node's mirror URL (its loopback address), or a ClusterKB URL")
	asNode := fs.String("as", "", "with a ClusterKB URL: ask as this node (its neighbours only, never itself)")
	jsonOut := fs.Bool("json", false, "print a JSON list of {digest, node, url, size}")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: coop locate [--node URL] [--json] DIGEST...\n\nPrints the candidates the node's resolver returns now for each digest.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return fmt.Errorf("no digest given: %w", errUsage)
	}
	req := resolver.LocateRequest{Node: *asNode}
	for _, a := range fs.Args() {
		d, err := digest.Parse(a)
		if err != nil {
			return fmt.Errorf("%q is not a digest: %v: %w", a, err, errUsage)
		}
		req.Digests = append(req.Digests, d)
	}
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	u, err := peers.JoinURL(*node, resolver.LocatePath)
	if err != nil {
		return fmt.Errorf("--node: %v: %w", err, errUsage)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("--node %q: %w", *node, err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(hreq)
	if err != nil {
		return fmt.Errorf("ask %s: %w", *node, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("ask %s: %s: %s", *node, resp.Status, bytes.TrimSpace(b))
	}
	var lr resolver.LocateResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&lr); err != nil {
		return fmt.Errorf("ask %s: bad answer: %w", *node, err)
	}
	rows := []locateRow{}
	for _, d := range req.Digests {
		cs := lr.Candidates[d]
		sort.SliceStable(cs, func(i, j int) bool { return cs[i].Node < cs[j].Node })
		for _, c := range cs {
			rows = append(rows, locateRow{Digest: d, Node: c.Node, URL: c.URL, Size: c.Size})
		}
	}
	if *jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIGEST\tNODE\tURL\tSIZE")
	for _, d := range req.Digests {
		if len(lr.Candidates[d]) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t-\n", d)
		}
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", r.Digest, r.Node, r.URL, r.Size)
	}
	return tw.Flush()
}
