package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// containerd-config --write --existing merges the mirror into every
// registry's own hosts.toml too, and --quiet prints nothing.
func TestContainerdConfigExisting(t *testing.T) {
	dir := t.TempDir()
	own := filepath.Join(dir, "registry.example", "hosts.toml")
	if err := os.MkdirAll(filepath.Dir(own), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(own, []byte("server = \"https://registry.example\"\n\n[host.\"https://cache.example\"]\n  capabilities = [\"pull\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if err := runContainerdConfig(context.Background(), []string{"--write", "--existing", "--quiet", "--hosts-dir", dir}, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if out.Len() != 0 {
		t.Fatalf("--quiet printed %q", out.String())
	}
	for _, p := range []string{own, filepath.Join(dir, "_default", "hosts.toml")} {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "127.0.0.1:5051") {
			t.Errorf("%s lacks the mirror:\n%s", p, b)
		}
	}
	if b, _ := os.ReadFile(own); !strings.Contains(string(b), "cache.example") || !strings.Contains(string(b), "https://registry.example") {
		t.Errorf("the registry's own settings were lost:\n%s", b)
	}
}
