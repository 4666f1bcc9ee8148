package main

// The failure matrix: a destination pulls an image whose layer its only
// neighbour holds, and the neighbour fails in one of four ways, or the
// destination's own coop is killed, in coop's default mode (claims, with
// the registry as their fallback) and in observer mode (the mirror). Each
// cell counts the pulls it took to complete (retried as kubelet does, after
// a backoff doubling from 1 s), the failed claims, what the registry served,
// and the committed blobs that do not hash to their digest (must be 0).

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
)

// FailureCell is one fault on one path.
type FailureCell struct {
	Fault string `json:"fault"`
	Path  string `json:"path"`
	// Default: the destination ran in coop's default mode.
	Default bool `json:"default,omitempty"`
	// Attempts is the number of pulls until one completed (0: none did
	// within maxAttempts).
	Attempts     int     `json:"attempts"`
	FirstError   string  `json:"first_error,omitempty"`
	ClaimsFailed float64 `json:"claims_failed"`
	// ClaimFallbacks counts the claims the registry completed inside coop.
	ClaimFallbacks    float64 `json:"claim_registry_fallbacks"`
	MirrorFailed      float64 `json:"mirror_failed"`
	RegistryBlobBytes int64   `json:"registry_blob_bytes"`
	Seconds           float64 `json:"seconds"`
	BlobsChecked      int     `json:"blobs_checked"`
	CorruptCommitted  int     `json:"corrupt_committed"`
}

// maxAttempts bounds the pulls of one cell; they are retried after 1, 2, 4
// and 8 s, as kubelet backs off (from 10 s there).
const maxAttempts = 5

var faults = []struct {
	name, description string
}{
	{"dies", "the peer's coop is killed mid-layer"},
	{"stalls", "the peer's coop is frozen (SIGSTOP) mid-layer"},
	{"lies-size", "the peer's layer file is cut to half: it serves fewer bytes than its inventory says"},
	{"corrupt", "the peer's layer file is overwritten with random bytes of the same size"},
	{"coop-killed", "the destination's own coop is killed mid-layer and started again 2 s later (systemd's Restart=always)"},
}

func runFailures(ctx context.Context, o options) ([]FailureCell, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("the failure matrix starts containerd: run as root")
	}
	tools, err := harness.FindTools(true)
	if err != nil {
		return nil, err
	}
	reg, err := harness.StartRegistry(ctx, harness.RegistryOptions{})
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	size := int64(48 * mib)
	if o.quick {
		size = 24 * mib
	}
	img, err := reg.PushRandomImage(ctx, harness.ImageSpec{Repo: "coop/faults", LayerSizes: []int64{size}})
	if err != nil {
		return nil, err
	}
	var cells []FailureCell
	for _, f := range faults {
		for _, path := range []string{"default", "observer"} {
			c, err := failureCell(ctx, tools, reg, img, f.name, path)
			if err != nil {
				return nil, fmt.Errorf("%s during a %s pull: %w", f.name, path, err)
			}
			fmt.Fprintf(os.Stderr, "  %s/%s: %d attempt(s), %g failed claims, registry %d bytes, corrupt %d\n", f.name, path, c.Attempts, c.ClaimsFailed, c.RegistryBlobBytes, c.CorruptCommitted)
			cells = append(cells, c)
		}
	}
	return cells, nil
}

func failureCell(ctx context.Context, tools *harness.Tools, reg *harness.Registry, img *harness.Image, fault, path string) (FailureCell, error) {
	cell := FailureCell{Fault: fault, Path: path, Default: path == "default"}
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	// 16 MiB/s: the layer takes seconds, so a fault lands in its middle.
	a, err := harness.StartNode(ctx, tools, harness.NodeOptions{Name: "a", Registries: up, UploadLimit: 16 << 20, CoopLogLevel: "info"})
	if err != nil {
		return cell, err
	}
	defer func() {
		a.SignalCoop(syscall.SIGCONT)
		_ = a.Stop()
	}()
	if err := a.PullCtr(ctx, img.Ref); err != nil {
		return cell, err
	}
	layer := img.Layers[0]
	switch fault {
	case "lies-size":
		if err := a.CutBlob(layer.Digest); err != nil {
			return cell, err
		}
	case "corrupt":
		if err := a.CorruptBlob(layer.Digest); err != nil {
			return cell, err
		}
	}
	b, err := harness.StartNode(ctx, tools, harness.NodeOptions{Name: "b", Registries: up, Neighbors: []harness.Neighbor{a.AsNeighbor()},
		Default: path == "default", Observer: path == "observer", CoopLogLevel: "info"})
	if err != nil {
		return cell, err
	}
	defer func() { _ = b.Stop() }()
	reg.ResetCounts()
	start := time.Now()
	pull := func() error {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		defer cancel()
		return b.PullCtr(pctx, img.Ref)
	}
	first := make(chan error, 1)
	go func() { first <- pull() }()
	if fault == "dies" || fault == "stalls" || fault == "coop-killed" {
		if err := waitUploading(ctx, a); err != nil {
			return cell, err
		}
		time.Sleep(300 * time.Millisecond)
		switch fault {
		case "dies":
			if err := a.KillCoop(); err != nil {
				return cell, err
			}
		case "stalls":
			a.SignalCoop(syscall.SIGSTOP)
		case "coop-killed":
			if err := b.KillCoop(); err != nil {
				return cell, err
			}
			time.Sleep(2 * time.Second)
			if err := b.StartCoop(ctx); err != nil {
				return cell, err
			}
		}
	}
	err = <-first
	backoff := time.Second
	for attempt := 1; attempt <= maxAttempts; attempt++ {
		if err == nil {
			cell.Attempts = attempt
			break
		}
		if attempt == 1 {
			cell.FirstError = err.Error()
		}
		if attempt < maxAttempts {
			time.Sleep(backoff)
			backoff *= 2
			err = pull()
		}
	}
	cell.Seconds = time.Since(start).Seconds()
	cell.RegistryBlobBytes = reg.Counts().BlobBytes
	if m, err := b.Metrics(ctx); err == nil {
		cell.ClaimsFailed, _ = m.Sum(harness.MetricClaims, "result", "failed")
		cell.ClaimFallbacks, _ = m.Sum(harness.MetricClaimFallbacks)
		f, _ := m.Sum(harness.MetricMirrorRequests, "kind", "blob", "result", "failed")
		ab, _ := m.Sum(harness.MetricMirrorRequests, "kind", "blob", "result", "aborted")
		cell.MirrorFailed = f + ab
	}
	checked, corrupt, err := checkCommitted(ctx, b)
	if err != nil {
		return cell, err
	}
	cell.BlobsChecked, cell.CorruptCommitted = checked, corrupt
	return cell, nil
}

// waitUploading waits until n's peer server is sending a blob.
func waitUploading(ctx context.Context, n *harness.Node) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if v, err := n.Metric(ctx, harness.MetricActiveUploads); err == nil && v >= 1 {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("node %s never started uploading", n.Name)
}

// checkCommitted hashes every blob file of n's store and every blob its
// containerd lists (read through containerd): how many it checked and how
// many do not hash to their digest.
func checkCommitted(ctx context.Context, n *harness.Node) (checked, corrupt int, err error) {
	return checkCommittedNS(ctx, n, "default")
}

// checkCommittedNS is checkCommitted with containerd's blobs listed in
// namespace ns. A store directory that does not exist (an observer that
// dropped every copy) and a file gone before it is read count nothing.
func checkCommittedNS(ctx context.Context, n *harness.Node, ns string) (checked, corrupt int, err error) {
	dir := filepath.Join(n.Dir, "coop", "blobs", "sha256")
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, 0, err
	}
	for _, e := range ents {
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, 0, err
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return 0, 0, err
		}
		checked++
		if hex.EncodeToString(h.Sum(nil)) != e.Name() {
			corrupt++
		}
	}
	out, err := n.CtrNamespace(ctx, ns, "content", "ls", "-q")
	if err != nil {
		return 0, 0, err
	}
	for _, s := range strings.Fields(out) {
		d, err := digest.Parse(s)
		if err != nil {
			return 0, 0, err
		}
		h := d.Algorithm().Digester()
		if err := n.CtrTo(ctx, h.Hash(), ns, "content", "get", d.String()); err != nil {
			corrupt++ // listed but unreadable
			continue
		}
		checked++
		if h.Digest() != d {
			corrupt++
		}
	}
	return checked, corrupt, nil
}

func printFailures(cells []FailureCell) {
	fmt.Println()
	fmt.Println("| fault | path | pulls to complete | failed claims | claims the registry completed | mirror blob failures | registry blob MiB | seconds | blobs checked | corrupt committed |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|")
	for _, c := range cells {
		attempts := fmt.Sprint(c.Attempts)
		if c.Attempts == 0 {
			attempts = fmt.Sprintf("none in %d", maxAttempts)
		}
		fmt.Printf("| %s | %s | %s | %g | %g | %g | %.1f | %.1f | %d | %d |\n", c.Fault, c.Path, attempts, c.ClaimsFailed, c.ClaimFallbacks, c.MirrorFailed,
			float64(c.RegistryBlobBytes)/mib, c.Seconds, c.BlobsChecked, c.CorruptCommitted)
	}
}
