package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/coopnet/coop/plugin"
	"github.com/coopnet/coop/plugin/node"
)

type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error {
	*l = append(*l, splitList(s)...)
	return nil
}

func runContainerdConfig(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("containerd-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		socket      = fs.String("content-socket", defaultContentSocket, "coop node's content and diff socket")
		mirror      = fs.String("mirror-listen", defaultMirrorListen, "coop node's mirror address (loopback)")
		hostsDir    = fs.String("hosts-dir", defaultHostsDir, "registry hosts directory (CRI config_path; pass it to `ctr pull --hosts-dir`)")
		base        = fs.String("base", "", "an existing containerd config.toml (version 3) to merge coop's settings into; without it only coop's part is printed")
		output      = fs.String("output", "", "write the config here (atomically) instead of stdout")
		mode        = fs.String("content-mode", node.ContentProxy, "coop node's --content-mode: proxy (the default: coop is containerd's content store and differ) or observer (containerd keeps its store; only the mirror and CRI's config_path are set)")
		write       = fs.Bool("write", false, "also write HOSTS_DIR/<registry>/hosts.toml for each --registry, merging existing files")
		existing    = fs.Bool("existing", false, "with --write: also every registry that already has a directory in HOSTS_DIR (its own hosts.toml would bypass _default's mirror)")
		quiet       = fs.Bool("quiet", false, "do not print the config (with --write: only the hosts.toml files are wanted)")
		snaps, plat listFlag
		registries  listFlag
	)
	fs.Var(&snaps, "snapshotter", "snapshotters to unpack with coop's differ (comma list; default overlayfs,native)")
	fs.Var(&plat, "platform", "platforms to unpack with coop's differ (comma list; default this machine's, linux/"+runtime.GOARCH+")")
	fs.Var(&registries, "registry", "registry to mirror, HOST[=UPSTREAM_URL] (repeatable; _default for every registry; default _default)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	if *mode != node.ContentObserver && *mode != node.ContentProxy {
		return fmt.Errorf("--content-mode %q: want observer or proxy: %w", *mode, errUsage)
	}
	if len(snaps) == 0 {
		snaps = listFlag{"overlayfs", "native"}
	}
	if len(plat) == 0 {
		plat = listFlag{"linux/" + runtime.GOARCH}
	}
	if len(registries) == 0 {
		registries = listFlag{"_default"}
	}
	mirrorURL, err := plugin.MirrorURL(*mirror)
	if err != nil {
		return err
	}
	var baseCfg []byte
	if *base != "" {
		if baseCfg, err = os.ReadFile(*base); err != nil {
			return fmt.Errorf("--base: %w", err)
		}
	}
	cfg, err := plugin.MergeContainerdConfig(baseCfg, plugin.ContainerdConfigOptions{
		ContentSocket: *socket,
		HostsDir:      *hostsDir,
		Snapshotters:  snaps,
		Platforms:     plat,
		Observer:      *mode == node.ContentObserver,
	})
	if err != nil {
		return err
	}
	var regs []plugin.Registry
	for _, r := range registries {
		reg, err := plugin.ParseRegistry(r)
		if err != nil {
			return err
		}
		regs = append(regs, reg)
	}
	if *write && *existing {
		more, err := existingRegistries(*hostsDir, regs)
		if err != nil {
			return err
		}
		regs = append(regs, more...)
	}
	if *write {
		for _, r := range regs {
			path, err := plugin.WriteHostsTOML(*hostsDir, r, mirrorURL)
			if err != nil {
				return err
			}
			fmt.Fprintf(stderr, "wrote %s\n", path)
		}
	}
	if *output != "" {
		if err := plugin.WriteFileAtomic(*output, cfg, 0o644); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "wrote %s\n", *output)
		return nil
	}
	if *quiet {
		return nil
	}
	_, err = stdout.Write(cfg)
	return err
}

// existingRegistries returns the registries with a directory in hostsDir
// that regs does not name already.
func existingRegistries(hostsDir string, regs []plugin.Registry) ([]plugin.Registry, error) {
	ents, err := os.ReadDir(hostsDir)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("--existing: %w", err)
	}
	named := map[string]bool{}
	for _, r := range regs {
		named[r.Host] = true
	}
	var out []plugin.Registry
	for _, e := range ents {
		if !e.IsDir() || named[e.Name()] {
			continue
		}
		r, err := plugin.ParseRegistry(e.Name())
		if err != nil {
			continue // not a registry's directory
		}
		out = append(out, r)
	}
	return out, nil
}
