package plugin

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"
)

func TestMergeContainerdConfig(t *testing.T) {
	o := ContainerdConfigOptions{
		ContentSocket: "/run/coop/content.sock",
		HostsDir:      "/etc/containerd/certs.d",
		Snapshotters:  []string{"overlayfs", "native"},
		Platforms:     []string{"linux/amd64"},
	}
	base := []byte(`version = 3
root = "/var/lib/x"
disabled_plugins = ["io.containerd.nri.v1.nri"]
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  Root = "/run/x/runc"
`)
	once, err := MergeContainerdConfig(base, o)
	if err != nil {
		t.Fatal(err)
	}
	twice, err := MergeContainerdConfig(once, o)
	if err != nil {
		t.Fatal(err)
	}
	if string(once) != string(twice) {
		t.Fatalf("not idempotent:\n%s\n---\n%s", once, twice)
	}
	var got struct {
		Root     string   `toml:"root"`
		Disabled []string `toml:"disabled_plugins"`
		Proxies  map[string]struct {
			Type, Address string
		} `toml:"proxy_plugins"`
		Plugins map[string]map[string]any `toml:"plugins"`
	}
	if err := toml.Unmarshal(once, &got); err != nil {
		t.Fatal(err)
	}
	if got.Root != "/var/lib/x" || len(got.Disabled) != 2 {
		t.Fatalf("base lost: %+v", got)
	}
	if p := got.Proxies["coop"]; p.Type != "content" || p.Address != o.ContentSocket {
		t.Fatalf("content proxy %+v", p)
	}
	if p := got.Proxies["coop-diff"]; p.Type != "diff" || p.Address != o.ContentSocket {
		t.Fatalf("diff proxy %+v", p)
	}
	if u := got.Plugins[transferPlugin]["unpack_config"].([]any); len(u) != 2 {
		t.Fatalf("unpack_config %v", u)
	}
	if _, ok := got.Plugins["io.containerd.cri.v1.runtime"]; !ok {
		t.Fatal("base plugin table lost")
	}

	for name, bad := range map[string]struct {
		base string
		o    ContainerdConfigOptions
	}{
		"version 2":       {"version = 2", o},
		"garbage":         {"[[[", o},
		"relative socket": {"", ContainerdConfigOptions{ContentSocket: "x.sock", Snapshotters: o.Snapshotters, Platforms: o.Platforms}},
		"no snapshotter":  {"", ContainerdConfigOptions{ContentSocket: "/x.sock", Platforms: o.Platforms}},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := MergeContainerdConfig([]byte(bad.base), bad.o); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err = %v, want invalid argument", err)
			}
		})
	}
}

func TestMirrorURL(t *testing.T) {
	for in, ok := range map[string]bool{
		"127.0.0.1:5051": true, "[::1]:5051": true, "localhost:1": true,
		"0.0.0.0:5051": false, "198.18.0.1:5051": false, ":5051": false, "127.0.0.1:0": false, "127.0.0.1": false,
	} {
		_, err := MirrorURL(in)
		if (err == nil) != ok {
			t.Errorf("MirrorURL(%q) = %v, want ok=%v", in, err, ok)
		}
	}
}

// TestWriteHostsTOML checks the written file with containerd's own parser.
func TestWriteHostsTOML(t *testing.T) {
	dir := t.TempDir()
	const mirror = "http://127.0.0.1:5051"
	existing := `server = "https://registry.example"
[host."https://cache.example"]
  capabilities = ["pull", "resolve"]
[host."https://other.example"]
  capabilities = ["pull"]
`
	if err := os.MkdirAll(filepath.Join(dir, "registry.example"), 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "registry.example", "hosts.toml")
	if err := os.WriteFile(path, []byte(existing), 0o644); err != nil {
		t.Fatal(err)
	}
	for range 2 { // run twice, same result
		if _, err := WriteHostsTOML(dir, Registry{Host: "registry.example"}, mirror); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := WriteHostsTOML(dir, Registry{Host: "127.0.0.1:5000", Server: "http://127.0.0.1:5000"}, mirror); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if strings.Count(string(b), mirror) != 1 {
		t.Fatalf("mirror listed %d times:\n%s", strings.Count(string(b), mirror), b)
	}
	hosts := config.ConfigureHosts(context.Background(), config.HostOptions{HostDir: config.HostDirFromRoot(dir)})
	for _, tc := range []struct {
		host string
		want []string
	}{
		{"registry.example", []string{"127.0.0.1:5051", "cache.example", "other.example", "registry.example"}},
		{"127.0.0.1:5000", []string{"127.0.0.1:5051", "127.0.0.1:5000"}},
	} {
		rh, err := hosts(tc.host)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, h := range rh {
			got = append(got, h.Host)
		}
		if strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Fatalf("%s: hosts %v, want %v\n%s", tc.host, got, tc.want, b)
		}
		if rh[0].Capabilities != docker.HostCapabilityPull || rh[0].Scheme != "http" {
			t.Fatalf("mirror host %+v: want pull only over http", rh[0])
		}
	}
	if _, err := ParseRegistry("../x"); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("path trick accepted: %v", err)
	}
	for _, bad := range []string{"r=ftp://x", "reg\xffistry", "reg istry", "r\n", "r=http://\xff"} {
		if _, err := ParseRegistry(bad); !errdefs.IsInvalidArgument(err) {
			t.Fatalf("ParseRegistry(%q) accepted: %v", bad, err)
		}
	}
}

func TestMergeContainerdConfigObserver(t *testing.T) {
	base := []byte("version = 3\ndisabled_plugins = [\"io.containerd.nri.v1.nri\"]\n")
	out, err := MergeContainerdConfig(base, ContainerdConfigOptions{HostsDir: "/etc/containerd/certs.d", Observer: true})
	if err != nil {
		t.Fatal(err)
	}
	s := string(out)
	for _, absent := range []string{builtinContent, "proxy_plugins", DiffPluginName, "unpack_config"} {
		if strings.Contains(s, absent) {
			t.Fatalf("observer config mentions %q: containerd must keep its own store and differ:\n%s", absent, s)
		}
	}
	if !strings.Contains(s, `config_path = '/etc/containerd/certs.d'`) || !strings.Contains(s, "io.containerd.nri.v1.nri") {
		t.Fatalf("observer config lacks CRI's config_path or lost the base:\n%s", s)
	}
	if _, err := MergeContainerdConfig(nil, ContainerdConfigOptions{HostsDir: "relative", Observer: true}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("relative hosts dir: %v", err)
	}
}
