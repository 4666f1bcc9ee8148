package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/coopnet/coop/plugin"
)

// fakeHost is a host root in a directory, with containerd's config and
// store, and a systemctl that records its calls (and starts coop's socket
// when coop is restarted, as systemd would start coop).
type fakeHost struct {
	root  string
	calls []string
	lns   []net.Listener
}

const (
	testCtrdConfig = "version = 3\nroot = '/var/lib/containerd'\n\n[plugins.'io.containerd.cri.v1.runtime']\nenable_selinux = false\n"
	testBlob       = "0000000000000000000000000000000000000000000000000000000000000001"
	testBlob2      = "0000000000000000000000000000000000000000000000000000000000000002"
)

func newFakeHost(t *testing.T) *fakeHost {
	t.Helper()
	h := &fakeHost{root: t.TempDir()}
	write(t, filepath.Join(h.root, "etc/containerd/config.toml"), testCtrdConfig)
	for _, b := range []string{testBlob, testBlob2} {
		write(t, filepath.Join(h.root, "var/lib/containerd", builtinContentDir, "blobs/sha256", b), "blob "+b)
	}
	// Not a blob: left alone.
	write(t, filepath.Join(h.root, "var/lib/containerd", builtinContentDir, "blobs/sha256/README"), "x")
	t.Cleanup(func() {
		for _, l := range h.lns {
			l.Close()
		}
	})
	return h
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (h *fakeHost) runner(t *testing.T) hostRunner {
	return func(_ context.Context, name string, args ...string) error {
		call := name + " " + strings.Join(args, " ")
		h.calls = append(h.calls, call)
		if call == "systemctl restart "+unitName {
			sock := filepath.Join(h.root, "run/coop/content.sock")
			if _, err := os.Stat(sock); err == nil {
				return nil
			}
			if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
				return err
			}
			l, err := net.Listen("unix", sock)
			if err != nil {
				return err
			}
			h.lns = append(h.lns, l)
		}
		return nil
	}
}

func (h *fakeHost) install(t *testing.T, restart string, uninstall bool, nodeArgs ...string) error {
	t.Helper()
	h.calls = nil
	o := installOptions{
		HostRoot: h.root, BinDir: "/usr/local/bin", UnitDir: "/etc/systemd/system", ConfigDir: "/etc/coop",
		ContainerdConfig: "/etc/containerd/config.toml", HostsDir: "/etc/containerd/certs.d", Restart: restart, Uninstall: uninstall,
	}
	var err error
	if o.Node, err = installNodeFlags(nodeArgs, o.HostsDir, io.Discard); err != nil {
		return err
	}
	in := &installer{o: o, run: h.runner(t), self: func() ([]byte, error) { return []byte("coop binary"), nil }, stderr: io.Discard}
	if uninstall {
		return in.uninstall(context.Background())
	}
	return in.install(context.Background())
}

func (h *fakeHost) read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.root, p))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func (h *fakeHost) exists(p string) bool {
	_, err := os.Stat(filepath.Join(h.root, p))
	return err == nil
}

func (h *fakeHost) state(t *testing.T) installState {
	t.Helper()
	var s installState
	if err := json.Unmarshal([]byte(h.read(t, "etc/coop/install.state")), &s); err != nil {
		t.Fatal(err)
	}
	return s
}

var proxyArgs = []string{"--name=n1", "--content-mode=proxy", "--claim", "--insecure", "--neighbors=n2=http://198.18.0.2:5050"}

func TestInstallProxySystemd(t *testing.T) {
	h := newFakeHost(t)
	if err := h.install(t, "systemd", false, proxyArgs...); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"systemctl daemon-reload", "systemctl enable " + unitName, "systemctl stop containerd.service",
		"systemctl restart " + unitName, "systemctl start containerd.service",
	}
	if !slices.Equal(h.calls, want) {
		t.Errorf("calls %q, want %q", h.calls, want)
	}
	if got := h.read(t, "usr/local/bin/coop"); got != "coop binary" {
		t.Errorf("binary %q", got)
	}
	unit := h.read(t, "etc/systemd/system/"+unitName)
	for _, s := range []string{"ExecStart=/usr/local/bin/coop node --config /etc/coop/node.toml", "Before=containerd.service", "WantedBy=multi-user.target containerd.service"} {
		if !strings.Contains(unit, s) {
			t.Errorf("unit lacks %q:\n%s", s, unit)
		}
	}
	if strings.Contains(unit, "Requires") || strings.Contains(unit, "RequiredBy") {
		t.Errorf("unit makes containerd require coop (a coop restart would restart containerd):\n%s", unit)
	}
	// node.toml gives the node back the flags it was installed with.
	cfgPath := filepath.Join(h.root, "etc/coop/node.toml")
	got, err := parseNodeFlags([]string{"--config", cfgPath}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != "n1" || got.ContentMode != "proxy" || !got.Claim || !got.Insecure || got.Neighbors != "n2=http://198.18.0.2:5050" {
		t.Errorf("node.toml gives %+v", got)
	}
	if fi, err := os.Stat(cfgPath); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("node.toml mode: %v %v", fi.Mode(), err)
	}
	cfg := h.read(t, "etc/containerd/config.toml")
	if !usesCoopContent([]byte(cfg)) || !strings.Contains(cfg, "enable_selinux") || !strings.Contains(cfg, "/run/coop/content.sock") {
		t.Errorf("containerd config:\n%s", cfg)
	}
	if b := h.read(t, "etc/containerd/config.toml"+configBackupSuffix); b != testCtrdConfig {
		t.Errorf("backup %q", b)
	}
	// The blobs moved into coop's store; other files stayed.
	for _, b := range []string{testBlob, testBlob2} {
		if h.exists(filepath.Join("var/lib/containerd", builtinContentDir, "blobs/sha256", b)) || h.read(t, "var/lib/coop/blobs/sha256/"+b) != "blob "+b {
			t.Errorf("blob %s not moved", b)
		}
	}
	if !h.exists(filepath.Join("var/lib/containerd", builtinContentDir, "blobs/sha256/README")) || h.exists("var/lib/coop/blobs/sha256/README") {
		t.Error("a file that is not a blob was moved")
	}
	s := h.state(t)
	if !s.Switched || s.BlobsMoved != 2 || len(s.Restart) != 0 || s.ContentMode != "proxy" {
		t.Errorf("state %+v", s)
	}

	// Again, unchanged: nothing restarts.
	if err := h.install(t, "systemd", false, proxyArgs...); err != nil {
		t.Fatal(err)
	}
	if want := []string{"systemctl daemon-reload", "systemctl enable " + unitName}; !slices.Equal(h.calls, want) {
		t.Errorf("unchanged install: calls %q, want %q", h.calls, want)
	}
	// A changed flag restarts coop only: containerd reconnects to it.
	if err := h.install(t, "systemd", false, append(proxyArgs, "--claim-parallel=4")...); err != nil {
		t.Fatal(err)
	}
	if want := []string{"systemctl daemon-reload", "systemctl enable " + unitName, "systemctl restart " + unitName}; !slices.Equal(h.calls, want) {
		t.Errorf("changed flag: calls %q, want %q", h.calls, want)
	}

	// Uninstall puts everything back.
	if err := h.install(t, "systemd", true); err != nil {
		t.Fatal(err)
	}
	want = []string{"systemctl stop containerd.service", "systemctl disable --now " + unitName, "systemctl daemon-reload", "systemctl start containerd.service"}
	if !slices.Equal(h.calls, want) {
		t.Errorf("uninstall: calls %q, want %q", h.calls, want)
	}
	if got := h.read(t, "etc/containerd/config.toml"); got != testCtrdConfig {
		t.Errorf("config not restored: %q", got)
	}
	for _, p := range []string{"usr/local/bin/coop", "etc/systemd/system/" + unitName, "etc/coop/node.toml", "etc/coop/install.state", "etc/containerd/config.toml" + configBackupSuffix} {
		if h.exists(p) {
			t.Errorf("%s left behind", p)
		}
	}
	for _, b := range []string{testBlob, testBlob2} {
		if h.read(t, filepath.Join("var/lib/containerd", builtinContentDir, "blobs/sha256", b)) != "blob "+b {
			t.Errorf("blob %s not moved back", b)
		}
	}
}

func TestInstallRestartNone(t *testing.T) {
	h := newFakeHost(t)
	if err := h.install(t, "none", false, proxyArgs...); err != nil {
		t.Fatal(err)
	}
	if len(h.calls) != 0 {
		t.Errorf("--restart none ran %q", h.calls)
	}
	s := h.state(t)
	if want := []string{unitName, containerdUnit}; !slices.Equal(s.Restart, want) {
		t.Errorf("restart %q, want %q", s.Restart, want)
	}
	// containerd still runs on its store: linked, not moved.
	for _, b := range []string{testBlob, testBlob2} {
		src, dst := filepath.Join(h.root, "var/lib/containerd", builtinContentDir, "blobs/sha256", b), filepath.Join(h.root, "var/lib/coop/blobs/sha256", b)
		fs, err1 := os.Stat(src)
		fd, err2 := os.Stat(dst)
		if err1 != nil || err2 != nil || !os.SameFile(fs, fd) {
			t.Errorf("blob %s not linked: %v %v", b, err1, err2)
		}
	}
	// The observer mode on a host: only CRI's config_path, nothing moved.
	h2 := newFakeHost(t)
	if err := h2.install(t, "none", false, "--name=n1", "--insecure", "--content-mode=observer"); err != nil {
		t.Fatal(err)
	}
	cfg := h2.read(t, "etc/containerd/config.toml")
	if usesCoopContent([]byte(cfg)) || !strings.Contains(cfg, "/etc/containerd/certs.d") || h2.exists("var/lib/coop/blobs/sha256/"+testBlob) {
		t.Errorf("observer install: config\n%s", cfg)
	}
}

func TestInstallNodeHostsDir(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--name=n1"}, "/srv/certs.d"},
		{[]string{"--name=n1", "--hosts-dir=/etc/other"}, "/etc/other"},
		{[]string{"--name=n1", "--hosts-dir", "/etc/other"}, "/etc/other"},
	} {
		cfg, err := installNodeFlags(tc.args, "/srv/certs.d", io.Discard)
		if err != nil || cfg.HostsDir != tc.want {
			t.Errorf("%q: hosts dir %q, %v; want %q", tc.args, cfg.HostsDir, err, tc.want)
		}
	}
}

func TestInstallRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no node flags", []string{"--restart=none"}, "after `-- node`"},
		{"not node", []string{"--", "kb"}, "after `-- node`"},
		{"bad restart", []string{"--restart=later", "--", "node"}, "--restart"},
		{"bad node flag", []string{"--restart=none", "--", "node", "--index=gossip", "--insecure"}, "gossip"},
		{"relative root", []string{"--restart=none", "--", "node", "--root=var/lib/coop", "--insecure"}, "--root"},
		{"missing certificates", []string{"--restart=none", "--", "node", "--tls-dir=/etc/coop/tls"}, "tls"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			args := append([]string{"--host-root=" + h.root}, tc.args...)
			err := runInstall(context.Background(), args, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
			if h.exists("etc/coop") || h.exists("usr/local/bin/coop") || h.read(t, "etc/containerd/config.toml") != testCtrdConfig {
				t.Error("a refused install wrote something")
			}
		})
	}
}

// TestInstallUnitVerifies has systemd check the unit, where systemd-analyze
// is installed.
func TestInstallUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "coop")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(dir, unitName)
	if err := os.WriteFile(unit, []byte(nodeUnit(bin, filepath.Join(dir, "node.toml"))), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command(sa, "verify", unit)
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	// Units it cannot find on this machine (containerd's) are not the unit's fault.
	var bad []string
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if l != "" && strings.Contains(l, unitName) {
			bad = append(bad, l)
		}
	}
	if len(bad) > 0 {
		t.Errorf("systemd-analyze verify (%v):\n%s", err, strings.Join(bad, "\n"))
	}
}

func TestMergedConfigIdempotent(t *testing.T) {
	o := plugin.ContainerdConfigOptions{ContentSocket: "/run/coop/content.sock", HostsDir: "/etc/containerd/certs.d", Snapshotters: []string{"overlayfs"}, Platforms: []string{"linux/amd64"}}
	a, err := plugin.MergeContainerdConfig([]byte(testCtrdConfig), o)
	if err != nil {
		t.Fatal(err)
	}
	b, err := plugin.MergeContainerdConfig(a, o)
	if err != nil || !bytes.Equal(a, b) {
		t.Fatalf("a second merge changed the config (%v):\n%s\n---\n%s", err, a, b)
	}
}

// TestInstallFailedSwitchIsRedone: a switch whose blobs could not move
// leaves containerd's config alone, so the next run switches again.
func TestInstallFailedSwitchIsRedone(t *testing.T) {
	h := newFakeHost(t)
	write(t, filepath.Join(h.root, "var/lib/coop/blobs"), "not a directory")
	if err := h.install(t, "systemd", false, proxyArgs...); err == nil {
		t.Fatal("the switch succeeded with coop's blobs directory a file")
	}
	if got := h.read(t, "etc/containerd/config.toml"); got != testCtrdConfig {
		t.Errorf("containerd's config written by a failed switch:\n%s", got)
	}
	if last := h.calls[len(h.calls)-1]; last != "systemctl start containerd.service" {
		t.Errorf("containerd left stopped: calls %q", h.calls)
	}
	if err := os.Remove(filepath.Join(h.root, "var/lib/coop/blobs")); err != nil {
		t.Fatal(err)
	}
	if err := h.install(t, "systemd", false, proxyArgs...); err != nil {
		t.Fatal(err)
	}
	if s := h.state(t); !s.Switched || s.BlobsMoved != 2 {
		t.Errorf("second run: state %+v", s)
	}
}

// TestMoveBlobsAcrossFilesystems copies when a rename or link cannot cross.
func TestMoveBlobsAcrossFilesystems(t *testing.T) {
	other, err := os.MkdirTemp("/dev/shm", "coop-install-")
	if err != nil {
		t.Skip("no /dev/shm:", err)
	}
	defer os.RemoveAll(other)
	for _, link := range []bool{false, true} {
		from := t.TempDir()
		to := filepath.Join(other, strconv.FormatBool(link))
		write(t, filepath.Join(from, "blobs/sha256", testBlob), "blob")
		n, err := moveBlobs(from, to, link)
		if err != nil || n != 1 {
			t.Fatalf("link %v: moved %d, %v", link, n, err)
		}
		if b, err := os.ReadFile(filepath.Join(to, "blobs/sha256", testBlob)); err != nil || string(b) != "blob" {
			t.Errorf("link %v: copy %q, %v", link, b, err)
		}
		_, err = os.Stat(filepath.Join(from, "blobs/sha256", testBlob))
		if link == (err != nil) {
			t.Errorf("link %v: the source after the copy: %v", link, err)
		}
	}
}
