package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/coopnet/coop/peers/trust"
)

// runCA sets up the cluster's identities without cert-manager:
//
//	coop ca init  --dir /etc/coop/ca
//	coop ca issue --dir /etc/coop/ca --name node-a --out /etc/coop/tls
func runCA(_ context.Context, args []string, stdout, stderr io.Writer) error {
	usage := func() {
		fmt.Fprintln(stderr, "usage: coop ca init --dir DIR\n       coop ca issue --dir DIR --name NAME --out DIR [--dns NAME,...] [--ip IP,...]")
	}
	if len(args) == 0 {
		usage()
		return errUsage
	}
	fs := flag.NewFlagSet("ca "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "/etc/coop/ca", "the CA's directory (ca.crt, ca.key); keep ca.key off the nodes")
	switch args[0] {
	case "init":
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if fs.NArg() > 0 {
			return fmt.Errorf("unexpected arguments %q: %w", fs.Args(), errUsage)
		}
		if err := trust.InitCA(*dir, trust.CAOptions{}); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "cluster CA in %s (%s, %s); issue each node's certificate with: coop ca issue --dir %s --name NODE --out DIR\n", *dir, trust.CAFile, trust.CAKey, *dir)
		return nil
	case "issue":
		name := fs.String("name", "", "the process's name: a node's --name, or the KB's (required)")
		out := fs.String("out", "", "where to write ca.crt, tls.crt and tls.key: the process's --tls-dir (required)")
		dns := fs.String("dns", "", "extra DNS names the process is dialled at, comma-separated")
		ips := fs.String("ip", "", "IP addresses the process is dialled at, comma-separated")
		validity := fs.Duration("validity", 365*24*time.Hour, "how long the certificate is valid")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *name == "" || *out == "" || fs.NArg() > 0 {
			usage()
			return fmt.Errorf("want --name and --out: %w", errUsage)
		}
		if *validity <= 0 {
			return fmt.Errorf("--validity %v: want a positive duration: %w", *validity, errUsage)
		}
		o := trust.IssueOptions{Name: *name, DNSNames: splitList(*dns), Validity: *validity}
		for _, s := range splitList(*ips) {
			ip := net.ParseIP(s)
			if ip == nil {
				return fmt.Errorf("--ip %q: not an IP address: %w", s, errUsage)
			}
			o.IPs = append(o.IPs, ip)
		}
		if err := trust.Issue(*dir, *out, o); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s: certificate for %q in %s; start it with --tls-dir %s (files are read again when rotated)\n", *out, *name, *out, *out)
		return nil
	default:
		usage()
		return fmt.Errorf("unknown ca command %q: %w", args[0], errUsage)
	}
}

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
