package mirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// staticResolver returns fixed candidates.
type staticResolver map[digest.Digest][]peers.Candidate

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
		Store: store, Sources: resolver.NewSources(), HeaderDelay: time.Minute})
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
	for _, bad := range []string{`{`, `{"node":"s","url":"ftp://x","blobs":{"` + d.String() + `":1}}`, `{"node":"s","url":"http://127.0.0.1:1","blobs":{}}`} {
		resp, err := http.Post(srv.URL+SourcesPath, "application/json", strings.NewReader(bad))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("source %s: status %d, want 400", bad, resp.StatusCode)
		}
	}
	src := blobPeer(t, data, "good")
	body := `{"node":"src","url":"` + src.URL + `","blobs":{"` + d.String() + `":` + strconv.Itoa(len(data)) + `}}`
	resp, err := http.Post(srv.URL+SourcesPath, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
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
