//go:build integration

package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/test/harness"
)

// getRecord GETs /coop/v1/containers/ns/id at n with c and returns the
// status, the OCI error code (if any) and the body.
func (e *env) getRecord(c *http.Client, n *harness.Node, method, ns, id string) (int, string, []byte) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	u := n.PeerURL() + "/coop/v1/containers/" + ns + "/" + id
	if method == http.MethodPost {
		u += "/stop"
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var oe struct {
		Errors []struct {
			Code string `json:"code"`
		} `json:"errors"`
	}
	code := ""
	if json.Unmarshal(b, &oe) == nil && len(oe.Errors) == 1 {
		code = oe.Errors[0].Code
	}
	return resp.StatusCode, code, b
}

// createContainer pulls img into namespace ns of n and creates container id
// there (no task), with a secret in its environment.
func (e *env) createContainer(n *harness.Node, img *harness.Image, ns, id string) {
	e.t.Helper()
	if err := e.timed(n.Name+": pull into "+ns, pullTimeout, func(ctx context.Context) error {
		_, err := n.CtrNamespace(ctx, ns, "image", "pull", "--hosts-dir", n.HostsDir, img.Ref)
		return err
	}); err != nil {
		e.t.Fatal(err)
	}
	if _, err := n.CtrNamespace(e.ctx, ns, "container", "create", "--env", "DB_PASSWORD=hunter2", img.Ref, id); err != nil {
		e.t.Fatal(err)
	}
}

// TestContainerRecordsServed: a node serves container records (an OCI spec
// with its environment: secrets) only when --serve-containers lists the
// namespace, only to nodes with a certificate of the cluster CA, and logs
// each record served with the asking node's name.
func TestContainerRecordsServed(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	img := e.push(reg, "coop/records", 1<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}

	// A cluster node's identity (what a migration's destination presents),
	// and a stranger who reaches the port without a certificate.
	dir := filepath.Join(t.TempDir(), "dst")
	if err := e.pki.Issue("dst", dir); err != nil {
		t.Fatal(err)
	}
	creds, err := trust.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	member := &http.Client{Transport: &http.Transport{TLSClientConfig: creds.ClientConfig()}}
	stranger := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} // a stranger checks nothing

	off := e.node(harness.NodeOptions{Name: "off", Registries: up})
	on := e.node(harness.NodeOptions{Name: "on", Registries: up, Migrations: true,
		ExtraCoopArgs: []string{"--serve-containers", "default"}})
	for _, n := range []*harness.Node{off, on} {
		e.createContainer(n, img, "default", "web")
		e.createContainer(n, img, "k8s.io", "web")
	}

	for _, tc := range []struct {
		name     string
		c        *http.Client
		n        *harness.Node
		method   string
		ns       string
		status   int
		code     string
		contains string
	}{
		{"records off", member, off, http.MethodGet, "default", 403, "DENIED", "--serve-containers"},
		{"stop with records off", member, off, http.MethodPost, "default", 403, "DENIED", "--serve-containers"},
		{"listed namespace", member, on, http.MethodGet, "default", 200, "", "DB_PASSWORD=hunter2"},
		{"unlisted namespace", member, on, http.MethodGet, "k8s.io", 403, "DENIED", "--serve-containers"},
		{"stop in an unlisted namespace", member, on, http.MethodPost, "k8s.io", 403, "DENIED", "--serve-containers"},
		{"stranger's record", stranger, on, http.MethodGet, "default", 401, "UNAUTHORIZED", "certificate"},
		{"stranger's stop", stranger, on, http.MethodPost, "default", 401, "UNAUTHORIZED", "certificate"},
	} {
		status, code, body := e.getRecord(tc.c, tc.n, tc.method, tc.ns, "web")
		t.Logf("%-30s %s %-7s → %d %s", tc.name, tc.n.Name, tc.ns, status, code)
		if status != tc.status || code != tc.code || !strings.Contains(string(body), tc.contains) {
			t.Errorf("%s: %d %s %s, want %d %s containing %q", tc.name, status, code, body, tc.status, tc.code, tc.contains)
		}
		if tc.status == 200 {
			var rec struct {
				Node, Namespace, ID, Image string
			}
			if err := json.Unmarshal(body, &rec); err != nil || rec.Node != "on" || rec.Namespace != "default" || rec.ID != "web" || rec.Image != img.Ref {
				t.Errorf("record %s (%v)", body, err)
			}
		}
	}
	b, err := os.ReadFile(on.CoopLog())
	if err != nil {
		t.Fatal(err)
	}
	served := false
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "container record served") && strings.Contains(l, "asker=dst") && strings.Contains(l, "container=default/web") {
			served = true
		}
	}
	if !served {
		t.Errorf("%s: no line logging the record served to dst", on.CoopLog())
	}
}

// TestContainerSharedNamespaces: with --share-namespaces k8s.io (observer
// mode), a node lists and serves the blobs containerd holds in k8s.io and
// neither lists nor serves those only another namespace holds.
func TestContainerSharedNamespaces(t *testing.T) {
	e := newEnv(t, true)
	reg := e.registry()
	private := e.push(reg, "coop/private", 1<<20)
	shared := e.push(reg, "coop/shared", 1<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	n := e.node(harness.NodeOptions{Name: "a", Registries: up, Observer: true,
		ExtraCoopArgs: []string{"--share-namespaces", "k8s.io"}})
	if err := e.timed("pull into default", pullTimeout, func(ctx context.Context) error { return n.PullCtr(ctx, private.Ref) }); err != nil {
		t.Fatal(err)
	}
	if err := e.timed("pull into k8s.io", pullTimeout, func(ctx context.Context) error {
		_, err := n.CtrNamespace(ctx, "k8s.io", "image", "pull", "--hosts-dir", n.HostsDir, shared.Ref)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// Events come in order: once the shared layer is listed, the private
	// one has been seen too.
	layer, secret := shared.Layers[0].Digest, private.Layers[0].Digest
	deadline := time.Now().Add(10 * time.Second)
	for !e.inventory(n).Has(layer) {
		if time.Now().After(deadline) {
			t.Fatalf("the k8s.io layer %s is not listed", layer)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if e.inventory(n).Has(secret) {
		t.Errorf("the default namespace's layer %s is listed", secret)
	}
	for _, tc := range []struct {
		name   string
		d      string
		status int
	}{
		{"shared layer", layer.String(), 200},
		{"default's layer", secret.String(), 404},
	} {
		ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, n.PeerURL()+"/v2/coop/any/blobs/"+tc.d, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := e.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		cancel()
		t.Logf("%-16s → %d", tc.name, resp.StatusCode)
		if resp.StatusCode != tc.status {
			t.Errorf("%s: %d, want %d", tc.name, resp.StatusCode, tc.status)
		}
	}
}
