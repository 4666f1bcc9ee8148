package plugin

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"unicode/utf8"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
	"github.com/pelletier/go-toml/v2"
)

// FuzzMergeHostsTOML checks the hosts.toml merge for any existing file and
// server: a file it refuses is ErrInvalidArgument; what it writes is TOML
// with the mirror as the first host, once, pull only, every other host and
// top-level key kept as they were (server set when given), the mirror first
// as containerd reads it, and merging it again changes nothing. Seeds: testdata/fuzz/FuzzMergeHostsTOML.
func FuzzMergeHostsTOML(f *testing.F) {
	const mirror = "http://127.0.0.1:5051"
	f.Fuzz(func(t *testing.T, existing []byte, server string) {
		if _, err := ParseRegistry("registry.example=" + server); err != nil {
			return // coop containerd-config refuses it first
		}
		if !utf8.ValidString(server) {
			t.Fatalf("ParseRegistry took a server %q that is not UTF-8 (TOML cannot hold it)", server)
		}
		out, err := MergeHostsTOML(existing, mirror, server)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("%q: error %v is not invalid argument", existing, err)
			}
			return
		}
		var in, got map[string]any
		if err := toml.Unmarshal(existing, &in); err != nil {
			t.Fatalf("%q: merged, yet not TOML: %v", existing, err)
		}
		if err := toml.Unmarshal(out, &got); err != nil {
			t.Fatalf("%q: merged into %q, not TOML: %v", existing, out, err)
		}
		hosts, _ := got["host"].(map[string]any)
		m, _ := hosts[mirror].(map[string]any)
		if caps, _ := m["capabilities"].([]any); !slices.Equal(caps, []any{"pull"}) {
			t.Fatalf("%q: merged into %q: mirror %v", existing, out, m)
		}
		checkContainerdHosts(t, existing, out)
		inHosts, _ := in["host"].(map[string]any)
		for k, v := range inHosts {
			if k != mirror && !sameTOML(v, hosts[k]) {
				t.Fatalf("%q: merged into %q: host %q was %v, is %v", existing, out, k, v, hosts[k])
			}
		}
		for k, v := range in {
			if k != "host" && (k != "server" || server == "") && !sameTOML(v, got[k]) {
				t.Fatalf("%q: merged into %q: %q was %v, is %v", existing, out, k, v, got[k])
			}
		}
		if server != "" && got["server"] != server {
			t.Fatalf("%q with server %q: merged into %q", existing, server, out)
		}
		// Merging again changes nothing. (Compared as TOML: a header-like
		// line inside a multi-line string of existing adds a blank line to
		// the first merge only.)
		again, err := MergeHostsTOML(out, mirror, server)
		var gotAgain map[string]any
		if err != nil || toml.Unmarshal(again, &gotAgain) != nil || !sameTOML(gotAgain, got) {
			t.Fatalf("%q: merged into %q, which merges into %q, %v", existing, out, again, err)
		}
	})
}

// checkContainerdHosts checks out as containerd reads it: when containerd
// honours the existing file (it lists a host from it) and reads the merge,
// the mirror is its first host, pull only. (containerd refuses a merge whose
// hosts ask for what this machine lacks, a CA file say, and silently ignores
// a file whose hosts it cannot order: then neither is checked.)
func checkContainerdHosts(t *testing.T, existing, out []byte) {
	t.Helper()
	read := func(b []byte) ([]docker.RegistryHost, error) {
		dir := t.TempDir()
		if err := os.MkdirAll(filepath.Join(dir, "registry.example"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "registry.example", "hosts.toml"), b, 0o644); err != nil {
			t.Fatal(err)
		}
		return config.ConfigureHosts(context.Background(), config.HostOptions{HostDir: config.HostDirFromRoot(dir)})("registry.example")
	}
	before, err := read(existing)
	if err != nil || len(before) < 2 {
		return
	}
	after, err := read(out)
	if err != nil {
		return
	}
	if after[0].Host != "127.0.0.1:5051" || after[0].Capabilities != docker.HostCapabilityPull {
		t.Fatalf("%q: merged into %q, whose first host is not the mirror, pull only: %+v", existing, out, after)
	}
}

// sameTOML reports whether a and b encode to the same TOML (NaN included).
func sameTOML(a, b any) bool {
	ea, erra := toml.Marshal(map[string]any{"v": a})
	eb, errb := toml.Marshal(map[string]any{"v": b})
	return erra == nil && errb == nil && bytes.Equal(ea, eb)
}
