package mirror_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/mirror"
	"github.com/coopnet/coop/plugin/upstream"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// FuzzMirror checks the mirror's router with any method, path, query and
// Range: it never fails (5xx) or panics; the write endpoints never accept a
// request without the token; what it serves from the local store is only
// the blob the path names, whole or from the offset asked; what it tells
// its Upstream is a manifest request's valid repository name, its ns and
// its reference, nothing else. A blob is in the local store, no peer holds
// anything. Seeds: testdata/fuzz/FuzzMirror.
func FuzzMirror(f *testing.F) {
	ctx := context.Background()
	store, err := content.NewStore(ctx, f.TempDir(), content.NewInventory())
	if err != nil {
		f.Fatal(err)
	}
	blob := []byte("a blob the local store holds, 45 bytes long..")
	held := digest.FromBytes(blob)
	if err := ctdcontent.WriteBlob(ctx, store, "held", bytes.NewReader(blob), ocispec.Descriptor{Digest: held, Size: int64(len(blob))}); err != nil {
		f.Fatal(err)
	}
	up := &seenUpstream{}
	m, err := mirror.New(mirror.Options{Resolver: knownResolver{}, Peers: &peers.Client{HTTP: &http.Client{}, Node: "t"}, Store: store,
		APIToken: "0123456789abcdef0123456789abcdef", Upstream: up})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = m.Close() })
	f.Add(http.MethodGet, "/v2/lib/app/manifests/latest", "ns=registry.example:5000", "")
	f.Add(http.MethodHead, "/v2/lib/app/manifests/"+held.String(), "ns=docker.io&ns=other", "")
	f.Fuzz(func(t *testing.T, method, path, query, rng string) {
		req := (&http.Request{Method: method, URL: &url.URL{Path: path, RawQuery: query},
			Header: http.Header{}, Body: http.NoBody, Host: "127.0.0.1:5051", RemoteAddr: "127.0.0.1:1"}).WithContext(ctx)
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		rec := httptest.NewRecorder()
		up.seen = nil
		m.ServeHTTP(rec, req)
		for _, sn := range up.seen {
			dp, err := peers.ParseDistributionPath(path)
			if err != nil || dp.Kind != peers.KindManifest || !peers.ValidName(sn.repo) || sn.repo != dp.Name || sn.ref != dp.Ref ||
				sn.host == "" || sn.host != req.URL.Query().Get("ns") {
				t.Fatalf("%s %q ?%q: the upstream was told %+v", method, path, query, sn)
			}
		}
		switch {
		case rec.Code >= 500:
			t.Fatalf("%s %q ?%q Range %q: %d %s", method, path, query, rng, rec.Code, rec.Body)
		case (path == mirror.SourcesPath || len(path) > len(mirror.SourcesPath) && path[:len(mirror.SourcesPath)+1] == mirror.SourcesPath+"/") &&
			method != http.MethodGet && rec.Code/100 == 2:
			t.Fatalf("%s %q without the token: %d", method, path, rec.Code)
		case rec.Code/100 == 2 && rec.Header().Get("Docker-Content-Digest") != "":
			if d := rec.Header().Get("Docker-Content-Digest"); d != held.String() {
				t.Fatalf("%s %q: served %s, which the store does not hold", method, path, d)
			}
			dp, err := peers.ParseDistributionPath(path)
			if err != nil || dp.Ref != held.String() {
				t.Fatalf("%s %q: served %s for a path that names %q (%v)", method, path, held, dp.Ref, err)
			}
			body := rec.Body.Bytes()
			if method == http.MethodGet && (len(body) == 0 || string(blob[len(blob)-len(body):]) != string(body)) {
				t.Fatalf("%s %q Range %q: served %q, not a tail of the blob", method, path, rng, body)
			}
		}
	})
}

// seenUpstream records what the mirror tells it; it knows no registry.
type seenUpstream struct{ seen []seenRequest }

type seenRequest struct{ host, repo, ref string }

func (u *seenUpstream) Seen(_ context.Context, host, repo, ref string) {
	u.seen = append(u.seen, seenRequest{host, repo, ref})
}

func (u *seenUpstream) Reach(digest.Digest) upstream.Reach { return upstream.Unknown }

func (u *seenUpstream) Fetch(_ context.Context, d digest.Digest, _, _ int64) (io.ReadCloser, error) {
	return nil, fmt.Errorf("blob %s: %w", d, errdefs.ErrNotFound)
}
