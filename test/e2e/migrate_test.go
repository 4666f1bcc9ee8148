//go:build integration

package e2e

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/coopnet/coop/plugin/migrate"
	"github.com/coopnet/coop/test/harness"
)

const migrateTimeout = 2 * time.Minute

// runWeb pulls img on n and runs it as container id (busybox httpd).
func (e *env) runWeb(n *harness.Node, img *harness.Image, id string) {
	e.t.Helper()
	if err := e.timed(n.Name+": pull", pullTimeout, func(ctx context.Context) error { return n.PullCtr(ctx, img.Ref) }); err != nil {
		e.t.Fatal(err)
	}
	if _, err := n.Ctr(e.ctx, "run", "-d", "--runc-root", n.RuncRoot, "--cgroup", "/"+n.Name+"-"+id, img.Ref, id); err != nil {
		e.t.Fatal(err)
	}
	e.requireTask(n, id, true)
}

// requireTask fails unless container id's task on n runs (or does not).
func (e *env) requireTask(n *harness.Node, id string, running bool) {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := n.Ctr(e.ctx, "task", "ls")
		if err != nil {
			e.t.Fatal(err)
		}
		is := false
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) >= 3 && f[0] == id && f[2] == "RUNNING" {
				is = true
			}
		}
		if is == running {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("node %s: task %s running=%v, want %v:\n%s", n.Name, id, is, running, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// answers runs busybox wget inside container id on n, against its httpd.
func (e *env) answers(n *harness.Node, id string) string {
	e.t.Helper()
	var out string
	var err error
	for range 50 { // httpd may take a moment to listen
		out, err = n.Ctr(e.ctx, "task", "exec", "--exec-id", "probe-"+time.Now().Format("150405.000000"), id,
			"/bin/busybox", "wget", "-qO-", "http://127.0.0.1:8080/")
		if err == nil {
			return out
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.t.Fatalf("node %s: container %s does not answer HTTP: %v", n.Name, id, err)
	return ""
}

// TestMigrateImageInNoRegistry: a container whose image exists only on the
// source (the registry is gone) moves to B, starts there, answers HTTP, and
// the source's task is stopped; every byte came from the source.
func TestMigrateImageInNoRegistry(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img, err := reg.PushRandomImage(e.ctx, harness.ImageSpec{Repo: "coop/web", LayerSizes: []int64{8 << 20, 8 << 20}, Busybox: harness.BusyboxPath})
	if err != nil {
		t.Fatal(err)
	}
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Migrations: true})
	e.runWeb(a, img, "web")
	if got := e.answers(a, "web"); !strings.Contains(got, "coop") {
		t.Fatalf("source's container answers %q", got)
	}
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Migrations: true})

	ctx, cancel := context.WithTimeout(e.ctx, migrateTimeout)
	defer cancel()
	out, err := b.Migrate(ctx, a.PeerURL(), "web", "--start", "--stop-source", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var res migrate.Result
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("migrate --json: %v\n%s", err, out)
	}
	t.Logf("migrated in %.2f s: %+v", res.Seconds, res.BytesByNode)
	if res.Container != "default/web" || !res.Started || len(res.Layers) != len(img.Layers) || res.Source != "a" {
		t.Fatalf("result %+v", res)
	}
	var want int64
	for _, bl := range img.Blobs() {
		want += bl.Size
	}
	if res.BytesByNode["a"] != want || res.BytesByNode[migrate.FromRegistry] != 0 {
		t.Fatalf("bytes by node %v: want all %d bytes from the source a", res.BytesByNode, want)
	}
	for _, l := range res.Layers {
		if l.BytesByNode["a"] != l.Size {
			t.Fatalf("layer %s: %v", l.Digest, l.BytesByNode)
		}
	}
	e.requireTask(b, "web", true)
	if got := e.answers(b, "web"); !strings.Contains(got, "coop") {
		t.Fatalf("migrated container answers %q", got)
	}
	e.requireTask(a, "web", false)
}

// TestMigrateErrors: an unknown container, a container already at the
// destination and a dead source give clear errors and leave nothing behind.
func TestMigrateErrors(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img, err := reg.PushRandomImage(e.ctx, harness.ImageSpec{Repo: "coop/web", LayerSizes: []int64{1 << 20}, Busybox: harness.BusyboxPath})
	if err != nil {
		t.Fatal(err)
	}
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Migrations: true})
	e.runWeb(a, img, "web")
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Migrations: true})
	ctx, cancel := context.WithTimeout(e.ctx, migrateTimeout)
	defer cancel()

	images := func() string {
		out, err := b.Ctr(e.ctx, "image", "ls", "-q")
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	containers := func() string {
		out, err := b.Ctr(e.ctx, "container", "ls", "-q")
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}

	if _, err := b.Migrate(ctx, a.PeerURL(), "nope"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("unknown container: %v", err)
	}
	if images() != "" || containers() != "" {
		t.Fatalf("unknown container left images %q, containers %q", images(), containers())
	}

	if _, err := b.Migrate(ctx, "http://127.0.0.1:1", "web"); err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("dead source: %v", err)
	}
	if images() != "" || containers() != "" {
		t.Fatalf("dead source left images %q, containers %q", images(), containers())
	}

	if _, err := b.Migrate(ctx, a.PeerURL(), "web"); err != nil {
		t.Fatalf("first migration: %v", err)
	}
	if _, err := b.Migrate(ctx, a.PeerURL(), "web"); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second migration of the same container: %v", err)
	}
	if got := containers(); got != "web" {
		t.Fatalf("containers after the refused migration: %q", got)
	}
	// The source's container was not asked to stop.
	e.requireTask(a, "web", true)
}

// TestMigrateSourceDies: the source is killed in the middle of the image.
// With a neighbour that holds every layer, the migration completes from it;
// with none (and no registry), it fails clearly and leaves nothing behind.
func TestMigrateSourceDies(t *testing.T) {
	for _, tc := range []struct {
		name      string
		neighbour bool
	}{{"neighbour holds the layers", true}, {"nobody else holds them", false}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, true)
			reg := e.registry()
			img, err := reg.PushRandomImage(e.ctx, harness.ImageSpec{Repo: "coop/web", LayerSizes: []int64{32 << 20}, Busybox: harness.BusyboxPath})
			if err != nil {
				t.Fatal(err)
			}
			up := []harness.Upstream{harness.UpstreamOf(reg)}
			// Slow uploads, so the kill lands inside the big layer.
			a := e.node(harness.NodeOptions{Name: "a", Registries: up, Migrations: true, UploadLimit: 4 << 20})
			e.runWeb(a, img, "web")
			var neighbours []harness.Neighbor
			if tc.neighbour {
				c := e.node(harness.NodeOptions{Name: "c", Registries: up, UploadLimit: 4 << 20})
				if err := c.PullCtr(e.ctx, img.Ref); err != nil {
					t.Fatal(err)
				}
				neighbours = append(neighbours, c.AsNeighbor())
			}
			if err := reg.Stop(); err != nil {
				t.Fatal(err)
			}
			b := e.node(harness.NodeOptions{Name: "b", Registries: up, Neighbors: neighbours, Migrations: true})

			ctx, cancel := context.WithTimeout(e.ctx, migrateTimeout)
			defer cancel()
			type result struct {
				out string
				err error
			}
			done := make(chan result, 1)
			go func() {
				out, err := b.Migrate(ctx, a.PeerURL(), "web", "--start", "--json")
				done <- result{out, err}
			}()
			for {
				select {
				case r := <-done:
					t.Fatalf("migration ended before the source was inside the layer: %v\n%s", r.err, r.out)
				case <-time.After(20 * time.Millisecond):
				}
				if served, _ := a.Metric(e.ctx, harness.MetricPeerServedBytes); served > 2<<20 {
					break
				}
			}
			if err := a.KillCoop(); err != nil {
				t.Fatal(err)
			}
			r := <-done
			if tc.neighbour {
				if r.err != nil {
					t.Fatalf("migration with a neighbour holding every layer: %v", r.err)
				}
				var res migrate.Result
				if err := json.Unmarshal([]byte(r.out), &res); err != nil {
					t.Fatal(err)
				}
				if res.BytesByNode["c"] == 0 {
					t.Fatalf("bytes by node %v: nothing from the neighbour", res.BytesByNode)
				}
				e.requireTask(b, "web", true)
				if got := e.answers(b, "web"); !strings.Contains(got, "coop") {
					t.Fatalf("migrated container answers %q", got)
				}
				return
			}
			if r.err == nil {
				t.Fatalf("migration succeeded with the only holder dead:\n%s", r.out)
			}
			t.Logf("error, as it should: %v", r.err)
			for _, what := range []string{"image", "container"} {
				out, err := b.Ctr(e.ctx, what, "ls", "-q")
				if err != nil {
					t.Fatal(err)
				}
				if strings.TrimSpace(out) != "" {
					t.Fatalf("failed migration left %ss: %q", what, out)
				}
			}
		})
	}
}
