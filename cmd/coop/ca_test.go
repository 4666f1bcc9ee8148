package main

import (
	"context"
	"io"
	"path/filepath"
	"testing"

	"github.com/coopnet/coop/peers/trust"
)

func TestCACommands(t *testing.T) {
	dir := t.TempDir()
	ca, out := filepath.Join(dir, "ca"), filepath.Join(dir, "node-a")
	ctx := context.Background()
	if err := run(ctx, []string{"ca", "init", "--dir", ca}, io.Discard, io.Discard); err != nil {
		t.Fatal(err)
	}
	if err := run(ctx, []string{"ca", "issue", "--dir", ca, "--name", "node-a", "--out", out, "--ip", "198.18.0.10"}, io.Discard, io.Discard); err != nil {
		t.Fatal(err)
	}
	c, err := trust.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if c.Name() != "node-a" {
		t.Fatalf("issued for %q, want node-a", c.Name())
	}
	for _, bad := range [][]string{
		{"ca"},
		{"ca", "sign"},
		{"ca", "init", "--dir", ca}, // already there
		{"ca", "issue", "--dir", ca, "--out", out},
		{"ca", "issue", "--dir", ca, "--name", "node-a", "--out", out, "--ip", "not-an-ip"},
		{"ca", "issue", "--dir", ca, "--name", "Bad Name", "--out", out},
	} {
		if err := run(ctx, bad, io.Discard, io.Discard); err == nil {
			t.Errorf("coop %v succeeded", bad)
		}
	}
}
