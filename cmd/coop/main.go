// Command coop is coop's one binary: `coop node` runs beside containerd on
// every node, `coop kb` runs ClusterKB and its broker, `coop migrate` moves a
// container here from another node, `coop locate` asks who holds a blob,
// `coop status` says whether coop works on a node, and `coop
// containerd-config` prints or writes containerd's side of the setup.
// Each subcommand is a file here that turns flags into a package's options.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Version is set at build time with -ldflags "-X main.Version=...".
var Version = "dev"

type command struct {
	name, summary string
	run           func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"node", "run the node daemon: content proxy, diff service, peer server, mirror", runNode},
		{"kb", "run ClusterKB: the central neighbour index, with an embedded NATS broker", runKB},
		{"migrate", "recreate a container of another node here, its image fetched cooperatively", runMigrate},
		{"locate", "ask a node (or ClusterKB) which peers hold blobs now", runLocate},
		{"status", "say whether coop works on this node: modes, neighbours, bytes, claims, last errors", runStatus},
		{"ca", "set up the cluster CA (init) and a process's certificate (issue) for mutual TLS", runCA},
		{"containerd-config", "print containerd's config for coop; --write also writes hosts.toml", runContainerdConfig},
		{"install", "set a host up to run coop node under systemd before containerd (proxy and claim modes)", runInstall},
		{"version", "print the version", func(_ context.Context, _ []string, stdout, _ io.Writer) error {
			_, err := fmt.Fprintln(stdout, "coop", Version)
			return err
		}},
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: coop COMMAND [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-18s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun `coop COMMAND -h` for a command's flags.")
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, errUsage) || errdefs.IsInvalidArgument(err):
		if err != errUsage { //nolint:errorlint // the bare sentinel: usage was printed
			fmt.Fprintln(os.Stderr, "coop:", err)
		}
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "coop:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, args[1:], stdout, stderr)
		}
	}
	usage(stderr)
	return fmt.Errorf("unknown command %q: %w", args[0], errUsage)
}

// setLogLevel sets containerd/log's level; logs go to stderr.
func setLogLevel(level string) error {
	if err := log.SetLevel(level); err != nil {
		return fmt.Errorf("--log-level %q: %w", level, err)
	}
	return nil
}
