package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
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
	return newFixtureWith(ctx, t, bigSize, nil)
}

// newFixtureWith is newFixture with more server options.
func newFixtureWith(ctx context.Context, t testing.TB, bigSize int, more func(*ServerOptions)) *fixture {
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

	opts := ServerOptions{
		Node:       "node-a",
		Store:      store,
		Inventory:  inv,
		Registerer: f.reg,
		Gatherer:   f.reg,
	}
	if more != nil {
		more(&opts)
	}
	f.srv, err = NewServer(opts)
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

	t.Run("refused options register nothing", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		if _, err := NewServer(ServerOptions{Node: "n", Store: store, Inventory: inv, Registerer: reg, MaxUploads: -1}); !errdefs.IsInvalidArgument(err) {
			t.Fatalf("negative max uploads: %v, want invalid argument", err)
		}
		if _, err := NewServer(ServerOptions{Node: "n", Store: store, Inventory: inv, Registerer: reg}); err != nil {
			t.Fatalf("NewServer after a refused one on the same registry: %v", err)
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
	for _, name := range []string{"coop_peer_requests_total", "coop_peer_served_bytes_total", "coop_peer_active_uploads", "coop_peer_max_uploads"} {
		if !bytes.Contains(body, []byte(name)) {
			t.Errorf("metrics page lacks %s", name)
		}
	}
	if got := metricValue(t, f.reg, "coop_peer_requests_total", map[string]string{"kind": "other", "code": "200"}); got != 1 {
		t.Errorf("requests{kind=other,code=200} = %v after one metrics scrape", got)
	}
}

// FuzzServer checks that no path and Range header makes the server fail
// (5xx) or panic, that every error is an OCI error body, and that a partial
// answer is consistent with its Content-Range.
func FuzzServer(f *testing.F) {
	ctx := context.Background()
	// A blob still downloading here: chunks 0 and 2 of 5.
	ps, err := NewPartials(f.TempDir())
	if err != nil {
		f.Fatal(err)
	}
	partData := bytes.Repeat([]byte("partial!"), (4*MinPartialChunk+100)/8)
	partD := digest.FromBytes(partData)
	part, _, err := ps.Start(partD, int64(len(partData)), MinPartialChunk)
	if err != nil {
		f.Fatal(err)
	}
	for _, i := range []int{0, 2} {
		off, n := part.Span(i)
		if err := part.Put(i, partData[off:off+n]); err != nil {
			f.Fatal(err)
		}
	}
	fx := newFixtureWith(ctx, f, 4096, func(o *ServerOptions) { o.Partials, o.PartialWait = ps, 10*time.Millisecond })
	blob := "/v2/library/busybox/blobs/" + fx.bigD.String()
	partial := "/v2/x/blobs/" + partD.String()
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
		{partial, "bytes=0-65535"},
		{partial, "bytes=100-70000"},
		{partial, "bytes=131072-196607"},
		{partial, "bytes=-10"},
		{partial, ""},
		{PartialPath + "/" + partD.String(), ""},
		{PartialPath + "/" + fx.bigD.String(), ""},
		{PartialPath + "/sha256:zz", ""},
		{PartialPath + "/", ""},
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
			notYet := rec.Code == http.StatusServiceUnavailable && rec.Header().Get(NotYetHeader) != "" && errorCode(rec.Body.Bytes()) == CodeNotYet
			isPartial := strings.HasSuffix(u.Path, "/blobs/"+partD.String())
			if notYet && !isPartial {
				t.Fatalf("%s %q Range %q: not yet for a blob not downloading here", method, path, rng)
			}
			if rec.Code >= 500 && !notYet {
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
				// A partial blob's chunks are served only when here, and right.
				if isPartial && method == http.MethodGet {
					if !bytes.Equal(rec.Body.Bytes(), partData[a:b+1]) {
						t.Fatalf("partial blob bytes %d-%d differ", a, b)
					}
					for i := int(a / MinPartialChunk); i <= int(b/MinPartialChunk); i++ {
						if !part.Has(i) {
							t.Fatalf("partial blob bytes %d-%d served with chunk %d missing", a, b, i)
						}
					}
				}
			}
		}
	})
}
