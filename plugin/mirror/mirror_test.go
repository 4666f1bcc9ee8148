package mirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// staticResolver returns fixed candidates.
type staticResolver map[digest.Digest][]peers.Candidate

// Known makes staticResolver a Knower: claims ask it.
func (s staticResolver) Known(dgsts []digest.Digest) map[digest.Digest][]peers.Candidate {
	got, _ := s.Locate(context.Background(), dgsts)
	return got
}

func (s staticResolver) Locate(_ context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	if err := resolver.ValidateDigests(dgsts); err != nil {
		return nil, err
	}
	out := map[digest.Digest][]peers.Candidate{}
	for _, d := range dgsts {
		if c, ok := s[d]; ok {
			out[d] = c
		}
	}
	return out, nil
}

// blobPeer serves data for any blob request; how depends on mode.
func blobPeer(t *testing.T, data []byte, mode string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(peers.ForwardedHeader) == "" {
			t.Errorf("request to peer without %s", peers.ForwardedHeader)
		}
		off, end := int64(0), int64(len(data))
		ranged := r.Header.Get("Range") != ""
		if h := r.Header.Get("Range"); h != "" {
			a, b, _ := strings.Cut(strings.TrimPrefix(h, "bytes="), "-")
			off, _ = strconv.ParseInt(a, 10, 64)
			if b != "" {
				last, _ := strconv.ParseInt(b, 10, 64)
				end = last + 1
			}
		}
		body := data[off:end]
		switch mode {
		case "dead":
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		case "corrupt":
			body = make([]byte, len(body))
			_, _ = rand.Read(body)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		if ranged {
			start := off
			if mode == "wrongrange" {
				start = 0 // claims other bytes than asked for
			}
			w.Header().Set("Content-Range", "bytes "+strconv.FormatInt(start, 10)+"-"+strconv.FormatInt(end-1, 10)+"/"+strconv.Itoa(len(data)))
			w.WriteHeader(http.StatusPartialContent)
		}
		switch mode {
		case "short":
			_, _ = w.Write(body[:len(body)/2])
			panic(http.ErrAbortHandler)
		case "trickle":
			// Never silent for a whole stall window, yet far below MinRate.
			for i := 0; i < len(body); i += 512 {
				if _, err := w.Write(body[i:min(i+512, len(body))]); err != nil {
					return
				}
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
					return
				case <-time.After(40 * time.Millisecond):
				}
			}
			return
		case "stall":
			_, _ = w.Write(body[:len(body)/2])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			return
		}
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func newTestMirror(t *testing.T, res resolver.Resolver) (*Mirror, *content.Store) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	store, err := content.NewStore(ctx, t.TempDir(), content.NewInventory())
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Options{
		Resolver:     res,
		Peers:        &peers.Client{HTTP: &http.Client{}, Node: "test"},
		Store:        store,
		StallTimeout: 200 * time.Millisecond,
		HeaderDelay:  50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m, store
}

func TestMirrorBlob(t *testing.T) {
	data := make([]byte, 3<<20+17)
	_, _ = rand.Read(data)
	d := digest.FromBytes(data)
	size := int64(len(data))
	for _, tc := range []struct {
		name   string
		modes  []string
		ok     bool
		status int
	}{
		{"one good peer", []string{"good"}, true, 200},
		{"dead then good", []string{"dead", "good"}, true, 200},
		{"short then good resumes", []string{"short", "good"}, true, 200},
		{"stall then good resumes", []string{"stall", "good"}, true, 200},
		{"corrupt then good", []string{"corrupt", "good"}, true, 200},
		{"trickle then good", []string{"trickle", "good"}, true, 200},
		{"short then wrong range then good", []string{"short", "wrongrange", "good"}, true, 200},
		{"only trickle", []string{"trickle"}, false, 404},
		{"only corrupt", []string{"corrupt"}, false, 404},
		{"only stalled", []string{"stall"}, false, 404},
		{"no candidate", nil, false, 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cs []peers.Candidate
			for i, mode := range tc.modes {
				cs = append(cs, peers.Candidate{Node: mode + strconv.Itoa(i), URL: blobPeer(t, data, mode).URL, Size: size})
			}
			m, store := newTestMirror(t, staticResolver{d: cs})
			m.headerDelay = time.Minute // these blobs are small: answer after verifying
			srv := httptest.NewServer(m)
			defer srv.Close()
			resp, err := http.Get(srv.URL + "/v2/library/x/blobs/" + d.String() + "?ns=registry.example")
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, got)
			}
			_, err = store.Info(context.Background(), d)
			if tc.ok {
				if !bytes.Equal(got, data) {
					t.Fatal("served bytes differ")
				}
				if err != nil {
					t.Fatalf("blob not landed in the local store: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("a blob no peer served correctly was committed")
			}
			// The resume goes to the registry: 404 again, at once.
			req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v2/library/x/blobs/"+d.String(), nil)
			req.Header.Set("Range", "bytes=100-")
			resp2, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp2.Body.Close()
			if resp2.StatusCode != 404 {
				t.Fatalf("resume status %d, want 404", resp2.StatusCode)
			}
		})
	}
}

// TestMirrorAbortsAfterHeaders: when headers went out before the fetch
// failed, the body is cut before any byte, so containerd retries.
func TestMirrorAbortsAfterHeaders(t *testing.T) {
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	d := digest.FromBytes(data)
	m, _ := newTestMirror(t, staticResolver{d: {{Node: "s", URL: blobPeer(t, data, "stall").URL, Size: int64(len(data))}}})
	srv := httptest.NewServer(m)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/v2/x/blobs/" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	if err == nil || n != 0 {
		t.Fatalf("body: %d bytes, err %v; want a cut with no byte", n, err)
	}
}

func TestMirrorRequests(t *testing.T) {
	data := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	d := digest.FromBytes(data)
	peer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		_, _ = w.Write(data)
	}))
	defer peer.Close()
	m, _ := newTestMirror(t, staticResolver{d: {{Node: "p", URL: peer.URL, Size: int64(len(data))}}})
	srv := httptest.NewServer(m)
	defer srv.Close()
	for _, tc := range []struct {
		name, method, path string
		header             map[string]string
		status             int
		ctype              string
	}{
		{"base", "GET", "/v2/", nil, 200, "application/json"},
		{"health", "GET", "/healthz", nil, 200, ""},
		{"manifest by digest", "GET", "/v2/library/x/manifests/" + d.String(), nil, 200, "application/vnd.oci.image.manifest.v1+json"},
		{"manifest head", "HEAD", "/v2/library/x/manifests/" + d.String(), nil, 200, "application/vnd.oci.image.manifest.v1+json"},
		{"tag", "GET", "/v2/library/x/manifests/latest", nil, 404, "application/json"},
		{"loop", "GET", "/v2/library/x/manifests/" + d.String(), map[string]string{peers.ForwardedHeader: "other"}, 404, "application/json"},
		{"bad digest", "GET", "/v2/x/blobs/sha256:zz", nil, 400, "application/json"},
		{"bad name", "GET", "/v2/UPPER/blobs/" + d.String(), nil, 400, "application/json"},
		{"unknown path", "GET", "/v3/x", nil, 404, "application/json"},
		{"push", "PUT", "/v2/x/blobs/uploads/", nil, 405, "application/json"},
		{"bad range", "GET", "/v2/x/blobs/" + d.String(), map[string]string{"Range": "bytes=1-2"}, 404, "application/json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if tc.ctype != "" && resp.Header.Get("Content-Type") != tc.ctype {
				t.Fatalf("content type %q, want %q", resp.Header.Get("Content-Type"), tc.ctype)
			}
		})
	}
}

// racingStore commits the right blob under another ref whenever a commit of
// the mirror's own ingest fails, as a concurrent pull would.
type racingStore struct {
	*content.Store
	data []byte
}

func (s racingStore) Writer(ctx context.Context, opts ...ctdcontent.WriterOpt) (ctdcontent.Writer, error) {
	w, err := s.Store.Writer(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return racingWriter{Writer: w, s: s}, nil
}

type racingWriter struct {
	ctdcontent.Writer
	s racingStore
}

func (w racingWriter) Commit(ctx context.Context, size int64, expected digest.Digest, opts ...ctdcontent.Opt) error {
	err := w.Writer.Commit(ctx, size, expected, opts...)
	if err != nil {
		desc := ocispec.Descriptor{Digest: expected, Size: size}
		if werr := ctdcontent.WriteBlob(ctx, w.s.Store, "racer", bytes.NewReader(w.s.data), desc); werr != nil {
			panic(werr)
		}
	}
	return err
}

// TestMirrorCorruptThenCommittedElsewhere: the peer's blob does not verify,
// and meanwhile another writer lands the blob. The mirror serves it, and
// does not crash on the writer it no longer has.
func TestMirrorCorruptThenCommittedElsewhere(t *testing.T) {
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	d := digest.FromBytes(data)
	m, store := newTestMirror(t, staticResolver{d: {{Node: "c", URL: blobPeer(t, data, "corrupt").URL, Size: int64(len(data))}}})
	m.store = racingStore{Store: store, data: data}
	m.headerDelay = time.Minute
	srv := httptest.NewServer(m)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/v2/x/blobs/" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !bytes.Equal(got, data) {
		t.Fatalf("status %d, %d bytes; want the blob", resp.StatusCode, len(got))
	}
}

func TestFetchGroupRecovers(t *testing.T) {
	g := newFetchGroup()
	defer g.close()
	c := g.start(context.Background(), digest.FromString("x"), func(context.Context) error { panic("boom") })
	<-c.done
	if !errdefs.IsInternal(c.err) {
		t.Fatalf("err %v, want an internal error", c.err)
	}
}

func TestFetchGroupCloseCancelsAndWaits(t *testing.T) {
	g := newFetchGroup()
	started := make(chan struct{})
	var ended atomic.Bool
	c := g.start(context.Background(), digest.FromString("x"), func(ctx context.Context) error {
		close(started)
		<-ctx.Done()
		ended.Store(true)
		return ctx.Err()
	})
	<-started
	g.close()
	if !ended.Load() {
		t.Fatal("close returned before the fetch ended")
	}
	<-c.done
	if !errors.Is(c.err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", c.err)
	}
	after := g.start(context.Background(), digest.FromString("y"), func(context.Context) error { return nil })
	<-after.done
	if !errdefs.IsUnavailable(after.err) {
		t.Fatalf("a fetch after close: err %v, want unavailable", after.err)
	}
}

// failingResolver fails every locate, as a dead ClusterKB does.
type failingResolver struct{}

func (failingResolver) Locate(context.Context, []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	return nil, errdefs.ErrUnavailable
}

func TestMirrorLocate(t *testing.T) {
	d := digest.FromString("x")
	m, _ := newTestMirror(t, staticResolver{d: {{Node: "p", URL: "http://127.0.0.1:1", Size: 1}}})
	srv := httptest.NewServer(m)
	defer srv.Close()
	dead, _ := newTestMirror(t, failingResolver{})
	deadSrv := httptest.NewServer(dead)
	defer deadSrv.Close()
	for _, tc := range []struct {
		name, base, method, query, body string
		status                          int
		found                           bool
	}{
		{"post", srv.URL, "POST", "", `{"digests":["` + d.String() + `"]}`, 200, true},
		{"get", srv.URL, "GET", "?digest=" + d.String(), "", 200, true},
		{"unknown", srv.URL, "GET", "?digest=" + digest.FromString("y").String(), "", 200, false},
		{"bad digest", srv.URL, "GET", "?digest=sha256:zz", "", 400, false},
		{"bad body", srv.URL, "POST", "", `{`, 400, false},
		{"put", srv.URL, "PUT", "", "", 405, false},
		{"dead index", deadSrv.URL, "GET", "?digest=" + d.String(), "", 503, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, tc.base+"/coop/v1/locate"+tc.query, strings.NewReader(tc.body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
			}
			if tc.status == 200 && strings.Contains(string(b), `"node":"p"`) != tc.found {
				t.Fatalf("answer %s, found want %v", b, tc.found)
			}
		})
	}
}

// TestMirrorSourcesAndDownloads: a migration source is a candidate at once,
// whatever the index says, until it is deleted; the download is reported.
func TestMirrorSourcesAndDownloads(t *testing.T) {
	data := make([]byte, 2<<20)
	_, _ = rand.Read(data)
	d := digest.FromBytes(data)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store, err := content.NewStore(ctx, t.TempDir(), content.NewInventory())
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Options{Resolver: staticResolver{}, Peers: &peers.Client{HTTP: &http.Client{}, Node: "t"},
		Store: store, Sources: resolver.NewSources(), HeaderDelay: time.Minute, APIToken: testToken})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	srv := httptest.NewServer(m)
	defer srv.Close()
	get := func() int {
		resp, err := http.Get(srv.URL + "/v2/x/blobs/" + d.String())
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode
	}
	post := func(body string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, srv.URL+SourcesPath, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+testToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	for _, bad := range []string{`{`, `{"node":"s","url":"ftp://x","blobs":{"` + d.String() + `":1}}`, `{"node":"s","url":"http://127.0.0.1:1","blobs":{}}`} {
		resp := post(bad)
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("source %s: status %d, want 400", bad, resp.StatusCode)
		}
	}
	src := blobPeer(t, data, "good")
	body := `{"node":"src","url":"` + src.URL + `","blobs":{"` + d.String() + `":` + strconv.Itoa(len(data)) + `}}`
	resp := post(body)
	var sr SourceResponse
	if err := json.NewDecoder(resp.Body).Decode(&sr); err != nil || sr.ID == "" {
		t.Fatalf("add source: %v %+v", err, sr)
	}
	resp.Body.Close()
	if code := get(); code != 200 {
		t.Fatalf("blob from the migration source: status %d", code)
	}
	resp, err = http.Get(srv.URL + DownloadsPath + "?digest=" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	var dls []Download
	if err := json.NewDecoder(resp.Body).Decode(&dls); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if len(dls) != 1 || !dls[0].Done || dls[0].BytesByNode["src"] != int64(len(data)) {
		t.Fatalf("downloads %+v", dls)
	}
	req, _ := http.NewRequest(http.MethodDelete, srv.URL+SourcesPath+"/"+sr.ID, nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("delete source: %d", resp.StatusCode)
	}
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("delete again: %d, want 404", resp.StatusCode)
	}
	got, _ := m.resolver.Locate(ctx, []digest.Digest{d})
	if len(got[d]) != 0 {
		t.Fatalf("source still a candidate after delete: %v", got)
	}
}

// testToken is the API token of the test mirrors that take sources.
const testToken = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// newSourcesMirror returns a mirror taking sources with token as its API
// token, served by an httptest server.
func newSourcesMirror(t *testing.T, token string) (*Mirror, *httptest.Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	store, err := content.NewStore(ctx, t.TempDir(), content.NewInventory())
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Options{Resolver: staticResolver{}, Peers: &peers.Client{HTTP: &http.Client{}, Node: "t"},
		Store: store, Sources: resolver.NewSources(), APIToken: token})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	srv := httptest.NewServer(m)
	t.Cleanup(srv.Close)
	return m, srv
}

// sourceBody is a valid SourceRequest naming n blobs.
func sourceBody(n int) string {
	blobs := map[digest.Digest]int64{}
	for i := range n {
		blobs[digest.FromString(strconv.Itoa(i))] = 1
	}
	b, _ := json.Marshal(SourceRequest{Node: "src", URL: "http://127.0.0.1:1", Blobs: blobs})
	return string(b)
}

// TestMirrorSourcesAuth: the write endpoints need the API token, the
// read-only ones do not; a mirror without a token takes no writes at all.
func TestMirrorSourcesAuth(t *testing.T) {
	_, srv := newSourcesMirror(t, testToken)
	_, closed := newSourcesMirror(t, "")
	for _, tc := range []struct {
		name, base, method, path, auth string
		status                         int
	}{
		{"post with the token", srv.URL, "POST", SourcesPath, "Bearer " + testToken, 200},
		{"post, scheme in lower case", srv.URL, "POST", SourcesPath, "bearer " + testToken, 200},
		{"post without a token", srv.URL, "POST", SourcesPath, "", 401},
		{"post with a wrong token", srv.URL, "POST", SourcesPath, "Bearer " + strings.Repeat("f", 64), 401},
		{"post with a prefix of the token", srv.URL, "POST", SourcesPath, "Bearer " + testToken[:32], 401},
		{"post with basic auth", srv.URL, "POST", SourcesPath, "Basic " + testToken, 401},
		{"post with the bare token", srv.URL, "POST", SourcesPath, testToken, 401},
		{"delete without a token", srv.URL, "DELETE", SourcesPath + "/x", "", 401},
		{"delete unknown with the token", srv.URL, "DELETE", SourcesPath + "/x", "Bearer " + testToken, 404},
		{"get sources", srv.URL, "GET", SourcesPath, "", 405},
		{"downloads stay open", srv.URL, "GET", DownloadsPath, "", 200},
		{"locate stays open", srv.URL, "GET", "/coop/v1/locate?digest=" + digest.FromString("x").String(), "", 200},
		{"no token configured, post", closed.URL, "POST", SourcesPath, "Bearer " + testToken, 401},
		{"no token configured, empty bearer", closed.URL, "POST", SourcesPath, "Bearer ", 401},
		{"no token configured, delete", closed.URL, "DELETE", SourcesPath + "/x", "Bearer ", 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var body io.Reader
			if tc.method == "POST" {
				body = strings.NewReader(sourceBody(1))
			}
			req, _ := http.NewRequest(tc.method, tc.base+tc.path, body)
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
			}
			if tc.status == 401 {
				var er peers.ErrorResponse
				if err := json.Unmarshal(b, &er); err != nil || len(er.Errors) != 1 || er.Errors[0].Code != peers.CodeUnauthorized {
					t.Fatalf("401 body %s: want one %s error", b, peers.CodeUnauthorized)
				}
				if resp.Header.Get("WWW-Authenticate") == "" {
					t.Fatal("401 without WWW-Authenticate")
				}
			}
		})
	}
}

// TestMirrorSourcesLimits: one request adds at most MaxSourceBlobs blobs
// for at most MaxSourceTTL; the mirror holds at most MaxSources sources.
func TestMirrorSourcesLimits(t *testing.T) {
	m, srv := newSourcesMirror(t, testToken)
	c := &Client{URL: srv.URL, HTTP: srv.Client(), Token: testToken}
	ctx := context.Background()
	blobs := func(n int) map[digest.Digest]int64 {
		out := map[digest.Digest]int64{}
		for i := range n {
			out[digest.FromString(strconv.Itoa(i))] = 1
		}
		return out
	}
	for _, tc := range []struct {
		name string
		req  SourceRequest
		ok   bool
	}{
		{"most blobs", SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: blobs(MaxSourceBlobs)}, true},
		{"one blob too many", SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: blobs(MaxSourceBlobs + 1)}, false},
		{"longest TTL", SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: blobs(1), TTLSeconds: MaxSourceTTL.Seconds()}, true},
		{"TTL too long", SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: blobs(1), TTLSeconds: MaxSourceTTL.Seconds() + 1}, false},
		{"node name too long", SourceRequest{Node: strings.Repeat("n", 254), URL: "http://127.0.0.1:1", Blobs: blobs(1)}, false},
		{"URL with a path", SourceRequest{Node: "s", URL: "http://127.0.0.1:1/x#", Blobs: blobs(1)}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := c.AddSource(ctx, tc.req)
			if tc.ok {
				if err != nil {
					t.Fatal(err)
				}
				if err := c.DropSource(ctx, id); err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err %v, want invalid argument", err)
			}
		})
	}
	t.Run("most sources", func(t *testing.T) {
		var ids []string
		for range MaxSources {
			id, err := c.AddSource(ctx, SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: blobs(1)})
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, id)
		}
		_, err := c.AddSource(ctx, SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: blobs(1)})
		if !errdefs.IsResourceExhausted(err) || !strings.Contains(err.Error(), "429") {
			t.Fatalf("source %d: err %v, want 429 resource exhausted", MaxSources+1, err)
		}
		if err := c.DropSource(ctx, ids[0]); err != nil {
			t.Fatal(err)
		}
		if _, err := c.AddSource(ctx, SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: blobs(1)}); err != nil {
			t.Fatalf("after a delete: %v", err)
		}
		m.srcMu.Lock()
		n := len(m.srcs)
		m.srcMu.Unlock()
		if n != MaxSources {
			t.Fatalf("%d sources held, want %d", n, MaxSources)
		}
	})
}

// TestClientToken: the Client's Token reaches the mirror; without it, or
// with another, AddSource fails as unauthenticated and adds nothing.
func TestClientToken(t *testing.T) {
	m, srv := newSourcesMirror(t, testToken)
	ctx := context.Background()
	req := SourceRequest{Node: "s", URL: "http://127.0.0.1:1", Blobs: map[digest.Digest]int64{digest.FromString("x"): 1}}
	for _, tc := range []struct {
		name, token string
		ok          bool
	}{
		{"right token", testToken, true},
		{"no token", "", false},
		{"another token", strings.Repeat("a", 64), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &Client{URL: srv.URL, HTTP: srv.Client(), Token: tc.token}
			id, err := c.AddSource(ctx, req)
			if tc.ok {
				if err != nil {
					t.Fatal(err)
				}
				if err := c.DropSource(ctx, id); err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsUnauthorized(err) || !strings.Contains(err.Error(), "mirror token") {
				t.Fatalf("err %v, want unauthenticated naming the mirror token", err)
			}
			got, _ := m.resolver.Locate(ctx, []digest.Digest{digest.FromString("x")})
			if len(got) != 0 {
				t.Fatalf("refused source is a candidate: %v", got)
			}
		})
	}
}

// TestNewAPIToken: the token option reaches the mirror, and a short one is
// refused.
func TestNewAPIToken(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store, err := content.NewStore(ctx, t.TempDir(), content.NewInventory())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, token string
		ok          bool
	}{
		{"none", "", true},
		{"long enough", testToken, true},
		{"too short", "secret", false},
		{"with a space", strings.Repeat("a", 20) + " " + strings.Repeat("b", 20), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := New(Options{Resolver: staticResolver{}, Peers: &peers.Client{HTTP: &http.Client{}, Node: "t"}, Store: store, APIToken: tc.token})
			if !tc.ok {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("err %v, want invalid argument", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if m.apiToken != tc.token {
				t.Fatalf("token %q, want %q", m.apiToken, tc.token)
			}
		})
	}
}

func TestLoadOrCreateToken(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "mirror.token")
	tok, err := LoadOrCreateToken(path)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := hex.DecodeString(tok); err != nil || len(b) != 32 {
		t.Fatalf("token %q: want 32 bytes in hex", tok)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode())
	}
	again, err := LoadOrCreateToken(path)
	if err != nil || again != tok {
		t.Fatalf("second load: %q %v, want the same token", again, err)
	}
	if read, err := ReadToken(path); err != nil || read != tok {
		t.Fatalf("ReadToken: %q %v", read, err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".mirror-token-*")); len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}

	write := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		path  string
		class func(error) bool
	}{
		{"missing", filepath.Join(dir, "none"), errdefs.IsNotFound},
		{"readable by others", write("world", testToken, 0o644), errdefs.IsPermissionDenied},
		{"writable by the group", write("group", testToken, 0o620), errdefs.IsPermissionDenied},
		{"symbolic link", link, errdefs.IsPermissionDenied},
		{"directory", dir, errdefs.IsPermissionDenied},
		{"short", write("short", "secret\n", 0o600), errdefs.IsInvalidArgument},
		{"empty", write("empty", "", 0o600), errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadToken(tc.path)
			if !tc.class(err) {
				t.Fatalf("ReadToken: err %v", err)
			}
			if tc.name == "missing" {
				return
			}
			// LoadOrCreateToken never replaces a file it refuses.
			if _, err := LoadOrCreateToken(tc.path); !tc.class(err) {
				t.Fatalf("LoadOrCreateToken: err %v", err)
			}
		})
	}
	t.Run("another owner", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to give a file away")
		}
		p := write("theirs", testToken, 0o600)
		if err := os.Chown(p, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadToken(p); !errdefs.IsPermissionDenied(err) {
			t.Fatalf("err %v, want permission denied", err)
		}
	})
}

// TestMirrorBlobSizes: the size the manifest gives wins over the peers'
// vote; a blob above the maximum size or beyond the unverified budget is
// left to the registry, and no peer is asked for its bytes.
func TestMirrorBlobSizes(t *testing.T) {
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	d := digest.FromBytes(data)
	size := int64(len(data))
	for _, tc := range []struct {
		name      string
		liars     int   // peers reporting size+1 (and serving zeros)
		manifest  int64 // the size a manifest gave; 0: none committed
		maxBlob   int64
		budget    int64
		status    int
		wantAsked bool // the honest peer was asked for bytes
		refused   float64
		claim     int64 // the size Claimable gives; 0: not claimable
	}{
		{name: "liars win the vote without a manifest", liars: 2, status: 404, claim: size + 1},
		{name: "the manifest outvotes the liars", liars: 2, manifest: size, status: 200, wantAsked: true, refused: 2, claim: size},
		{name: "the manifest refuses every peer", manifest: size - 1, status: 404, refused: 1},
		{name: "above the maximum blob size", maxBlob: size - 1, status: 404},
		{name: "beyond the budget", budget: size - 1, status: 404, claim: size}, // the claim store has its own budget
		{name: "within every bound", maxBlob: size, budget: size, status: 200, wantAsked: true, claim: size},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var asked atomic.Int64
			honest := blobPeer(t, data, "good")
			counting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				asked.Add(1)
				honest.Config.Handler.ServeHTTP(w, r)
			}))
			defer counting.Close()
			cs := []peers.Candidate{{Node: "honest", URL: counting.URL, Size: size}}
			for i := range tc.liars {
				cs = append(cs, peers.Candidate{Node: "liar" + strconv.Itoa(i), URL: blobPeer(t, make([]byte, size+1), "good").URL, Size: size + 1})
			}
			ctx := context.Background()
			store, err := content.NewStore(ctx, t.TempDir(), content.NewInventory())
			if err != nil {
				t.Fatal(err)
			}
			sizes := content.NewExpectedSizes(0)
			if tc.manifest != 0 {
				m, _ := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
					Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromString("cfg"), Size: 2},
					Layers: []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: d, Size: tc.manifest}}})
				if sizes.Learn("", m) != 2 {
					t.Fatal("the test manifest taught nothing")
				}
			}
			var budget *content.Budget
			if tc.budget != 0 {
				if budget, err = content.NewBudget(content.BudgetOptions{Max: tc.budget}); err != nil {
					t.Fatal(err)
				}
			}
			reg := prometheus.NewRegistry()
			m, err := New(Options{Resolver: staticResolver{d: cs}, Peers: &peers.Client{HTTP: &http.Client{}, Node: "test"}, Store: store,
				StallTimeout: 200 * time.Millisecond, HeaderDelay: time.Minute, Sizes: sizes, MaxBlobSize: tc.maxBlob, Budget: budget, Registerer: reg})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			srv := httptest.NewServer(m)
			defer srv.Close()
			resp, err := http.Get(srv.URL + "/v2/library/x/blobs/" + d.String() + "?ns=registry.example")
			if err != nil {
				t.Fatal(err)
			}
			got, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, got)
			}
			if tc.status == 200 && !bytes.Equal(got, data) {
				t.Fatal("served bytes differ")
			}
			if (asked.Load() > 0) != tc.wantAsked {
				t.Fatalf("the honest peer was asked %d times; want asked=%v", asked.Load(), tc.wantAsked)
			}
			if got := testutil.ToFloat64(m.sizeRefused); got != tc.refused {
				t.Fatalf("coop_mirror_size_refused_total = %v, want %v", got, tc.refused)
			}
			// A claim follows the same size rules as a fetch.
			m.failed = map[digest.Digest]time.Time{}
			if sz, ok := m.Claimable(d); ok != (tc.claim != 0) || sz != tc.claim {
				t.Fatalf("Claimable = %d, %v; want %d", sz, ok, tc.claim)
			}
			if budget.Used() != 0 {
				t.Fatalf("budget holds %d bytes after the request", budget.Used())
			}
		})
	}
}

// recordingResolver records the digests each Locate asks for.
type recordingResolver struct {
	staticResolver
	mu    sync.Mutex
	asked [][]digest.Digest
}

func (r *recordingResolver) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	r.mu.Lock()
	r.asked = append(r.asked, dgsts)
	r.mu.Unlock()
	return r.staticResolver.Locate(ctx, dgsts)
}

// TestMirrorLocatesChildren: with LocateChildren, a manifest served from
// peers has its children located in one request before it is answered (a
// claim of them, decided next without a round trip, then knows its peers);
// without it, or for a HEAD, only the manifest is located.
func TestMirrorLocatesChildren(t *testing.T) {
	cfg, l1, l2 := digest.FromString("config"), digest.FromString("layer1"), digest.FromString("layer2")
	data := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":6},
"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":%q,"size":6},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":%q,"size":6}]}`, cfg, l1, l2))
	d := digest.FromBytes(data)
	peer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		_, _ = w.Write(data)
	}))
	defer peer.Close()
	for _, tc := range []struct {
		name   string
		locate bool
		method string
		want   int // Locate calls
	}{
		{"on, GET", true, "GET", 2},
		{"on, HEAD", true, "HEAD", 1},
		{"off", false, "GET", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := &recordingResolver{staticResolver: staticResolver{d: {{Node: "p", URL: peer.URL, Size: int64(len(data))}}}}
			store, err := content.NewStore(context.Background(), t.TempDir(), content.NewInventory())
			if err != nil {
				t.Fatal(err)
			}
			m, err := New(Options{Resolver: res, Peers: &peers.Client{HTTP: &http.Client{}, Node: "test"}, Store: store, LocateChildren: tc.locate})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			srv := httptest.NewServer(m)
			defer srv.Close()
			req, _ := http.NewRequest(tc.method, srv.URL+"/v2/x/manifests/"+d.String(), nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			res.mu.Lock()
			defer res.mu.Unlock()
			if len(res.asked) != tc.want {
				t.Fatalf("Locate called %d times (%v), want %d", len(res.asked), res.asked, tc.want)
			}
			if tc.want == 2 && !slices.Equal(res.asked[1], []digest.Digest{cfg, l1, l2}) {
				t.Errorf("children located: %v", res.asked[1])
			}
		})
	}
}

// newSwarmMirror is a mirror whose downloads are swarm members, answering
// containerd once a blob is verified.
func newSwarmMirror(t *testing.T, res resolver.Resolver) *Mirror {
	t.Helper()
	ps, err := peers.NewPartials(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	store, err := content.NewStore(context.Background(), t.TempDir(), content.NewInventory())
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Options{Resolver: res, Peers: &peers.Client{HTTP: &http.Client{}, Node: "test"}, Store: store, Partials: ps,
		StallTimeout: time.Second, HeaderDelay: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m
}

// partialLiar says it is downloading every blob asked, has every chunk,
// and serves random bytes.
func partialLiar(t *testing.T, sizes map[digest.Digest]int64) (*httptest.Server, *liarGets) {
	t.Helper()
	gets := &liarGets{by: map[digest.Digest]int{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d, ok := strings.CutPrefix(r.URL.Path, peers.PartialPath+"/"); ok {
			size := sizes[digest.Digest(d)]
			n := peers.Chunks(size, peers.SwarmChunk)
			have := bytes.Repeat([]byte{0xff}, (n+7)/8)
			_ = json.NewEncoder(w).Encode(peers.PartialStatus{Node: "liar", Digest: digest.Digest(d), Size: size, ChunkSize: peers.SwarmChunk, Have: have})
			return
		}
		gets.add(digest.Digest(r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]))
		a, b, _ := strings.Cut(strings.TrimPrefix(r.Header.Get("Range"), "bytes="), "-")
		off, _ := strconv.ParseInt(a, 10, 64)
		last, _ := strconv.ParseInt(b, 10, 64)
		size := int64(0)
		for _, s := range sizes {
			size = s
		}
		body := make([]byte, last-off+1)
		_, _ = rand.Read(body)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, last, size))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	return srv, gets
}

// delayed answers as srv does, 100 ms late.
func delayed(t *testing.T, srv *httptest.Server) *httptest.Server {
	t.Helper()
	d := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
		srv.Config.Handler.ServeHTTP(w, r)
	}))
	t.Cleanup(d.Close)
	return d
}

// liarGets counts a liar's blob GETs by digest.
type liarGets struct {
	mu sync.Mutex
	by map[digest.Digest]int
}

func (g *liarGets) add(d digest.Digest) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.by[d]++
}

func (g *liarGets) of(d digest.Digest) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.by[d]
}

// TestMirrorDistrustsPartialLiar: a peer that says it is downloading a
// blob and serves corrupt chunks costs the blob one swarm download; the
// blob then comes whole from an honest holder, and the liar is not a
// candidate of the next blob.
func TestMirrorDistrustsPartialLiar(t *testing.T) {
	blob := func() ([]byte, digest.Digest) {
		b := make([]byte, 3<<20+5)
		_, _ = rand.Read(b)
		return b, digest.FromBytes(b)
	}
	b1, d1 := blob()
	b2, d2 := blob()
	size := int64(len(b1))
	liar, gets := partialLiar(t, map[digest.Digest]int64{d1: size, d2: size})
	// The honest holder answers late: the liar's chunks win the swarm.
	good1, good2 := delayed(t, blobPeer(t, b1, "good")), delayed(t, blobPeer(t, b2, "good"))
	res := staticResolver{
		d1: {{Node: "good", URL: good1.URL, Size: size}, {Node: "liar", URL: liar.URL, Size: size, Partial: true}},
		d2: {{Node: "good", URL: good2.URL, Size: size}, {Node: "liar", URL: liar.URL, Size: size, Partial: true}},
	}
	m := newSwarmMirror(t, res)
	srv := httptest.NewServer(m)
	defer srv.Close()
	get := func(d digest.Digest, want []byte) {
		t.Helper()
		resp, err := http.Get(srv.URL + "/v2/x/blobs/" + d.String())
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || !bytes.Equal(got, want) {
			t.Fatalf("blob %s: status %d, %d bytes (right: %v)", d, resp.StatusCode, len(got), bytes.Equal(got, want))
		}
	}
	get(d1, b1)
	if gets.of(d1) == 0 {
		t.Fatal("the liar was never asked: the test proves nothing")
	}
	get(d2, b2)
	if n := gets.of(d2); n != 0 {
		t.Errorf("the liar served %d chunks of the next blob after its chunks failed one", n)
	}
}

// verifyingWriter is a claim's writer as the claim store gives it: it can
// say whether what it got verifies.
type verifyingWriter struct {
	want digest.Digest
	d    digest.Digester
}

func (w *verifyingWriter) Write(p []byte) (int, error) { return w.d.Hash().Write(p) }
func (w *verifyingWriter) Verify() error {
	if w.d.Digest() != w.want {
		return fmt.Errorf("does not verify: %w", errdefs.ErrDataLoss)
	}
	return nil
}

// TestClaimDistrustsPartialLiar: a claim whose swarm download took chunks
// from a lying partial peer fails, and the liar is not a candidate after.
func TestClaimDistrustsPartialLiar(t *testing.T) {
	b1 := make([]byte, 2<<20+3)
	_, _ = rand.Read(b1)
	d1 := digest.FromBytes(b1)
	size := int64(len(b1))
	liar, gets := partialLiar(t, map[digest.Digest]int64{d1: size})
	good := delayed(t, blobPeer(t, b1, "good"))
	res := staticResolver{d1: {{Node: "good", URL: good.URL, Size: size}, {Node: "liar", URL: liar.URL, Size: size, Partial: true}}}
	m := newSwarmMirror(t, res)
	w := &verifyingWriter{want: d1, d: digest.Canonical.Digester()}
	if err := m.FetchClaim(context.Background(), d1, size, w); !errdefs.IsDataLoss(err) {
		t.Fatalf("claim from a liar: %v, want data loss", err)
	}
	if gets.of(d1) == 0 {
		t.Fatal("the liar was never asked: the test proves nothing")
	}
	for _, c := range m.candidates(context.Background(), d1) {
		if c.Node == "liar" {
			t.Fatal("the liar is still a candidate")
		}
	}
}
