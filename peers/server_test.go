package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log/logtest"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
)

// fixture is a peer server over a real store holding a few blobs.
type fixture struct {
	srv   *Server
	reg   *prometheus.Registry
	inv   *content.Inventory
	store *content.Store

	big, small, empty  []byte
	bigD, smallD       digest.Digest
	emptyD             digest.Digest
	manifest, index    []byte // with a mediaType field / inferred
	manifestD, indexD  digest.Digest
	bareManifest       []byte // no mediaType: inferred from config+layers
	bareManifestD      digest.Digest
	notManifestD       digest.Digest // JSON, but not a manifest
	notJSOND           digest.Digest
	missingD           digest.Digest // never written
	bigManifestLikeD   digest.Digest // manifest-shaped, larger than MaxManifestSize
	bigManifestLikeLen int
}

func writeTestBlob(ctx context.Context, t testing.TB, s ctdcontent.Ingester, data []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(data)
	desc := ocispec.Descriptor{Digest: d, Size: int64(len(data))}
	if err := ctdcontent.WriteBlob(ctx, s, "test-"+d.Encoded(), bytes.NewReader(data), desc); err != nil {
		t.Fatalf("write blob %s: %v", d, err)
	}
	return d
}

func newFixture(ctx context.Context, t testing.TB, bigSize int) *fixture {
	t.Helper()
	inv := content.NewInventory()
	store, err := content.NewStore(ctx, t.TempDir(), inv)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{inv: inv, store: store, reg: prometheus.NewRegistry()}

	rng := rand.New(rand.NewChaCha8([32]byte{1}))
	f.big = make([]byte, bigSize)
	for i := range f.big {
		f.big[i] = byte(rng.Uint32())
	}
	f.small = []byte("hello, peers")
	f.empty = []byte{}
	f.bigD = writeTestBlob(ctx, t, store, f.big)
	f.smallD = writeTestBlob(ctx, t, store, f.small)
	f.emptyD = writeTestBlob(ctx, t, store, f.empty)

	f.manifest = fmt.Appendf(nil, `{"schemaVersion":2,"mediaType":%q,"config":{"mediaType":%q,"digest":%q,"size":%d},"layers":[{"mediaType":%q,"digest":%q,"size":%d}]}`,
		ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageConfig, f.smallD, len(f.small), ocispec.MediaTypeImageLayerGzip, f.bigD, len(f.big))
	f.manifestD = writeTestBlob(ctx, t, store, f.manifest)
	f.bareManifest = fmt.Appendf(nil, `{"schemaVersion":2,"config":{"mediaType":%q,"digest":%q,"size":%d},"layers":[]}`,
		ocispec.MediaTypeImageConfig, f.smallD, len(f.small))
	f.bareManifestD = writeTestBlob(ctx, t, store, f.bareManifest)
	f.index = fmt.Appendf(nil, `{"schemaVersion":2,"manifests":[{"mediaType":%q,"digest":%q,"size":%d}]}`,
		ocispec.MediaTypeImageManifest, f.manifestD, len(f.manifest))
	f.indexD = writeTestBlob(ctx, t, store, f.index)
	f.notManifestD = writeTestBlob(ctx, t, store, []byte(`{"architecture":"amd64","os":"linux"}`))
	f.notJSOND = writeTestBlob(ctx, t, store, []byte("not json at all"))
	f.missingD = digest.FromString("never written")
	bigLike := fmt.Appendf(nil, `{"mediaType":%q,"config":{},"layers":[],"pad":"%s"}`,
		ocispec.MediaTypeImageManifest, strings.Repeat("x", MaxManifestSize))
	f.bigManifestLikeD = writeTestBlob(ctx, t, store, bigLike)
	f.bigManifestLikeLen = len(bigLike)

	f.srv, err = NewServer(ServerOptions{
		Node:       "node-a",
		Store:      store,
		Inventory:  inv,
		Registerer: f.reg,
		Gatherer:   f.reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// start serves f.srv on loopback, with the test's logger in every request.
func (f *fixture) start(ctx context.Context, t *testing.T) *httptest.Server {
	t.Helper()
	ts := httptest.NewUnstartedServer(f.srv)
	ts.Config.BaseContext = func(net.Listener) context.Context { return ctx }
	ts.Start()
	t.Cleanup(ts.Close)
	return ts
}

func do(t *testing.T, ts *httptest.Server, method, path string, hdr map[string]string, body io.Reader) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// errorCode returns the code of an OCI error body, or "" when it is not one.
func errorCode(b []byte) string {
	var er ErrorResponse
	if err := json.Unmarshal(b, &er); err != nil || len(er.Errors) != 1 {
		return ""
	}
	return er.Errors[0].Code
}

// metricValue returns the value of the counter or gauge name with labels.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

func TestNewServerValidates(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	inv := content.NewInventory()
	store, err := content.NewStore(ctx, t.TempDir(), inv)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts ServerOptions
	}{
		{"no node", ServerOptions{Store: store, Inventory: inv}},
		{"no store", ServerOptions{Node: "n", Inventory: inv}},
		{"no inventory", ServerOptions{Node: "n", Store: store}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewServer(tc.opts); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("NewServer: %v, want invalid argument", err)
			}
		})
	}

	t.Run("metrics registered twice", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		opts := ServerOptions{Node: "n", Store: store, Inventory: inv, Registerer: reg}
		if _, err := NewServer(opts); err != nil {
			t.Fatal(err)
		}
		if _, err := NewServer(opts); !errdefs.IsInvalidArgument(err) {
			t.Fatalf("second NewServer on one registry: %v, want invalid argument", err)
		}
	})

	t.Run("no registerer", func(t *testing.T) {
		srv, err := NewServer(ServerOptions{Node: "n", Store: store, Inventory: inv})
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodGet, MetricsPath, nil))
		if rec.Code != http.StatusNotFound || errorCode(rec.Body.Bytes()) != CodeNotFound {
			t.Fatalf("metrics without a gatherer: %d %s", rec.Code, rec.Body)
		}
	})
}

func TestServerBase(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 1024)
	ts := f.start(ctx, t)
	for _, method := range []string{http.MethodGet, http.MethodHead} {
		t.Run(method, func(t *testing.T) {
			resp, body := do(t, ts, method, "/v2/", nil, nil)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d", resp.StatusCode)
			}
			if got := resp.Header.Get("Docker-Distribution-API-Version"); got != "registry/2.0" {
				t.Fatalf("API version header %q", got)
			}
			want := "{}"
			if method == http.MethodHead {
				want = ""
			}
			if string(body) != want {
				t.Fatalf("body %q, want %q", body, want)
			}
		})
	}
}

func TestServerBlobs(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 3<<20+17) // several copy buffers
	ts := f.start(ctx, t)
	size := int64(len(f.big))
	bigPath := "/v2/library/busybox/blobs/" + f.bigD.String()

	for _, tc := range []struct {
		name     string
		method   string
		path     string
		hdr      map[string]string
		status   int
		body     []byte // checked when non-nil
		code     string // OCI error code, checked when set
		crange   string // Content-Range, checked when set
		digestHd bool   // expect blob headers
	}{
		{name: "get", method: "GET", path: bigPath, status: 200, body: f.big, digestHd: true},
		{name: "head", method: "HEAD", path: bigPath, status: 200, body: []byte{}, digestHd: true},
		{name: "any name", method: "GET", path: "/v2/a/b/c-d.e__f/blobs/" + f.smallD.String(), status: 200, body: f.small, digestHd: true},
		{name: "empty blob", method: "GET", path: "/v2/x/blobs/" + f.emptyD.String(), status: 200, body: []byte{}, digestHd: true},
		{name: "range a-b", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=10-19"}, status: 206, body: f.big[10:20], crange: fmt.Sprintf("bytes 10-19/%d", size), digestHd: true},
		{name: "range a-", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=1048570-"}, status: 206, body: f.big[1048570:], crange: fmt.Sprintf("bytes 1048570-%d/%d", size-1, size), digestHd: true},
		{name: "range suffix", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=-5"}, status: 206, body: f.big[size-5:], crange: fmt.Sprintf("bytes %d-%d/%d", size-5, size-1, size), digestHd: true},
		{name: "range end cut", method: "GET", path: bigPath, hdr: map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", size-3, size+100)}, status: 206, body: f.big[size-3:], crange: fmt.Sprintf("bytes %d-%d/%d", size-3, size-1, size), digestHd: true},
		{name: "range suffix longer than blob", method: "GET", path: "/v2/x/blobs/" + f.smallD.String(), hdr: map[string]string{"Range": "bytes=-1000"}, status: 206, body: f.small, crange: fmt.Sprintf("bytes 0-%d/%d", len(f.small)-1, len(f.small)), digestHd: true},
		{name: "range unit case", method: "GET", path: bigPath, hdr: map[string]string{"Range": "Bytes=0-0"}, status: 206, body: f.big[:1], crange: fmt.Sprintf("bytes 0-0/%d", size), digestHd: true},
		{name: "range whole", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=0-"}, status: 206, body: f.big, crange: fmt.Sprintf("bytes 0-%d/%d", size-1, size), digestHd: true},
		{name: "range ignored on head", method: "HEAD", path: bigPath, hdr: map[string]string{"Range": "bytes=0-9"}, status: 200, body: []byte{}, digestHd: true},
		{name: "if-range matches", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=0-9", "If-Range": `"` + f.bigD.String() + `"`}, status: 206, body: f.big[:10], digestHd: true},
		{name: "if-range differs", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=0-9", "If-Range": `"sha256:other"`}, status: 200, body: f.big, digestHd: true},
		{name: "range past end", method: "GET", path: bigPath, hdr: map[string]string{"Range": fmt.Sprintf("bytes=%d-", size)}, status: 416, code: CodeRangeInvalid, crange: fmt.Sprintf("bytes */%d", size)},
		{name: "range zero suffix", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=-0"}, status: 416, code: CodeRangeInvalid, crange: fmt.Sprintf("bytes */%d", size)},
		{name: "range of empty blob", method: "GET", path: "/v2/x/blobs/" + f.emptyD.String(), hdr: map[string]string{"Range": "bytes=0-"}, status: 416, code: CodeRangeInvalid, crange: "bytes */0"},
		{name: "range reversed", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=9-3"}, status: 416, code: CodeRangeInvalid, crange: fmt.Sprintf("bytes */%d", size)},
		{name: "range malformed", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=abc"}, status: 416, code: CodeRangeInvalid},
		{name: "range signed", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=+1-2"}, status: 416, code: CodeRangeInvalid},
		{name: "range overflow", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=0-99999999999999999999"}, status: 416, code: CodeRangeInvalid},
		{name: "range other unit", method: "GET", path: bigPath, hdr: map[string]string{"Range": "items=0-1"}, status: 416, code: CodeRangeInvalid},
		{name: "multi range", method: "GET", path: bigPath, hdr: map[string]string{"Range": "bytes=0-1,4-5"}, status: 416, code: CodeRangeInvalid, crange: fmt.Sprintf("bytes */%d", size)},
		{name: "unknown blob", method: "GET", path: "/v2/x/blobs/" + f.missingD.String(), status: 404, code: CodeBlobUnknown},
		{name: "unknown blob head", method: "HEAD", path: "/v2/x/blobs/" + f.missingD.String(), status: 404, body: []byte{}},
		{name: "short digest", method: "GET", path: "/v2/x/blobs/sha256:abc", status: 400, code: CodeDigestInvalid},
		{name: "uppercase digest", method: "GET", path: "/v2/x/blobs/sha256:" + strings.ToUpper(f.bigD.Encoded()), status: 400, code: CodeDigestInvalid},
		{name: "unsupported algorithm", method: "GET", path: "/v2/x/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", status: 400, code: CodeDigestInvalid},
		{name: "not a digest", method: "GET", path: "/v2/x/blobs/latest", status: 400, code: CodeDigestInvalid},
		{name: "uppercase name", method: "GET", path: "/v2/Library/blobs/" + f.smallD.String(), status: 400, code: CodeNameInvalid},
		{name: "no name", method: "GET", path: "/v2/blobs/" + f.smallD.String(), status: 400, code: CodeNameInvalid},
		{name: "dot dot name", method: "GET", path: "/v2/../blobs/" + f.smallD.String(), status: 400, code: CodeNameInvalid},
		{name: "dot dot inside", method: "GET", path: "/v2/a/../../blobs/" + f.smallD.String(), status: 400, code: CodeNameInvalid},
		{name: "double slash", method: "GET", path: "/v2/a//b/blobs/" + f.smallD.String(), status: 400, code: CodeNameInvalid},
		{name: "empty name", method: "GET", path: "/v2//blobs/" + f.smallD.String(), status: 400, code: CodeNameInvalid},
		{name: "encoded slash", method: "GET", path: "/v2/a%2Fb/blobs/" + f.smallD.String(), status: 404, code: CodeNotFound},
		{name: "encoded dots", method: "GET", path: "/v2/%2e%2e/blobs/" + f.smallD.String(), status: 404, code: CodeNotFound},
		{name: "encoded digest", method: "GET", path: "/v2/x/blobs/sha256%3A" + f.smallD.Encoded(), status: 404, code: CodeNotFound},
		{name: "trailing slash", method: "GET", path: "/v2/x/blobs/" + f.smallD.String() + "/", status: 404, code: CodeNotFound},
		{name: "upload", method: "POST", path: "/v2/x/blobs/uploads/", status: 405, code: CodeUnsupported},
		{name: "delete", method: "DELETE", path: "/v2/x/blobs/" + f.smallD.String(), status: 405, code: CodeUnsupported},
		{name: "put", method: "PUT", path: "/v2/x/blobs/" + f.smallD.String(), status: 405, code: CodeUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := do(t, ts, tc.method, tc.path, tc.hdr, nil)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %.300s", resp.StatusCode, tc.status, body)
			}
			if tc.body != nil && !bytes.Equal(body, tc.body) {
				t.Fatalf("body of %d bytes differs from the %d expected", len(body), len(tc.body))
			}
			if tc.code != "" {
				if got := errorCode(body); got != tc.code {
					t.Fatalf("error code %q, want %q; body %s", got, tc.code, body)
				}
				if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
					t.Fatalf("error Content-Type %q", ct)
				}
			}
			if tc.crange != "" {
				if got := resp.Header.Get("Content-Range"); got != tc.crange {
					t.Fatalf("Content-Range %q, want %q", got, tc.crange)
				}
			}
			if tc.status == http.StatusMethodNotAllowed {
				if got := resp.Header.Get("Allow"); got != "GET, HEAD" {
					t.Fatalf("Allow %q", got)
				}
			}
			if !tc.digestHd {
				return
			}
			d := tc.path[strings.LastIndexByte(tc.path, '/')+1:]
			for k, v := range map[string]string{
				"Docker-Content-Digest": d,
				"Content-Type":          "application/octet-stream",
				"Accept-Ranges":         "bytes",
				"ETag":                  `"` + d + `"`,
			} {
				if got := resp.Header.Get(k); got != v {
					t.Fatalf("%s %q, want %q", k, got, v)
				}
			}
			wantLen := int64(len(tc.body))
			if tc.method == http.MethodHead {
				bs, _ := f.store.Info(ctx, digest.Digest(d))
				wantLen = bs.Size
			}
			if resp.ContentLength != wantLen {
				t.Fatalf("Content-Length %d, want %d", resp.ContentLength, wantLen)
			}
		})
	}
}

func TestServerManifests(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 1024)
	ts := f.start(ctx, t)
	for _, tc := range []struct {
		name   string
		method string
		ref    string
		status int
		body   []byte
		ctype  string
		code   string
	}{
		{name: "with media type", method: "GET", ref: f.manifestD.String(), status: 200, body: f.manifest, ctype: ocispec.MediaTypeImageManifest},
		{name: "head", method: "HEAD", ref: f.manifestD.String(), status: 200, body: []byte{}, ctype: ocispec.MediaTypeImageManifest},
		{name: "inferred index", method: "GET", ref: f.indexD.String(), status: 200, body: f.index, ctype: ocispec.MediaTypeImageIndex},
		{name: "inferred image manifest", method: "GET", ref: f.bareManifestD.String(), status: 200, body: f.bareManifest, ctype: ocispec.MediaTypeImageManifest},
		{name: "inferred head", method: "HEAD", ref: f.indexD.String(), status: 200, body: []byte{}, ctype: ocispec.MediaTypeImageIndex},
		{name: "tag", method: "GET", ref: "latest", status: 404, code: CodeManifestUnknown},
		{name: "tag head", method: "HEAD", ref: "v1.2.3", status: 404, body: []byte{}},
		{name: "bad digest", method: "GET", ref: "sha256:baddigeststring", status: 400, code: CodeDigestInvalid},
		{name: "unknown", method: "GET", ref: f.missingD.String(), status: 404, code: CodeManifestUnknown},
		{name: "json not a manifest", method: "GET", ref: f.notManifestD.String(), status: 404, code: CodeManifestUnknown},
		{name: "not json", method: "GET", ref: f.notJSOND.String(), status: 404, code: CodeManifestUnknown},
		{name: "too large", method: "GET", ref: f.bigManifestLikeD.String(), status: 404, code: CodeManifestUnknown},
		{name: "blob is not a manifest", method: "GET", ref: f.smallD.String(), status: 404, code: CodeManifestUnknown},
		{name: "put", method: "PUT", ref: "latest", status: 405, code: CodeUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := do(t, ts, tc.method, "/v2/library/busybox/manifests/"+tc.ref, nil, nil)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %.300s", resp.StatusCode, tc.status, body)
			}
			if tc.body != nil && !bytes.Equal(body, tc.body) {
				t.Fatalf("body %.200q, want %.200q", body, tc.body)
			}
			if tc.code != "" {
				if got := errorCode(body); got != tc.code {
					t.Fatalf("error code %q, want %q; body %s", got, tc.code, body)
				}
			}
			if tc.status != http.StatusOK {
				return
			}
			if got := resp.Header.Get("Content-Type"); got != tc.ctype {
				t.Fatalf("Content-Type %q, want %q", got, tc.ctype)
			}
			if got := resp.Header.Get("Docker-Content-Digest"); got != tc.ref {
				t.Fatalf("Docker-Content-Digest %q, want %q", got, tc.ref)
			}
			info, err := f.store.Info(ctx, digest.Digest(tc.ref))
			if err != nil {
				t.Fatal(err)
			}
			if resp.ContentLength != info.Size {
				t.Fatalf("Content-Length %d, want %d", resp.ContentLength, info.Size)
			}
		})
	}
}

func TestServerInventory(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 1024)
	ts := f.start(ctx, t)

	resp, body := do(t, ts, http.MethodGet, InventoryPath, nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type %q", ct)
	}
	var got InventoryResponse
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatal(err)
	}
	snap := f.inv.Snapshot()
	if got.Node != "node-a" || got.Epoch != snap.Epoch || got.Seq != snap.Seq || len(got.Blobs) != len(snap.Blobs) {
		t.Fatalf("inventory %s/%s/%d with %d blobs, want node-a/%s/%d with %d", got.Node, got.Epoch, got.Seq, len(got.Blobs), snap.Epoch, snap.Seq, len(snap.Blobs))
	}
	for i, b := range snap.Blobs {
		if got.Blobs[i] != b {
			t.Fatalf("blob %d: %v, want %v", i, got.Blobs[i], b)
		}
	}

	t.Run("empty inventory is a list", func(t *testing.T) {
		inv := content.NewInventory()
		srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: inv})
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodGet, InventoryPath, nil))
		if !strings.Contains(rec.Body.String(), `"blobs":[]`) {
			t.Fatalf("empty inventory: %s", rec.Body)
		}
	})

	t.Run("post", func(t *testing.T) {
		resp, body := do(t, ts, http.MethodPost, InventoryPath, nil, strings.NewReader("{}"))
		if resp.StatusCode != http.StatusMethodNotAllowed || errorCode(body) != CodeUnsupported || resp.Header.Get("Allow") != "GET, HEAD" {
			t.Fatalf("POST inventory: %d %q %s", resp.StatusCode, resp.Header.Get("Allow"), body)
		}
	})
}

func TestServerHave(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 1024)
	ts := f.start(ctx, t)

	digests := func(n int) string {
		ds := make([]digest.Digest, n)
		for i := range ds {
			ds[i] = digest.FromString(strconv.Itoa(i))
		}
		b, _ := json.Marshal(HaveRequest{Digests: ds})
		return string(b)
	}
	for _, tc := range []struct {
		name   string
		method string
		body   string
		status int
		code   string
		want   []content.Blob
	}{
		{name: "some held", method: "POST", body: fmt.Sprintf(`{"digests":[%q,%q,%q]}`, f.bigD, f.missingD, f.smallD), status: 200,
			want: []content.Blob{{Digest: f.bigD, Size: int64(len(f.big))}, {Digest: f.smallD, Size: int64(len(f.small))}}},
		{name: "none asked", method: "POST", body: `{"digests":[]}`, status: 200, want: []content.Blob{}},
		{name: "at the limit", method: "POST", body: digests(MaxHaveDigests), status: 200, want: []content.Blob{}},
		{name: "too many digests", method: "POST", body: digests(MaxHaveDigests + 1), status: 413, code: CodeSizeInvalid},
		{name: "invalid json", method: "POST", body: `{"digests":[`, status: 400, code: CodeInvalidArgument},
		{name: "trailing data", method: "POST", body: `{"digests":[]} {}`, status: 400, code: CodeInvalidArgument},
		{name: "invalid digest", method: "POST", body: fmt.Sprintf(`{"digests":[%q,"sha256:nope"]}`, f.bigD), status: 400, code: CodeDigestInvalid},
		{name: "get", method: "GET", status: 405, code: CodeUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := do(t, ts, tc.method, HavePath, map[string]string{"Content-Type": "application/json"}, strings.NewReader(tc.body))
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %.300s", resp.StatusCode, tc.status, body)
			}
			if tc.code != "" {
				if got := errorCode(body); got != tc.code {
					t.Fatalf("error code %q, want %q; body %s", got, tc.code, body)
				}
				return
			}
			var got HaveResponse
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatal(err)
			}
			if got.Node != "node-a" || got.Epoch != f.inv.Epoch() || got.Seq != f.inv.Snapshot().Seq {
				t.Fatalf("answer from %s/%s/%d", got.Node, got.Epoch, got.Seq)
			}
			if got.Blobs == nil || len(got.Blobs) != len(tc.want) {
				t.Fatalf("blobs %v, want %v", got.Blobs, tc.want)
			}
			for i := range tc.want {
				if got.Blobs[i] != tc.want[i] {
					t.Fatalf("blobs %v, want %v", got.Blobs, tc.want)
				}
			}
		})
	}

	// Straight to the handler: a client may not finish sending a body the
	// server stopped reading.
	t.Run("oversized body", func(t *testing.T) {
		body := `{"digests":["` + strings.Repeat("a", maxHaveBody) + `"]}`
		rec := httptest.NewRecorder()
		f.srv.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodPost, HavePath, strings.NewReader(body)))
		if rec.Code != http.StatusRequestEntityTooLarge || errorCode(rec.Body.Bytes()) != CodeSizeInvalid {
			t.Fatalf("oversized have: %d %s", rec.Code, rec.Body)
		}
	})
}

func TestServerOtherPaths(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 1024)
	ts := f.start(ctx, t)
	for _, tc := range []struct {
		name   string
		method string
		path   string
		status int
		code   string
		body   string
	}{
		{name: "health", method: "GET", path: HealthPath, status: 200, body: "ok"},
		{name: "health head", method: "HEAD", path: HealthPath, status: 200},
		{name: "health post", method: "POST", path: HealthPath, status: 405, code: CodeUnsupported},
		{name: "root", method: "GET", path: "/", status: 404, code: CodeNotFound},
		{name: "v2 without slash", method: "GET", path: "/v2", status: 404, code: CodeNotFound},
		{name: "tags list", method: "GET", path: "/v2/x/tags/list", status: 404, code: CodeNotFound},
		{name: "referrers", method: "GET", path: "/v2/x/referrers/" + f.manifestD.String(), status: 404, code: CodeNotFound},
		{name: "catalog", method: "GET", path: "/v2/_catalog", status: 404, code: CodeNotFound},
		{name: "unknown coop path", method: "GET", path: "/coop/v1/nothing", status: 404, code: CodeNotFound},
		{name: "inventory trailing slash", method: "GET", path: InventoryPath + "/", status: 404, code: CodeNotFound},
		{name: "dot segments", method: "GET", path: "/coop/v1/../v1/inventory", status: 404, code: CodeNotFound},
		{name: "escaped coop path", method: "GET", path: "/coop/v1/%69nventory", status: 404, code: CodeNotFound},
		{name: "v2 post", method: "POST", path: "/v2/", status: 405, code: CodeUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := do(t, ts, tc.method, tc.path, nil, nil)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %.300s", resp.StatusCode, tc.status, body)
			}
			if tc.code != "" {
				if got := errorCode(body); got != tc.code {
					t.Fatalf("error code %q, want %q; body %s", got, tc.code, body)
				}
			}
			if tc.body != "" && string(body) != tc.body {
				t.Fatalf("body %q, want %q", body, tc.body)
			}
		})
	}
}

func TestServerMetrics(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 2<<20+5)
	ts := f.start(ctx, t)
	served := func() float64 { return metricValue(t, f.reg, "coop_peer_served_bytes_total", nil) }
	blobPath := "/v2/x/blobs/" + f.bigD.String()

	for _, tc := range []struct {
		name   string
		method string
		path   string
		rng    string
		want   float64
	}{
		{"full get", http.MethodGet, blobPath, "", float64(len(f.big))},
		{"range", http.MethodGet, blobPath, "bytes=100-199", 100},
		{"head", http.MethodHead, blobPath, "", 0},
		{"416", http.MethodGet, blobPath, "bytes=-0", 0},
		{"manifest", http.MethodGet, "/v2/x/manifests/" + f.manifestD.String(), "", float64(len(f.manifest))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hdr map[string]string
			if tc.rng != "" {
				hdr = map[string]string{"Range": tc.rng}
			}
			before := served()
			do(t, ts, tc.method, tc.path, hdr, nil)
			if got := served() - before; got != tc.want {
				t.Fatalf("served bytes grew by %v, want %v", got, tc.want)
			}
		})
	}

	for _, tc := range []struct {
		kind, code string
		want       float64
	}{
		{"blob", "200", 2},
		{"blob", "206", 1},
		{"blob", "416", 1},
		{"manifest", "200", 1},
	} {
		if got := metricValue(t, f.reg, "coop_peer_requests_total", map[string]string{"kind": tc.kind, "code": tc.code}); got != tc.want {
			t.Errorf("requests{kind=%s,code=%s} = %v, want %v", tc.kind, tc.code, got, tc.want)
		}
	}
	if got := metricValue(t, f.reg, "coop_peer_active_uploads", nil); got != 0 {
		t.Errorf("active uploads %v after all answers", got)
	}

	resp, body := do(t, ts, http.MethodGet, MetricsPath, nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("metrics: %d", resp.StatusCode)
	}
	for _, name := range []string{"coop_peer_requests_total", "coop_peer_served_bytes_total", "coop_peer_active_uploads"} {
		if !bytes.Contains(body, []byte(name)) {
			t.Errorf("metrics page lacks %s", name)
		}
	}
	if got := metricValue(t, f.reg, "coop_peer_requests_total", map[string]string{"kind": "other", "code": "200"}); got != 1 {
		t.Errorf("requests{kind=other,code=200} = %v after one metrics scrape", got)
	}
}

func TestWriteError(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	for _, tc := range []struct {
		name    string
		err     error
		status  int
		code    string
		message string // substring, when set
	}{
		{"typed", newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "blob x"), 404, CodeBlobUnknown, "blob x"},
		{"typed wrapped", fmt.Errorf("outer: %w", newError(http.StatusBadRequest, CodeDigestInvalid, errdefs.ErrInvalidArgument, "d")), 400, CodeDigestInvalid, "d"},
		{"not found class", fmt.Errorf("thing: %w", errdefs.ErrNotFound), 404, CodeNotFound, "thing"},
		{"invalid argument class", fmt.Errorf("arg: %w", errdefs.ErrInvalidArgument), 400, CodeInvalidArgument, "arg"},
		{"other", fmt.Errorf("disk on fire /secret/path"), 500, CodeUnknown, "Internal Server Error"},
		{"canceled", context.Canceled, 500, CodeUnknown, ""},
		{"non-error status", &Error{Status: 200, Code: "X"}, 500, "X", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			WriteError(ctx, rec, tc.err)
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d", rec.Code, tc.status)
			}
			var er ErrorResponse
			if err := json.Unmarshal(rec.Body.Bytes(), &er); err != nil || len(er.Errors) != 1 {
				t.Fatalf("body %s: %v", rec.Body, err)
			}
			if er.Errors[0].Code != tc.code || !strings.Contains(er.Errors[0].Message, tc.message) {
				t.Fatalf("error %+v, want code %s with %q", er.Errors[0], tc.code, tc.message)
			}
			if strings.Contains(rec.Body.String(), "/secret/path") {
				t.Fatal("internal error text shown to the client")
			}
		})
	}
	if e := newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "x"); !errdefs.IsNotFound(e) {
		t.Fatal("an *Error does not unwrap to its class")
	}
}

func TestParseByteRange(t *testing.T) {
	for _, tc := range []struct {
		header        string
		size          int64
		start, length int64
		ok            bool
	}{
		{"bytes=0-0", 10, 0, 1, true},
		{"bytes=0-9", 10, 0, 10, true},
		{"bytes=0-100", 10, 0, 10, true},
		{"bytes=9-", 10, 9, 1, true},
		{"bytes=-1", 10, 9, 1, true},
		{"bytes=-10", 10, 0, 10, true},
		{"bytes=-11", 10, 0, 10, true},
		{"bytes= 2-3 ", 10, 2, 2, true},
		{"bytes=10-", 10, 0, 0, false},
		{"bytes=-0", 10, 0, 0, false},
		{"bytes=-1", 0, 0, 0, false},
		{"bytes=0-", 0, 0, 0, false},
		{"bytes=", 10, 0, 0, false},
		{"bytes=-", 10, 0, 0, false},
		{"bytes=1", 10, 0, 0, false},
		{"bytes=a-b", 10, 0, 0, false},
		{"bytes=-+1", 10, 0, 0, false},
		{"bytes=1--2", 10, 0, 0, false},
		{"bytes=0-1,2-3", 10, 0, 0, false},
		{"bytes 0-1", 10, 0, 0, false},
		{"byte=0-1", 10, 0, 0, false},
		{"", 10, 0, 0, false},
	} {
		t.Run(tc.header, func(t *testing.T) {
			start, length, err := parseByteRange(tc.header, tc.size)
			if (err == nil) != tc.ok {
				t.Fatalf("err %v, want ok=%v", err, tc.ok)
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) || e.Status != http.StatusRequestedRangeNotSatisfiable || e.Code != CodeRangeInvalid {
					t.Fatalf("error %v is not a 416 RANGE_INVALID", err)
				}
				return
			}
			if start != tc.start || length != tc.length {
				t.Fatalf("range (%d, %d), want (%d, %d)", start, length, tc.start, tc.length)
			}
		})
	}
}

// FuzzServer checks that no path and Range header makes the server fail
// (5xx) or panic, that every error is an OCI error body, and that a partial
// answer is consistent with its Content-Range.
func FuzzServer(f *testing.F) {
	ctx := context.Background()
	fx := newFixture(ctx, f, 4096)
	blob := "/v2/library/busybox/blobs/" + fx.bigD.String()
	for _, seed := range []struct{ path, rng string }{
		{blob, ""},
		{blob, "bytes=0-10"},
		{blob, "bytes=-10"},
		{blob, "bytes=4000-"},
		{blob, "bytes=4096-"},
		{blob, "bytes=0-1,5-6"},
		{blob, "bytes=99999999999999999999-"},
		{blob, "bytes=--1"},
		{"/v2/x/blobs/" + fx.emptyD.String(), "bytes=0-"},
		{"/v2/x/manifests/" + fx.manifestD.String(), ""},
		{"/v2/x/manifests/" + fx.indexD.String(), "bytes=0-1"},
		{"/v2/x/manifests/latest", ""},
		{"/v2/x/manifests/sha256:", ""},
		{"/v2/", ""},
		{"/v2", ""},
		{"/v2//", ""},
		{"/v2/../../etc/passwd", ""},
		{"/v2/a%2Fb/blobs/" + fx.smallD.String(), ""},
		{"/v2/%2e%2e/blobs/" + fx.smallD.String(), "bytes=0-1"},
		{"/v2/a//b/blobs/" + fx.smallD.String(), ""},
		{"/v2/blobs/", ""},
		{"/v2//blobs/", ""},
		{"/v2/x/blobs/" + fx.smallD.String() + "?x=1", "bytes=1-"},
		{"/v2/x/blobs/sha512:" + strings.Repeat("0", 128), ""},
		{"/v2/x/blobs/sha256:" + strings.Repeat("0", 63) + "%", ""},
		{InventoryPath, ""},
		{HavePath, ""},
		{HealthPath, ""},
		{MetricsPath, ""},
		{"*", ""},
		{"/\x00", ""},
	} {
		f.Add(seed.path, seed.rng)
	}
	f.Fuzz(func(t *testing.T, path, rng string) {
		u, err := url.ParseRequestURI(path)
		if err != nil {
			return // not a request the HTTP server would hand over
		}
		for _, method := range []string{http.MethodGet, http.MethodHead, http.MethodPost} {
			req := (&http.Request{
				Method:     method,
				URL:        u,
				RequestURI: path,
				Proto:      "HTTP/1.1",
				ProtoMajor: 1,
				ProtoMinor: 1,
				Header:     http.Header{},
				Host:       "peer",
				Body:       http.NoBody,
				RemoteAddr: "192.0.2.1:1234",
			}).WithContext(ctx)
			if rng != "" {
				req.Header.Set("Range", rng)
			}
			rec := httptest.NewRecorder()
			fx.srv.ServeHTTP(rec, req)
			if rec.Code >= 500 {
				t.Fatalf("%s %q Range %q: %d %s", method, path, rng, rec.Code, rec.Body)
			}
			if rec.Code >= 400 && method != http.MethodHead && errorCode(rec.Body.Bytes()) == "" {
				t.Fatalf("%s %q Range %q: %d without an OCI error body: %q", method, path, rng, rec.Code, rec.Body)
			}
			if rec.Code == http.StatusPartialContent {
				var a, b, size int64
				if _, err := fmt.Sscanf(rec.Header().Get("Content-Range"), "bytes %d-%d/%d", &a, &b, &size); err != nil {
					t.Fatalf("Content-Range %q: %v", rec.Header().Get("Content-Range"), err)
				}
				if a < 0 || b < a || b >= size || (method == http.MethodGet && int64(rec.Body.Len()) != b-a+1) {
					t.Fatalf("Content-Range %q with %d bytes", rec.Header().Get("Content-Range"), rec.Body.Len())
				}
			}
		}
	})
}

// TestInventorySince: the client's incremental reads, against a real server
// over an inventory with a small log.
func TestInventorySince(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 16)
	inv := content.NewInventorySize(4)
	srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: inv})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	c := &Client{HTTP: ts.Client(), Node: "t"}
	a, b, d := digest.FromString("a"), digest.FromString("b"), digest.FromString("d")
	inv.Add(a, 1)
	inv.Add(b, 2)
	epoch, seq := inv.Version()
	inv.Add(d, 3)
	inv.Remove(a)
	inv.Add(a, 1)
	inv.Remove(b)

	got, err := c.Inventory(ctx, ts.URL, epoch, seq)
	if err != nil {
		t.Fatal(err)
	}
	if got.Full || got.Seq != seq+4 || len(got.Blobs) != 0 {
		t.Fatalf("incremental answer %+v", got)
	}
	// Net effect: d and a added (a re-added wins over its removal), b removed.
	if len(got.Added) != 2 || got.Added[0].Digest != d || got.Added[1].Digest != a || len(got.Removed) != 1 || got.Removed[0] != b {
		t.Fatalf("changes %+v", got)
	}
	for _, tc := range []struct {
		name  string
		epoch string
		seq   uint64
	}{
		{"no since", "", 0},
		{"other epoch", "other", seq},
		{"from the future", epoch, seq + 100},
		{"older than the log", epoch, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.Inventory(ctx, ts.URL, tc.epoch, tc.seq)
			if err != nil {
				t.Fatal(err)
			}
			if !got.Full || got.Epoch != epoch || len(got.Blobs) != 2 {
				t.Fatalf("want the whole inventory, got %+v", got)
			}
		})
	}
	for _, bad := range []string{"nocolon", ":5", "e:-1", "e:x"} {
		resp, body := do(t, ts, http.MethodGet, InventoryPath+"?since="+bad, nil, nil)
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("since=%s: status %d: %s", bad, resp.StatusCode, body)
		}
	}
}

// TestServerMaxUploads: beyond --max-uploads a blob GET gets 429 with
// Retry-After, HEAD and the coop API still answer, and the load says so.
func TestServerMaxUploads(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 32<<20)
	srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: f.inv, MaxUploads: 1})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	c := &Client{HTTP: &http.Client{}, Node: "t"}
	// The first upload stays open: its reader does not read.
	first, err := c.Fetch(ctx, ts.URL, f.bigD, 0, int64(len(f.big)))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	_, err = c.Fetch(ctx, ts.URL, f.smallD, 0, int64(len(f.small)))
	var busy *BusyError
	if !errors.As(err, &busy) || busy.RetryAfter != time.Second || !errdefs.IsUnavailable(err) {
		t.Fatalf("second upload: %v, want a busy peer with Retry-After 1s", err)
	}
	resp, body := do(t, ts, http.MethodHead, "/v2/x/blobs/"+f.smallD.String(), nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("HEAD while busy: %d %s", resp.StatusCode, body)
	}
	_, body = do(t, ts, http.MethodGet, LoadPath, nil, nil)
	var lr LoadResponse
	if err := json.Unmarshal(body, &lr); err != nil || lr.Node != "n" || lr.ActiveUploads != 1 || lr.MaxUploads != 1 {
		t.Fatalf("load %s (%v)", body, err)
	}
	first.Close()
	deadline := time.Now().Add(5 * time.Second)
	for srv.Load().ActiveUploads != 0 {
		if time.Now().After(deadline) {
			t.Fatal("upload slot not released after the client went away")
		}
		time.Sleep(10 * time.Millisecond)
	}
	b, err := c.Fetch(ctx, ts.URL, f.smallD, 0, int64(len(f.small)))
	if err != nil {
		t.Fatalf("after the slot freed: %v", err)
	}
	b.Close()
}

type fakeContainers struct{ stopped []string }

func (f *fakeContainers) Record(_ context.Context, ns, id string) (*ContainerRecord, error) {
	if id != "web" {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return &ContainerRecord{Namespace: ns, ID: id, Image: "registry.example/web:1", Spec: []byte(`{"ociVersion":"1.2.0"}`), Runtime: "io.containerd.runc.v2"}, nil
}

func (f *fakeContainers) Stop(_ context.Context, ns, id string) error {
	f.stopped = append(f.stopped, ns+"/"+id)
	return nil
}

func TestServerContainers(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 16)
	for _, allow := range []bool{false, true} {
		fc := &fakeContainers{}
		srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: f.inv, Containers: fc, AllowStop: allow})
		if err != nil {
			t.Fatal(err)
		}
		ts := httptest.NewServer(srv)
		for _, tc := range []struct {
			method, path string
			status       int
		}{
			{"GET", ContainersPath + "/default/web", 200},
			{"GET", ContainersPath + "/default/nope", 404},
			{"GET", ContainersPath + "/default", 404},
			{"PUT", ContainersPath + "/default/web", 405},
			{"GET", ContainersPath + "/default/web/stop", 405},
			{"POST", ContainersPath + "/default/web/stop", map[bool]int{false: 403, true: 204}[allow]},
		} {
			resp, body := do(t, ts, tc.method, tc.path, nil, nil)
			if resp.StatusCode != tc.status {
				t.Fatalf("allow=%v %s %s: %d, want %d: %s", allow, tc.method, tc.path, resp.StatusCode, tc.status, body)
			}
			if tc.status == 200 {
				var rec ContainerRecord
				if err := json.Unmarshal(body, &rec); err != nil || rec.ID != "web" || string(rec.Spec) != `{"ociVersion":"1.2.0"}` {
					t.Fatalf("record %s (%v)", body, err)
				}
			}
		}
		if got := len(fc.stopped); (got == 1) != allow {
			t.Fatalf("allow=%v: stopped %v", allow, fc.stopped)
		}
		ts.Close()
	}
	// Without containerd the endpoint says so.
	resp, _ := do(t, f.start(ctx, t), "GET", ContainersPath+"/default/web", nil, nil)
	if resp.StatusCode != 404 {
		t.Fatalf("no containerd: %d", resp.StatusCode)
	}
}
