//go:build integration

package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"

	"github.com/coopnet/coop/test/harness"
)

// secRegistryLiar: the registry a claim falls back to sends a layer's bytes
// wrong. coop claims the layer from it (no peer holds it), finds the bytes
// bad once it has them all and fails the claim (no second try from the
// same registry): the pull fails as containerd's own fetch from that
// registry would, nothing corrupt is committed, and coop goes on.
func secRegistryLiar(e *env, tb *secTable) {
	t := e.t
	reg := e.registry()
	img := e.push(reg, "coop/regliar", 4<<20)
	layer := img.Layers[0]
	target, err := url.Parse(reg.URL())
	if err != nil {
		t.Fatal(err)
	}
	var corrupted atomic.Int64
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.Method == http.MethodGet && strings.HasSuffix(resp.Request.URL.Path, "/blobs/"+layer.Digest.String()) {
			corrupted.Add(1)
			resp.Body = flipper{resp.Body}
		}
		return nil
	}
	liar := httptest.NewServer(proxy)
	t.Cleanup(liar.Close)
	host := strings.TrimPrefix(liar.URL, "http://")
	v := e.node(harness.NodeOptions{Name: "v", Default: true, Registries: []harness.Upstream{{Host: host, URL: liar.URL}}})
	ref := host + "/" + img.Repo + "@" + img.Manifest.Digest.String()
	err = e.timed("v: pull from a registry that corrupts a layer", pullTimeout, func(ctx context.Context) error { return v.PullCtr(ctx, ref) })
	claimed, _ := v.Metric(e.ctx, harness.MetricClaimDecisions, "decision", "registry")
	failed, _ := v.Metric(e.ctx, harness.MetricClaims, "result", "failed")
	// Nothing corrupt, in containerd's records or coop's store; the failed
	// claim's record goes right after the pull fails.
	var cerr error
	e.eventually("containerd lists only blobs it can read", func() bool {
		_, cerr = e.checkContent(v, "default")
		if errors.Is(cerr, errCorrupt) {
			t.Fatal(cerr)
		}
		return cerr == nil
	})
	e.verifyStoreFiles(v)
	_, merr := v.Metrics(e.ctx)
	healthy := merr == nil
	var got string
	switch {
	case err == nil:
		got = "the pull completed from corrupt bytes"
	case claimed < 1:
		got = "coop never claimed from the registry: nothing tested"
	case failed < 1:
		got = "no claim failed"
	case !healthy:
		got = "coop stopped answering"
	default:
		got = "claim failed; pull failed; nothing corrupt committed"
	}
	tb.add(secHostile, "the registry a claim falls back to sends a layer's bytes wrong (default mode)",
		"claim failed; pull failed; nothing corrupt committed", got,
		fmt.Sprintf("%d corrupted GETs of the layer (coop's and containerd's); %v claims from the registry, %v failed; %s", corrupted.Load(), claimed, failed, errDetail(err)))
}

// flipper flips every byte it reads.
type flipper struct{ io.ReadCloser }

func (f flipper) Read(p []byte) (int, error) {
	n, err := f.ReadCloser.Read(p)
	for i := range p[:n] {
		p[i] ^= 0xff
	}
	return n, err
}
