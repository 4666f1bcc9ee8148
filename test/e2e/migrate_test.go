//go:build integration

package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coopnet/coop/plugin/migrate"
	"github.com/coopnet/coop/test/harness"
)

const migrateTimeout = 2 * time.Minute

// webImage pushes coop/web: busybox httpd and a 1 MiB random layer.
func (e *env) webImage(reg *harness.Registry) *harness.Image {
	e.t.Helper()
	img, err := reg.PushRandomImage(e.ctx, harness.ImageSpec{Repo: "coop/web", LayerSizes: []int64{1 << 20}, Busybox: harness.BusyboxPath})
	if err != nil {
		e.t.Fatal(err)
	}
	return img
}

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
// destination, a dead source and a missing or wrong mirror token give clear
// errors and leave nothing behind.
func TestMigrateErrors(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.webImage(reg)
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

	// The mirror's write endpoints need the node's token.
	if _, err := b.Migrate(ctx, a.PeerURL(), "web", "--mirror-token-file", filepath.Join(t.TempDir(), "none")); err == nil || !strings.Contains(err.Error(), "--mirror-token-file") {
		t.Fatalf("no token file: %v", err)
	}
	wrong := filepath.Join(t.TempDir(), "wrong.token")
	if err := os.WriteFile(wrong, []byte(strings.Repeat("0", 64)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Migrate(ctx, a.PeerURL(), "web", "--mirror-token-file", wrong); err == nil || !strings.Contains(err.Error(), "wrong mirror token") {
		t.Fatalf("wrong token: %v", err)
	}
	if images() != "" || containers() != "" {
		t.Fatalf("refused token left images %q, containers %q", images(), containers())
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

// imageTarget returns the target digest of image ref on n ("" when absent).
func (e *env) imageTarget(n *harness.Node, ref string) string {
	e.t.Helper()
	out, err := n.Ctr(e.ctx, "image", "ls")
	if err != nil {
		e.t.Fatal(err)
	}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 3 && f[0] == ref {
			return f[2]
		}
	}
	return ""
}

// requireNothingFrom fails if n holds a container or an image of the
// migration's: only the images in keep may be there.
func (e *env) requireNothingFrom(n *harness.Node, what string, keep ...string) {
	e.t.Helper()
	out, err := n.Ctr(e.ctx, "container", "ls", "-q")
	if err != nil {
		e.t.Fatal(err)
	}
	if strings.TrimSpace(out) != "" {
		e.t.Fatalf("%s left containers %q", what, out)
	}
	out, err = n.Ctr(e.ctx, "image", "ls", "-q")
	if err != nil {
		e.t.Fatal(err)
	}
	for _, ref := range strings.Fields(out) {
		if !slices.Contains(keep, ref) {
			e.t.Fatalf("%s left image %s (images: %q)", what, ref, out)
		}
	}
}

// TestMigrateImageName: a destination whose image of the same name has
// another target is refused before any pull, naming both digests, and the
// name still points where it did; with the same target the migration uses
// it.
func TestMigrateImageName(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.webImage(reg)
	other, err := reg.PushRandomImage(e.ctx, harness.ImageSpec{Repo: "coop/other", LayerSizes: []int64{1 << 20}, Busybox: harness.BusyboxPath})
	if err != nil {
		t.Fatal(err)
	}
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Migrations: true})
	e.runWeb(a, img, "web")
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Migrations: true})
	if err := b.PullCtr(e.ctx, other.Ref); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Ctr(e.ctx, "image", "tag", other.Ref, img.Ref); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, migrateTimeout)
	defer cancel()

	_, err = b.Migrate(ctx, a.PeerURL(), "web", "--start")
	if err == nil {
		t.Fatal("migration re-pointed an existing image name")
	}
	for _, want := range []string{"already exists", img.Manifest.Digest.String(), other.Manifest.Digest.String()} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error does not name %q: %v", want, err)
		}
	}
	t.Logf("refused, as it should: %v", err)
	if got := e.imageTarget(b, img.Ref); got != other.Manifest.Digest.String() {
		t.Fatalf("image %s on b points at %s, want %s (untouched)", img.Ref, got, other.Manifest.Digest)
	}
	e.requireNothingFrom(b, "the refused migration", other.Ref, img.Ref)
	held, err := b.Ctr(e.ctx, "content", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range img.Layers {
		if !slices.Contains(other.Digests(), l.Digest) && strings.Contains(held, l.Digest.String()) {
			t.Fatalf("the refused migration pulled layer %s", l.Digest)
		}
	}
	e.requireTask(a, "web", true)

	// The same target under the name: the migration goes ahead.
	if _, err := b.Ctr(e.ctx, "image", "rm", img.Ref); err != nil {
		t.Fatal(err)
	}
	if err := b.PullCtr(e.ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Migrate(ctx, a.PeerURL(), "web", "--start"); err != nil {
		t.Fatalf("migration onto an image of the same target: %v", err)
	}
	if got := e.imageTarget(b, img.Ref); got != img.Manifest.Digest.String() {
		t.Fatalf("image %s on b points at %s, want %s", img.Ref, got, img.Manifest.Digest)
	}
	e.requireTask(b, "web", true)
}

// TestMigratePrivilegedSpec: containers whose spec asks for more than a new
// container gets (a host bind mount, --privileged, the host's network) are
// refused before anything is pulled or created, and the error names what;
// --allow-privileged recreates them.
func TestMigratePrivilegedSpec(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.webImage(reg)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Migrations: true})
	if err := a.PullCtr(e.ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Migrations: true})
	ctx, cancel := context.WithTimeout(e.ctx, migrateTimeout)
	defer cancel()
	for _, tc := range []struct {
		id      string
		flags   []string
		refused []string
	}{
		{"hostmount", []string{"--mount", "type=bind,src=/etc,dst=/host-etc,options=rbind:ro"}, []string{"bind mounts of host paths /etc at /host-etc"}},
		{"privileged", []string{"--privileged"}, []string{"CAP_SYS_ADMIN", "unmasked paths /proc/acpi", "device cgroup rules allowing a *:* rwm"}},
		{"hostnet", []string{"--net-host"}, []string{"host network namespace"}},
	} {
		t.Run(tc.id, func(t *testing.T) {
			args := append(append([]string{"container", "create"}, tc.flags...), img.Ref, tc.id)
			if _, err := a.Ctr(e.ctx, args...); err != nil {
				t.Fatal(err)
			}
			_, err := b.Migrate(ctx, a.PeerURL(), tc.id, "--start")
			if err == nil {
				t.Fatal("migrated")
			}
			for _, want := range append(tc.refused, "permission denied", "--allow-privileged") {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("error does not name %q: %v", want, err)
				}
			}
			t.Logf("refused, as it should: %v", err)
			e.requireNothingFrom(b, "the refused migration")
		})
	}
	// Allowed: the bind mount names this host's /etc, which exists here.
	if _, err := b.Migrate(ctx, a.PeerURL(), "hostmount", "--start", "--allow-privileged"); err != nil {
		t.Fatalf("--allow-privileged: %v", err)
	}
	e.requireTask(b, "hostmount", true)
	out, err := b.Ctr(e.ctx, "task", "exec", "--exec-id", "probe", "hostmount", "/bin/busybox", "ls", "/host-etc/passwd")
	if err != nil || !strings.Contains(out, "passwd") {
		t.Fatalf("the recreated bind mount: %q %v", out, err)
	}
}
