//go:build integration

// Package e2e runs coop end to end: real containerd processes, each with a
// real coop node as its only content store and its registry mirror, a real
// registry on loopback, and real pulls through ctr and crictl. The tests need
// root; `make test-integration` builds the binaries and runs them.
package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
)

// Everything the tests start, so that a Ctrl-C (SIGINT/SIGTERM to the test
// binary) still tears it down: go test would otherwise exit without running
// any cleanup.
var (
	liveMu sync.Mutex
	live   = map[any]func() error{}
)

func track(key any, stop func() error) {
	liveMu.Lock()
	defer liveMu.Unlock()
	live[key] = stop
}

func untrack(key any) {
	liveMu.Lock()
	defer liveMu.Unlock()
	delete(live, key)
}

func TestMain(m *testing.M) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "e2e: %v: tearing down\n", s)
		liveMu.Lock()
		for _, stop := range live {
			_ = stop()
		}
		liveMu.Unlock()
		os.Exit(130)
	}()
	os.Exit(m.Run())
}

// env is one test's world: tools, a context, a logger safe to call from
// server goroutines after the test ended.
type env struct {
	t     *testing.T
	ctx   context.Context
	tools *harness.Tools
	logf  func(string, ...any)
	// pki is the test cluster's CA: every coop process of the test speaks
	// mutual TLS with a certificate of its name, and the test talks to them
	// with the harness's (http).
	pki  *harness.PKI
	http *http.Client
}

// newEnv skips unless root, and fails with a clear message when the binaries
// are missing. withCoop says whether bin/coop is needed.
func newEnv(t *testing.T, withCoop bool) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("integration tests need root: run make test as root")
	}
	tools, err := harness.FindTools(withCoop)
	if err != nil {
		t.Fatal(err)
	}
	if tools.Runc == "" {
		t.Fatal("runc is not on PATH: apt-get install -y runc (.ci/run does it)")
	}
	var mu sync.Mutex
	done := false
	t.Cleanup(func() { mu.Lock(); done = true; mu.Unlock() })
	logf := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			t.Logf(format, args...)
		}
	}
	pki, err := harness.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, ctx: t.Context(), tools: tools, logf: logf, pki: pki, http: pki.HTTPClient()}
}

// sub is e for the subtest t: the same tools and cluster CA.
func (e *env) sub(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

// tlsFlags gives a coop process of the test (kb or a bare node) its
// certificate, named name: its --tls-dir flag.
func (e *env) tlsFlags(name string) []string {
	e.t.Helper()
	dir := filepath.Join(e.t.TempDir(), "tls-"+name)
	if err := e.pki.Issue(name, dir); err != nil {
		e.t.Fatal(err)
	}
	return []string{"--tls-dir", dir}
}

// registry starts a registry stopped at the end of the test.
func (e *env) registry() *harness.Registry {
	e.t.Helper()
	reg, err := harness.StartRegistry(e.ctx, harness.RegistryOptions{Logf: e.logf})
	if err != nil {
		e.t.Fatal(err)
	}
	track(reg, reg.Close)
	e.t.Cleanup(func() { _ = reg.Close(); untrack(reg) })
	return reg
}

// push builds and pushes an image of random layers of the given sizes.
func (e *env) push(reg *harness.Registry, repo string, sizes ...int64) *harness.Image {
	e.t.Helper()
	img, err := reg.PushRandomImage(e.ctx, harness.ImageSpec{Repo: repo, LayerSizes: sizes})
	if err != nil {
		e.t.Fatal(err)
	}
	e.logf("pushed %s (%s, %d layers, %d layer bytes)", img.Ref, img.Manifest.Digest, len(img.Layers), img.LayerBytes())
	return img
}

// node starts a node stopped at the end of the test; on failure its logs'
// tails are printed first.
func (e *env) node(opts harness.NodeOptions) *harness.Node {
	e.t.Helper()
	opts.Logf = e.logf
	if opts.PKI == nil && !opts.Plain {
		opts.PKI = e.pki
	}
	if os.Getenv("COOP_E2E_KEEP") != "" {
		opts.KeepDirs = true
	}
	n, err := harness.StartNode(e.ctx, e.tools, opts)
	if err != nil {
		e.t.Fatal(err)
	}
	track(n, n.Stop)
	e.t.Cleanup(func() {
		if e.t.Failed() {
			e.t.Logf("logs of node %s (%s):\n%s", n.Name, n.Dir, n.LogTail(60))
		}
		if err := n.Stop(); err != nil {
			e.t.Errorf("stop node %s: %v", n.Name, err)
		}
		untrack(n)
	})
	return n
}

// timed runs f with a timeout and logs how long it took.
func (e *env) timed(what string, timeout time.Duration, f func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(e.ctx, timeout)
	defer cancel()
	start := time.Now()
	err := f(ctx)
	e.logf("%s: %v (err=%v)", what, time.Since(start).Round(time.Millisecond), err)
	return err
}

// metric reads one of n's metrics or fails.
func (e *env) metric(n *harness.Node, name string, labelPairs ...string) float64 {
	e.t.Helper()
	v, err := n.Metric(e.ctx, name, labelPairs...)
	if err != nil {
		e.t.Fatalf("node %s: metric %s: %v", n.Name, name, err)
	}
	return v
}

// inventory reads n's inventory or fails.
func (e *env) inventory(n *harness.Node) *harness.Inventory {
	e.t.Helper()
	inv, err := n.Inventory(e.ctx)
	if err != nil {
		e.t.Fatalf("node %s: inventory: %v", n.Name, err)
	}
	return inv
}

// requireHolds fails unless n's inventory lists every blob with its size.
func (e *env) requireHolds(n *harness.Node, blobs []harness.Blob) {
	e.t.Helper()
	inv := e.inventory(n)
	for _, b := range blobs {
		size, ok := inv.Size(b.Digest)
		if !ok || size != b.Size {
			e.t.Fatalf("node %s: inventory lists %s with size %d (listed: %v), want %d", n.Name, b.Digest, size, ok, b.Size)
		}
	}
}

// verifyContent reads every blob containerd lists in namespace ns of n
// (through containerd, hence through coop's content proxy) and fails unless
// each hashes to its digest. It returns the digests checked.
func (e *env) verifyContent(n *harness.Node, ns string) []digest.Digest {
	e.t.Helper()
	checked, err := e.checkContent(n, ns)
	if err != nil {
		e.t.Fatal(err)
	}
	return checked
}

// errCorrupt marks a blob that reads but does not hash to its digest.
var errCorrupt = errors.New("corrupt data committed")

// checkContent is verifyContent's check: a blob that does not hash to its
// digest is errCorrupt; one listed that cannot be read is another error (a
// failed claim's record, which coop has containerd forget right after).
func (e *env) checkContent(n *harness.Node, ns string) ([]digest.Digest, error) {
	out, err := n.CtrNamespace(e.ctx, ns, "content", "ls", "-q")
	if err != nil {
		return nil, err
	}
	var checked []digest.Digest
	for _, f := range strings.Fields(out) {
		d, err := digest.Parse(f)
		if err != nil {
			return nil, fmt.Errorf("content ls: %q: %w", f, err)
		}
		h := d.Algorithm().Digester()
		ctx, cancel := context.WithTimeout(e.ctx, 2*time.Minute)
		err = n.CtrTo(ctx, h.Hash(), ns, "content", "get", d.String())
		cancel()
		if err != nil {
			return nil, fmt.Errorf("node %s: content get %s: %w", n.Name, d, err)
		}
		if h.Digest() != d {
			return nil, fmt.Errorf("node %s: content %s hashes to %s: %w", n.Name, d, h.Digest(), errCorrupt)
		}
		checked = append(checked, d)
	}
	return checked, nil
}

// verifyStoreFiles hashes every file of coop's store on disk, when it uses
// containerd's local store layout (<root>/blobs/sha256/<hex>); it returns how
// many files it checked (0 when the layout differs).
func (e *env) verifyStoreFiles(n *harness.Node) int {
	e.t.Helper()
	dir := filepath.Join(n.Dir, "coop", "blobs", "sha256")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	for _, de := range entries {
		if !de.Type().IsRegular() {
			continue
		}
		f, err := os.Open(filepath.Join(dir, de.Name()))
		if err != nil {
			e.t.Fatal(err)
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			e.t.Fatal(err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != de.Name() {
			e.t.Fatalf("node %s: store file %s hashes to %s: corrupt data committed", n.Name, de.Name(), got)
		}
	}
	return len(entries)
}

// snapshotCount counts the snapshots of namespace ns.
func (e *env) snapshotCount(n *harness.Node, ns string) int {
	e.t.Helper()
	out, err := n.CtrNamespace(e.ctx, ns, "snapshots", "ls")
	if err != nil {
		e.t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return len(lines) - 1 // header
}
