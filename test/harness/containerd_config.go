package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// baseConfig is the per-node containerd config.toml the harness writes
// (CONTAINERD.md, "One containerd per simulated node"): its own root, state,
// temp, sockets, shim socket_dir, opt path and runc root; no imports; NRI off.
type baseConfig struct {
	Root, State, Temp  string
	GRPC, TTRPC        string
	ShimSocketDir      string
	OptDir             string
	RuncRoot           string
	LogLevel           string
	RegistryConfigPath string // set for plain containerd; coop adds its own
	Snapshotter        string
}

func (c baseConfig) render() string {
	var b strings.Builder
	fmt.Fprintf(&b, "version = 3\n")
	fmt.Fprintf(&b, "root = %q\nstate = %q\ntemp = %q\n", c.Root, c.State, c.Temp)
	fmt.Fprintf(&b, "imports = []\n")
	fmt.Fprintf(&b, "disabled_plugins = [\"io.containerd.nri.v1.nri\"]\n\n")
	fmt.Fprintf(&b, "[grpc]\n  address = %q\n\n", c.GRPC)
	fmt.Fprintf(&b, "[ttrpc]\n  address = %q\n\n", c.TTRPC)
	fmt.Fprintf(&b, "[debug]\n  level = %q\n\n", c.LogLevel)
	fmt.Fprintf(&b, "[plugins]\n")
	fmt.Fprintf(&b, "  [plugins.\"io.containerd.shim.v1.manager\"]\n    socket_dir = %q\n", c.ShimSocketDir)
	fmt.Fprintf(&b, "  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = %q\n", c.OptDir)
	fmt.Fprintf(&b, "  [plugins.\"io.containerd.cri.v1.images\"]\n    snapshotter = %q\n", c.Snapshotter)
	if c.RegistryConfigPath != "" {
		fmt.Fprintf(&b, "    [plugins.\"io.containerd.cri.v1.images\".registry]\n      config_path = %q\n", c.RegistryConfigPath)
	}
	fmt.Fprintf(&b, "  [plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.runc]\n    runtime_type = \"io.containerd.runc.v2\"\n")
	fmt.Fprintf(&b, "    [plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.runc.options]\n      Root = %q\n", c.RuncRoot)
	return b.String()
}

// writeHostsToml writes DIR/<host>/hosts.toml sending host's pulls to
// upstream (plain containerd: no mirror).
func writeHostsToml(dir, host, upstream string) error {
	d := filepath.Join(dir, host)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	body := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", upstream, upstream)
	return writeFileAtomic(filepath.Join(d, "hosts.toml"), []byte(body))
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// writeMirrorHostsToml writes dir/host/hosts.toml with the mirror first,
// then the upstream registry.
func writeMirrorHostsToml(dir, host, mirror, upstream string) error {
	d := filepath.Join(dir, host)
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	body := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\"]\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", upstream, mirror, upstream)
	return writeFileAtomic(filepath.Join(d, "hosts.toml"), []byte(body))
}
