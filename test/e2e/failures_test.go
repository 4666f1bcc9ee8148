//go:build integration

package e2e

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
)

// TestFailureMatrix: a claimed layer's only peer fails mid-layer (dies,
// stalls, lies about the size, sends corrupt bytes) while the registry is
// up: one pull completes, coop fetching what the peer did not deliver from
// the registry itself (the claim never fails), and nothing corrupt is
// committed. Then coop itself is killed under a claimed pull: pulls retried
// as kubelet does (backoff) complete once coop is back, with nothing
// corrupt.
func TestFailureMatrix(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	for _, fault := range []string{"dies", "stalls", "lies-size", "corrupt"} {
		t.Run(fault, func(t *testing.T) {
			e := e.sub(t)
			img := e.push(reg, "coop/fault-"+fault, 48<<20)
			// 16 MiB/s: the layer takes seconds, so a fault lands in its middle.
			a := e.node(harness.NodeOptions{Name: "a", Registries: up, UploadLimit: 16 << 20})
			if err := a.PullCtr(e.ctx, img.Ref); err != nil {
				t.Fatal(err)
			}
			layer := img.Layers[0]
			switch fault {
			case "lies-size":
				if err := a.CutBlob(layer.Digest); err != nil {
					t.Fatal(err)
				}
			case "corrupt":
				if err := a.CorruptBlob(layer.Digest); err != nil {
					t.Fatal(err)
				}
			}
			b := e.claimNode("b", up, a.AsNeighbor())
			e.waitKnown(b, img.Digests())
			reg.ResetCounts()
			pulled := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
				defer cancel()
				pulled <- b.PullCtr(ctx, img.Ref)
			}()
			switch fault {
			case "dies", "stalls":
				e.eventually("the layer claimed", func() bool { return e.claims(b, "made") >= 1 })
				e.intoClaim(b, 0)
				if fault == "dies" {
					if err := a.KillCoop(); err != nil {
						t.Fatal(err)
					}
				} else {
					a.SignalCoop(syscall.SIGSTOP)
					t.Cleanup(func() { a.SignalCoop(syscall.SIGCONT) })
				}
			}
			if err := <-pulled; err != nil {
				t.Fatalf("the one pull failed: %v", err)
			}
			if f := e.claims(b, "failed"); f != 0 {
				t.Fatalf("%g claims failed: a claim must not fail when the registry can serve", f)
			}
			if e.claims(b, "done") < 1 {
				t.Fatal("the layer was not claimed: the fault was not under a claim")
			}
			fallbacks := e.metric(b, harness.MetricClaimFallbacks)
			fromRegistry := e.metric(b, harness.MetricClaimDecisions, "decision", "registry")
			if fallbacks+fromRegistry < 1 {
				t.Fatalf("no claim fell back to the registry (fallbacks %g, claims from the registry %g)", fallbacks, fromRegistry)
			}
			if got := reg.Counts().BlobBytes; got == 0 {
				t.Fatal("the registry served no blob byte: what completed the layer?")
			}
			t.Logf("%s: fallbacks %g, registry-only claims %g, registry sent %d bytes", fault, fallbacks, fromRegistry, reg.Counts().BlobBytes)
			e.verifyContent(b, "default")
			e.requireHolds(b, img.Blobs())
			e.verifyStoreFiles(b)
		})
	}
	t.Run("coop-killed", func(t *testing.T) {
		e := e.sub(t)
		img := e.push(reg, "coop/fault-coop-killed", 48<<20)
		a := e.node(harness.NodeOptions{Name: "a", Registries: up, UploadLimit: 16 << 20})
		if err := a.PullCtr(e.ctx, img.Ref); err != nil {
			t.Fatal(err)
		}
		b := e.claimNode("b", up, a.AsNeighbor())
		e.waitKnown(b, img.Digests())
		pulled := make(chan error, 1)
		go func() { pulled <- e.pullRetried(b, img.Ref) }()
		e.eventually("the layer claimed", func() bool { return e.claims(b, "made") >= 1 })
		e.intoClaim(b, 0)
		if err := b.KillCoop(); err != nil {
			t.Fatal(err)
		}
		// Down for a while, as a crash looping under systemd would be.
		time.Sleep(2 * time.Second)
		if err := b.StartCoop(e.ctx); err != nil {
			t.Fatal(err)
		}
		if err := <-pulled; err != nil {
			t.Fatalf("retried pulls never completed after coop came back: %v", err)
		}
		e.verifyContent(b, "default")
		e.requireHolds(b, img.Blobs())
		e.verifyStoreFiles(b)
	})
}

// pullRetried pulls ref on n as kubelet does: a failed pull is retried
// after a backoff doubling from 1 s, for at most 6 attempts.
func (e *env) pullRetried(n *harness.Node, ref string) error {
	var errs []error
	backoff := time.Second
	for attempt := 1; attempt <= 6; attempt++ {
		err := e.timed(fmt.Sprintf("%s: pull attempt %d", n.Name, attempt), pullTimeout, func(ctx context.Context) error { return n.PullCtr(ctx, ref) })
		if err == nil {
			return nil
		}
		errs = append(errs, err)
		select {
		case <-e.ctx.Done():
			return errors.Join(append(errs, e.ctx.Err())...)
		case <-time.After(backoff):
		}
		backoff *= 2
	}
	return errors.Join(errs...)
}
