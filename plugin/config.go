package plugin

import (
	"bytes"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"
)

// Names coop gives its proxy plugins in containerd's config.
const (
	ContentPluginName = "coop"
	DiffPluginName    = "coop-diff"
	builtinContent    = "io.containerd.content.v1.content"
	transferPlugin    = "io.containerd.transfer.v1.local"
	criImagesPlugin   = "io.containerd.cri.v1.images"
	diffServicePlugin = "io.containerd.service.v1.diff-service"
)

// ContainerdConfigOptions describe what coop needs in containerd's
// config.toml.
type ContainerdConfigOptions struct {
	// ContentSocket is coop node's content and diff socket.
	ContentSocket string
	// HostsDir is the registry hosts directory (CRI's config_path).
	HostsDir string
	// Snapshotters and Platforms: one unpack_config entry for each pair.
	Snapshotters []string
	Platforms    []string
	// Observer leaves containerd's content store and differ alone (coop in
	// observer mode): only CRI's config_path is set.
	Observer bool
}

func (o ContainerdConfigOptions) validate() error {
	switch {
	case o.Observer && o.HostsDir != "" && !filepath.IsAbs(o.HostsDir):
		return fmt.Errorf("hosts dir %q must be an absolute path: %w", o.HostsDir, errdefs.ErrInvalidArgument)
	case o.Observer:
		return nil
	case !filepath.IsAbs(o.ContentSocket):
		return fmt.Errorf("content socket %q must be an absolute path: %w", o.ContentSocket, errdefs.ErrInvalidArgument)
	case o.HostsDir != "" && !filepath.IsAbs(o.HostsDir):
		return fmt.Errorf("hosts dir %q must be an absolute path: %w", o.HostsDir, errdefs.ErrInvalidArgument)
	case len(o.Snapshotters) == 0 || len(o.Platforms) == 0:
		return fmt.Errorf("at least one snapshotter and one platform: %w", errdefs.ErrInvalidArgument)
	}
	return nil
}

// MergeContainerdConfig returns base (a containerd config.toml, version 3, or
// empty) with coop's settings merged in: the built-in content store disabled,
// the content and diff proxy plugins on the socket, the transfer unpacker and
// the diff service using coop's differ, and CRI's registry config_path (with
// Observer, only CRI's config_path).
// Merging is idempotent. Comments in base are not kept.
func MergeContainerdConfig(base []byte, o ContainerdConfigOptions) ([]byte, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	cfg := map[string]any{}
	if len(bytes.TrimSpace(base)) > 0 {
		if err := toml.Unmarshal(base, &cfg); err != nil {
			return nil, fmt.Errorf("base containerd config: %v: %w", err, errdefs.ErrInvalidArgument)
		}
	}
	switch v := cfg["version"].(type) {
	case nil:
		cfg["version"] = int64(3)
	case int64:
		if v != 3 {
			return nil, fmt.Errorf("base containerd config is version %d; coop writes version 3 (run `containerd config migrate` first): %w", v, errdefs.ErrInvalidArgument)
		}
	default:
		return nil, fmt.Errorf("base containerd config: version is %T: %w", v, errdefs.ErrInvalidArgument)
	}

	if o.Observer {
		if o.HostsDir != "" {
			table(table(table(cfg, "plugins"), criImagesPlugin), "registry")["config_path"] = o.HostsDir
		}
		return toml.Marshal(cfg)
	}

	disabled, _ := cfg["disabled_plugins"].([]any)
	if !slices.Contains(disabled, any(builtinContent)) {
		disabled = append(disabled, builtinContent)
	}
	cfg["disabled_plugins"] = disabled

	proxies := table(cfg, "proxy_plugins")
	proxies[ContentPluginName] = map[string]any{"type": "content", "address": o.ContentSocket}
	proxies[DiffPluginName] = map[string]any{"type": "diff", "address": o.ContentSocket}

	plugins := table(cfg, "plugins")
	var unpack []any
	for _, p := range o.Platforms {
		for _, s := range o.Snapshotters {
			unpack = append(unpack, map[string]any{"platform": p, "snapshotter": s, "differ": DiffPluginName})
		}
	}
	table(plugins, transferPlugin)["unpack_config"] = unpack
	table(plugins, diffServicePlugin)["default"] = []any{DiffPluginName, "walking"}
	if o.HostsDir != "" {
		table(table(plugins, criImagesPlugin), "registry")["config_path"] = o.HostsDir
	}
	return toml.Marshal(cfg)
}

// table returns m[key] as a table, creating it when missing.
func table(m map[string]any, key string) map[string]any {
	if t, ok := m[key].(map[string]any); ok {
		return t
	}
	t := map[string]any{}
	m[key] = t
	return t
}

// Registry is a registry to mirror: Host as containerd names it (a host, a
// host:port, or _default) and, optionally, its Server URL for hosts.toml.
type Registry struct {
	Host   string
	Server string
}

// ParseRegistry parses HOST[=SERVER_URL].
func ParseRegistry(s string) (Registry, error) {
	host, server, _ := strings.Cut(s, "=")
	r := Registry{Host: host, Server: server}
	if host == "" || strings.ContainsAny(host, "/\\") || host == "." || host == ".." || !utf8.ValidString(host) ||
		strings.ContainsFunc(host, func(c rune) bool { return unicode.IsSpace(c) || unicode.IsControl(c) }) {
		return r, fmt.Errorf("registry %q: want HOST[=URL]: %w", s, errdefs.ErrInvalidArgument)
	}
	if server != "" {
		if !utf8.ValidString(server) {
			return r, fmt.Errorf("registry %q: server is not valid UTF-8: %w", s, errdefs.ErrInvalidArgument)
		}
		u, err := url.Parse(server)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return r, fmt.Errorf("registry %q: server %q is not an http(s) URL: %w", s, server, errdefs.ErrInvalidArgument)
		}
	}
	return r, nil
}

// MirrorURL checks that listen is a loopback host:port and returns the
// mirror's URL.
func MirrorURL(listen string) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("mirror address %q: %v: %w", listen, err, errdefs.ErrInvalidArgument)
	}
	ip := net.ParseIP(host)
	if host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return "", fmt.Errorf("mirror address %q is not loopback: the mirror serves only this node's containerd: %w", listen, errdefs.ErrInvalidArgument)
	}
	if port == "" || port == "0" {
		return "", fmt.Errorf("mirror address %q needs a fixed port: %w", listen, errdefs.ErrInvalidArgument)
	}
	return "http://" + net.JoinHostPort(host, port), nil
}

var hostHeader = regexp.MustCompile(`(?m)^\s*\[\s*host\s*\.\s*("(?:[^"\\]|\\.)*"|'[^']*')\s*\]`)

// MergeHostsTOML returns existing (a hosts.toml, or empty) with the mirror
// as the first host, pull only. Other hosts keep their order and settings;
// server is set when given. Merging is idempotent.
func MergeHostsTOML(existing []byte, mirrorURL, server string) ([]byte, error) {
	top := map[string]any{}
	if err := toml.Unmarshal(existing, &top); err != nil {
		return nil, fmt.Errorf("hosts.toml: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	hosts, _ := top["host"].(map[string]any)
	delete(top, "host")
	var order []string
	for _, m := range hostHeader.FindAllSubmatch(existing, -1) {
		var k string
		if err := toml.Unmarshal(append([]byte("k = "), m[1]...), &struct {
			K *string `toml:"k"`
		}{&k}); err != nil {
			return nil, fmt.Errorf("hosts.toml: host key %s: %v: %w", m[1], err, errdefs.ErrInvalidArgument)
		}
		if k != mirrorURL && !slices.Contains(order, k) {
			order = append(order, k)
		}
	}
	for k := range hosts {
		if k != mirrorURL && !slices.Contains(order, k) {
			order = append(order, k)
		}
	}
	if server != "" {
		top["server"] = server
	}
	var out bytes.Buffer
	out.WriteString("# Managed by `coop containerd-config --write`: the coop mirror is tried first.\n")
	if len(top) > 0 {
		b, err := toml.Marshal(top)
		if err != nil {
			return nil, err
		}
		out.Write(b)
		out.WriteString("\n")
	}
	mirror := map[string]any{"capabilities": []any{"pull"}}
	if old, ok := hosts[mirrorURL].(map[string]any); ok {
		for k, v := range old {
			if k != "capabilities" {
				mirror[k] = v
			}
		}
	}
	emit := func(name string, h any) error {
		b, err := toml.Marshal(map[string]any{"host": map[string]any{name: h}})
		if err != nil {
			return err
		}
		b = bytes.TrimPrefix(b, []byte("[host]\n"))
		out.Write(b)
		out.WriteString("\n")
		return nil
	}
	if err := emit(mirrorURL, mirror); err != nil {
		return nil, err
	}
	for _, k := range order {
		if err := emit(k, hosts[k]); err != nil {
			return nil, err
		}
	}
	return out.Bytes(), nil
}

// WriteFileAtomic writes data to path through a temporary file in the same
// directory and a rename, so readers never see a partial file.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// WriteHostsTOML merges the mirror into hostsDir/<registry>/hosts.toml,
// atomically.
func WriteHostsTOML(hostsDir string, r Registry, mirrorURL string) (string, error) {
	path := filepath.Join(hostsDir, r.Host, "hosts.toml")
	existing, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return "", err
	}
	b, err := MergeHostsTOML(existing, mirrorURL, r.Server)
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return path, WriteFileAtomic(path, b, 0o644)
}
