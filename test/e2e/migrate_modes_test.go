//go:build integration

package e2e

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/coopnet/coop/plugin/migrate"
	"github.com/coopnet/coop/test/harness"
)

// startKB runs `coop kb` (push feed, embedded broker) on loopback for the
// test and returns its API and broker URLs.
func (e *env) startKB() (api, broker string) {
	e.t.Helper()
	apiAddr, natsAddr := e.runKB("--feed", "push", "--period", "500ms")
	return "https://" + apiAddr, "nats://" + natsAddr
}

// locates reports whether n's resolver names node for digest now.
func locates(ctx context.Context, n *harness.Node, dgst, node string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.MirrorURL()+"/coop/v1/locate?digest="+dgst, nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var lr struct {
		Candidates map[string][]struct{ Node string } `json:"candidates"`
	}
	if json.NewDecoder(resp.Body).Decode(&lr) != nil {
		return false
	}
	for _, c := range lr.Candidates[dgst] {
		if c.Node == node {
			return true
		}
	}
	return false
}

// TestMigrateEveryIndexMode: the same migration with the destination in
// each index mode. The source is always a candidate; a neighbour holding
// every layer contributes in every mode but none.
func TestMigrateEveryIndexMode(t *testing.T) {
	e := newEnv(t, true)
	kbURL, brokerURL := e.startKB()
	reg := e.registry()
	img, err := reg.PushRandomImage(e.ctx, harness.ImageSpec{Repo: "coop/web", LayerSizes: []int64{16 << 20, 16 << 20}, Busybox: harness.BusyboxPath})
	if err != nil {
		t.Fatal(err)
	}
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	announce := []string{"--nats-url", brokerURL, "--kb", kbURL, "--period", "500ms"}
	// Slow uplinks on both holders, so striping uses both.
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Migrations: true, UploadLimit: 16 << 20, ExtraCoopArgs: announce})
	e.runWeb(a, img, "web")
	c := e.node(harness.NodeOptions{Name: "c", Registries: up, UploadLimit: 16 << 20, ExtraCoopArgs: announce})
	if err := c.PullCtr(e.ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	layer := img.Layers[len(img.Layers)-1].Digest.String()
	for _, mode := range []string{"none", "online", "periodic", "push", "kb"} {
		t.Run(mode, func(t *testing.T) {
			args := append([]string{"--index", mode}, announce...)
			b := e.node(harness.NodeOptions{Name: "b-" + mode, Registries: up, Migrations: true,
				Neighbors: []harness.Neighbor{c.AsNeighbor()}, ExtraCoopArgs: args})
			if mode != "none" {
				e.eventually(mode+": b's index names c", func() bool { return locates(e.ctx, b, layer, "c") })
			}
			ctx, cancel := context.WithTimeout(e.ctx, migrateTimeout)
			defer cancel()
			out, err := b.Migrate(ctx, a.PeerURL(), "web", "--start", "--json")
			if err != nil {
				t.Fatal(err)
			}
			var res migrate.Result
			if err := json.Unmarshal([]byte(out), &res); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %.2f s, %v", mode, res.Seconds, res.BytesByNode)
			if res.BytesByNode["a"] == 0 || res.BytesByNode[migrate.FromRegistry] != 0 {
				t.Fatalf("bytes by node %v: want bytes from the source and none from a registry", res.BytesByNode)
			}
			if got := res.BytesByNode["c"]; (got > 0) != (mode != "none") {
				t.Fatalf("%s: neighbour c sent %d bytes", mode, got)
			}
			e.requireTask(b, "web", true)
			if got := e.answers(b, "web"); !strings.Contains(got, "coop") {
				t.Fatalf("migrated container answers %q", got)
			}
		})
	}
}
