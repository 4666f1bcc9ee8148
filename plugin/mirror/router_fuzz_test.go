package mirror_test

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/mirror"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// FuzzMirror checks the mirror's router with any method, path, query and
// Range: it never fails (5xx) or panics; the write endpoints never accept a
// request without the token; what it serves from the local store is only
// the blob the path names, whole or from the offset asked. A blob is in the
// local store, no peer holds anything. Seeds: testdata/fuzz/FuzzMirror.
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
	m, err := mirror.New(mirror.Options{Resolver: knownResolver{}, Peers: &peers.Client{HTTP: &http.Client{}, Node: "t"}, Store: store,
		APIToken: "0123456789abcdef0123456789abcdef"})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = m.Close() })
	f.Fuzz(func(t *testing.T, method, path, query, rng string) {
		req := (&http.Request{Method: method, URL: &url.URL{Path: path, RawQuery: query},
			Header: http.Header{}, Body: http.NoBody, Host: "127.0.0.1:5051", RemoteAddr: "127.0.0.1:1"}).WithContext(ctx)
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		rec := httptest.NewRecorder()
		m.ServeHTTP(rec, req)
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
