package main

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseNodeFlags(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "node.toml")
	if err := os.WriteFile(file, []byte("name = \"from-file\"\nroot = \"/file/root\"\nindex = \"none\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	observerFile := filepath.Join(dir, "observer.toml")
	if err := os.WriteFile(observerFile, []byte("content_mode = \"observer\"\nclaim = true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("nmea = \"typo\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		args    []string
		check   func(nodeConfig) bool
		wantErr bool
	}{
		{"defaults", nil, func(c nodeConfig) bool {
			return c.Index == "online" && c.MirrorListen == defaultMirrorListen && c.Advertise != "" &&
				c.ContentMode == "proxy" && c.Claim && c.ClaimRegistry && c.Swarm && c.HostsDir == defaultHostsDir
		}, false},
		{"observer turns the claim default off", []string{"--content-mode", "observer"}, func(c nodeConfig) bool {
			return c.ContentMode == "observer" && !c.Claim
		}, false},
		{"no containerd socket turns the claim default off", []string{"--containerd-address", ""}, func(c nodeConfig) bool {
			return c.ContentMode == "proxy" && !c.Claim
		}, false},
		{"a claim asked for in observer mode stays (and is refused later)", []string{"--content-mode", "observer", "--claim"}, func(c nodeConfig) bool {
			return c.Claim
		}, false},
		{"... in the file too", []string{"--config", observerFile}, func(c nodeConfig) bool {
			return c.ContentMode == "observer" && c.Claim
		}, false},
		{"flags", []string{"--name", "a", "--peer-listen", "127.0.0.1:7000"}, func(c nodeConfig) bool {
			return c.Name == "a" && c.Advertise != "" && c.PeerListen == "127.0.0.1:7000"
		}, false},
		{"file", []string{"--config", file}, func(c nodeConfig) bool {
			return c.Name == "from-file" && c.Root == "/file/root" && c.Index == "none"
		}, false},
		{"flag wins over file", []string{"--config", file, "--name", "cli"}, func(c nodeConfig) bool {
			return c.Name == "cli" && c.Root == "/file/root"
		}, false},
		{"unknown key in file", []string{"--config", bad}, nil, true},
		{"missing file", []string{"--config", filepath.Join(dir, "nope")}, nil, true},
		{"stray argument", []string{"extra"}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseNodeFlags(tc.args, io.Discard)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if err == nil && !tc.check(c) {
				t.Fatalf("config %+v", c)
			}
		})
	}
}

func TestRunNodeRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	base := []string{"node", "--root", filepath.Join(dir, "root"), "--content-socket", filepath.Join(dir, "c.sock"),
		"--peer-listen", "127.0.0.1:0"}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"mirror not loopback", []string{"--mirror-listen", "0.0.0.0:5051"}, "not loopback"},
		{"unknown index", []string{"--mirror-listen", "127.0.0.1:5051", "--index", "gossip"}, "--index"},
		{"bad neighbour", []string{"--mirror-listen", "127.0.0.1:5051", "--neighbors", "a=ftp://x"}, "--neighbors"},
		{"negative upload limit", []string{"--mirror-listen", "127.0.0.1:5051", "--upload-limit", "-1"}, "--upload-limit"},
		{"bad stall timeout", []string{"--mirror-listen", "127.0.0.1:5051", "--stall-timeout", "soon"}, "--stall-timeout"},
		{"push without broker", []string{"--mirror-listen", "127.0.0.1:5051", "--index", "push"}, "--nats-url"},
		{"kb without kb", []string{"--mirror-listen", "127.0.0.1:5051", "--index", "kb"}, "--kb"},
		{"bad kb url", []string{"--mirror-listen", "127.0.0.1:5051", "--index", "kb", "--kb", "ftp://kb"}, "--kb"},
		{"zero period", []string{"--mirror-listen", "127.0.0.1:5051", "--period", "0s"}, "--period"},
		{"neighbours from kb without kb", []string{"--mirror-listen", "127.0.0.1:5051", "--neighbors-from-kb"}, "--kb"},
		{"both neighbour sources", []string{"--mirror-listen", "127.0.0.1:5051", "--kb", "http://127.0.0.1:1", "--neighbors-from-kb", "--neighbors", "a=http://127.0.0.1:2"}, "not both"},
		{"drop rate out of range", []string{"--mirror-listen", "127.0.0.1:5051", "--debug-drop-events", "2"}, "--debug-drop-events"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), append(append([]string{}, base...), tc.args...), io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	if err := run(context.Background(), []string{"nope"}, io.Discard, io.Discard); !errors.Is(err, errUsage) {
		t.Fatalf("unknown command: %v", err)
	}
}

func TestRunKBRejectsBadInput(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"feed", []string{"--feed", "gossip"}, "--feed"},
		{"period", []string{"--period", "0s"}, "--period"},
		{"nodes", []string{"--nodes", "a"}, "--nodes"},
		{"stray", []string{"extra"}, "unexpected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), append([]string{"kb", "--listen", "127.0.0.1:0"}, tc.args...), io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestRunLocateRejectsBadInput(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no digest", nil, "no digest"},
		{"bad digest", []string{"sha256:zz"}, "not a digest"},
		{"dead node", []string{"--node", "http://127.0.0.1:1", "--timeout", "1s", "sha256:" + strings.Repeat("a", 64)}, "127.0.0.1:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), append([]string{"locate"}, tc.args...), io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// TestSampleConfigComplete: contrib/config/node.toml parses and names every
// key coop node takes, so the sample cannot fall behind the flags.
func TestSampleConfigComplete(t *testing.T) {
	const sample = "../../contrib/config/node.toml"
	if _, err := parseNodeFlags([]string{"--config", sample}, io.Discard); err != nil {
		t.Fatalf("%s: %v", sample, err)
	}
	b, err := os.ReadFile(sample)
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, _, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(strings.TrimSpace(line), "#") {
			keys[strings.TrimSpace(k)] = true
		}
	}
	typ := reflect.TypeOf(nodeConfig{})
	for i := range typ.NumField() {
		if k := typ.Field(i).Tag.Get("toml"); !keys[k] {
			t.Errorf("%s lacks the key %q", sample, k)
		}
	}
}
