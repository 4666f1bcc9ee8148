package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log/logtest"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

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

// TestServerMaxUploads: beyond --max-uploads a blob GET gets 429 with
// Retry-After, HEAD and the coop API still answer, and the load says so.
func TestServerMaxUploads(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 32<<20)
	srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: f.inv, MaxUploads: 1})
	if err != nil {
		t.Fatal(err)
	}
	// bigServed is closed when the answer to the first upload has ended.
	bigServed := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		srv.ServeHTTP(w, r)
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, f.bigD.String()) {
			close(bigServed)
		}
	}))
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
	select {
	case <-bigServed:
	case <-time.After(10 * time.Second):
		t.Fatal("the first upload's answer did not end after the client went away")
	}
	if n := srv.Load().ActiveUploads; n != 0 {
		t.Fatalf("%d uploads still counted after the client went away", n)
	}
	b, err := c.Fetch(ctx, ts.URL, f.smallD, 0, int64(len(f.small)))
	if err != nil {
		t.Fatalf("after the slot freed: %v", err)
	}
	b.Close()
}
