package upstream

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// testRegistry is a registry with the token flow: anonymous tokens for
// public/*, tokens for private/* only with user:secret.
type testRegistry struct {
	srv      *httptest.Server
	blob     []byte
	dgst     digest.Digest
	manifest digest.Digest
	requests atomic.Int64
	ranges   atomic.Int64
}

func newTestRegistry(t *testing.T) *testRegistry {
	r := &testRegistry{blob: make([]byte, 3<<20)}
	if _, err := rand.Read(r.blob); err != nil {
		t.Fatal(err)
	}
	r.dgst = digest.FromBytes(r.blob)
	r.manifest = digest.FromString("manifest")
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *testRegistry) host() string { return strings.TrimPrefix(r.srv.URL, "http://") }

func (r *testRegistry) serve(w http.ResponseWriter, req *http.Request) {
	r.requests.Add(1)
	if req.URL.Path == "/token" {
		scope := req.URL.Query().Get("scope")
		if strings.Contains(scope, "private/") {
			user, pass, ok := req.BasicAuth()
			if !ok || user != "user" || pass != "secret" {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
		}
		if req.Method == http.MethodPost { // containerd's OAuth flow, with credentials
			_ = req.ParseForm()
			scope = req.PostForm.Get("scope")
			if strings.Contains(scope, "private/") && (req.PostForm.Get("username") != "user" || req.PostForm.Get("password") != "secret") {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
		}
		fmt.Fprintf(w, `{"token": %q, "access_token": %q}`, "tok "+scope, "tok "+scope)
		return
	}
	auth := req.Header.Get("Authorization")
	if !strings.HasPrefix(auth, "Bearer tok repository:") {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm=%q,service="test"`, r.srv.URL+"/token"))
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	switch {
	case strings.Contains(req.URL.Path, "/manifests/"):
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", r.manifest.String())
		w.Header().Set("Content-Length", "8")
		if req.Method == http.MethodGet {
			_, _ = io.WriteString(w, "manifest")
		}
	case strings.HasSuffix(req.URL.Path, "/blobs/"+r.dgst.String()):
		if req.Header.Get("Range") != "" {
			r.ranges.Add(1)
		}
		http.ServeContent(w, req, "", time.Time{}, bytes.NewReader(r.blob))
	default:
		w.WriteHeader(http.StatusNotFound)
	}
}

type parents map[digest.Digest]digest.Digest

func (p parents) Parent(d digest.Digest) (digest.Digest, bool) {
	x, ok := p[d]
	return x, ok
}

func newRegistries(t *testing.T, o Options) (*Registries, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	o.Registerer = reg
	r, err := New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, reg
}

// waitChecked waits until r has checked n repositories.
func waitChecked(t *testing.T, r *Registries, n float64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		var sum float64
		for _, res := range []string{resultOK, resultDenied, resultError} {
			sum += testutil.ToFloat64(r.checks.WithLabelValues(res))
		}
		if sum >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%g checks after 10s; want %g", sum, n)
		}
	}
}

func TestFetchThroughTokenFlow(t *testing.T) {
	tr := newTestRegistry(t)
	var got atomic.Int64
	r, _ := newRegistries(t, Options{Parents: parents{tr.dgst: tr.manifest}, OnBytes: func(n int) { got.Add(int64(n)) }})
	if got := r.Reach(tr.dgst); got != Unknown {
		t.Fatalf("reach before any pull named its registry: %v", got)
	}
	if _, err := r.Fetch(context.Background(), tr.dgst, int64(len(tr.blob)), 0); !errdefs.IsNotFound(err) {
		t.Fatalf("fetch of a blob no pull named: %v; want not found", err)
	}
	r.Seen(context.Background(), tr.host(), "public/app", "latest")
	r.Seen(context.Background(), tr.host(), "public/app", tr.manifest.String())
	if got := r.Reach(tr.dgst); got != Checking && got != Usable {
		t.Fatalf("reach while the first check runs: %v", got)
	}
	waitChecked(t, r, 1)
	if got := r.Reach(tr.dgst); got != Usable {
		t.Fatalf("a layer of a manifest pulled from a public repository: %v", got)
	}
	for _, off := range []int64{0, 1 << 20, int64(len(tr.blob))} {
		rc, err := r.Fetch(context.Background(), tr.dgst, int64(len(tr.blob)), off)
		if err != nil {
			t.Fatalf("fetch from %d: %v", off, err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(b, tr.blob[off:]) {
			t.Fatalf("fetch from %d: %d bytes, %v", off, len(b), err)
		}
	}
	if tr.ranges.Load() == 0 {
		t.Fatal("a fetch from an offset sent no Range")
	}
	if got.Load() != int64(len(tr.blob))*2-1<<20 {
		t.Fatalf("OnBytes told %d bytes; want %d", got.Load(), int64(len(tr.blob))*2-1<<20)
	}
	if _, err := r.Fetch(context.Background(), tr.dgst, 10, 11); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("offset past the size: %v", err)
	}
}

func TestPrivateRepository(t *testing.T) {
	tr := newTestRegistry(t)
	for _, tc := range []struct {
		name  string
		creds func(string) (string, string, error)
		want  bool
	}{
		{"anonymous", nil, false},
		{"wrong credentials", func(string) (string, string, error) { return "user", "nope", nil }, false},
		{"credentials", func(h string) (string, string, error) {
			if h != tr.host() {
				return "", "", nil
			}
			return "user", "secret", nil
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := newRegistries(t, Options{Parents: parents{tr.dgst: tr.manifest}, Credentials: tc.creds})
			r.Seen(context.Background(), tr.host(), "private/app", tr.manifest.String())
			waitChecked(t, r, 1)
			want := Denied
			if tc.want {
				want = Usable
			}
			if got := r.Reach(tr.dgst); got != want {
				t.Fatalf("reach = %v; want %v", got, want)
			}
			res := resultOK
			if !tc.want {
				res = resultDenied
			}
			if v := testutil.ToFloat64(r.checks.WithLabelValues(res)); v != 1 {
				t.Fatalf("checks %s = %g; want 1", res, v)
			}
		})
	}
}

func TestMirrorSkipped(t *testing.T) {
	tr := newTestRegistry(t)
	var mirrorHits atomic.Int64
	mirror := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		mirrorHits.Add(1)
		w.WriteHeader(http.StatusNotFound)
	}))
	t.Cleanup(mirror.Close)
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "registry.test"), 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\"]\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", tr.srv.URL, mirror.URL, tr.srv.URL)
	if err := os.WriteFile(filepath.Join(dir, "registry.test", "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	r, _ := newRegistries(t, Options{HostsDir: dir, Skip: []string{strings.TrimPrefix(mirror.URL, "http://")}, Parents: parents{}})
	r.Seen(context.Background(), "registry.test", "public/app", tr.dgst.String())
	waitChecked(t, r, 1)
	rc, err := r.Fetch(context.Background(), tr.dgst, int64(len(tr.blob)), 0)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(b, tr.blob) {
		t.Fatalf("fetch through hosts.toml: %d bytes, %v", len(b), err)
	}
	if mirrorHits.Load() != 0 {
		t.Fatalf("coop's own mirror was asked %d times", mirrorHits.Load())
	}
}

func TestRegistryDown(t *testing.T) {
	tr := newTestRegistry(t)
	host := tr.host()
	tr.srv.Close()
	r, _ := newRegistries(t, Options{Parents: parents{tr.dgst: tr.manifest}})
	r.Seen(context.Background(), host, "public/app", tr.manifest.String())
	waitChecked(t, r, 1)
	if got := r.Reach(tr.dgst); got != Down {
		t.Fatalf("reach of a registry that does not answer: %v; want down", got)
	}
}

func TestSeenBounds(t *testing.T) {
	tr := newTestRegistry(t)
	r, _ := newRegistries(t, Options{Parents: parents{}, MaxOrigins: 2, MaxRepos: 1})
	ctx := context.Background()
	for _, bad := range []struct{ host, repo string }{
		{"", "a"}, {tr.host(), ""}, {tr.host(), "UPPER"}, {"a/b", "c"}, {tr.host(), "a//b"},
		{tr.host(), strings.Repeat("a", 300)}, {"user@host", "a"},
	} {
		r.Seen(ctx, bad.host, bad.repo, digest.FromString(bad.repo).String())
		if _, ok := r.Origin(digest.FromString(bad.repo)); ok {
			t.Fatalf("origin remembered for host %q repo %q", bad.host, bad.repo)
		}
	}
	ds := []digest.Digest{digest.FromString("1"), digest.FromString("2"), digest.FromString("3")}
	for _, d := range ds {
		r.Seen(ctx, tr.host(), "public/app", d.String())
	}
	if _, ok := r.Origin(ds[0]); ok {
		t.Fatal("the oldest origin is kept beyond MaxOrigins")
	}
	if o, ok := r.Origin(ds[2]); !ok || o != (Origin{Host: tr.host(), Repo: "public/app"}) {
		t.Fatalf("origin = %v, %v", o, ok)
	}
	waitChecked(t, r, 1)
	r.Seen(ctx, tr.host(), "public/other", "latest")
	r.mu.Lock()
	n := len(r.repos)
	r.mu.Unlock()
	if n > 1 {
		t.Fatalf("%d repositories kept; MaxRepos is 1", n)
	}
}

func TestParseCredentials(t *testing.T) {
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	for _, tc := range []struct {
		name, json, host, user, secret string
		bad                            bool
	}{
		{name: "auth", json: `{"auths":{"r.example:5000":{"auth":"` + b64("u:p:w") + `"}}}`, host: "r.example:5000", user: "u", secret: "p:w"},
		{name: "username", json: `{"auths":{"https://r.example/v2/":{"username":"u","password":"p"}}}`, host: "r.example", user: "u", secret: "p"},
		{name: "docker hub", json: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + b64("u:p") + `"}}}`, host: "registry-1.docker.io", user: "u", secret: "p"},
		{name: "identity token", json: `{"auths":{"r.example":{"identitytoken":"tok"}}}`, host: "r.example", secret: "tok"},
		{name: "not JSON", json: `auths`, bad: true},
		{name: "not base64", json: `{"auths":{"r":{"auth":"%%%"}}}`, bad: true},
		{name: "no colon", json: `{"auths":{"r":{"auth":"` + b64("up") + `"}}}`, bad: true},
		{name: "empty", json: `{"auths":{"r":{}}}`, bad: true},
		{name: "no host", json: `{"auths":{"https://":{"auth":"` + b64("u:p") + `"}}}`, bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseCredentials([]byte(tc.json))
			if tc.bad {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("err = %v; want invalid argument", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c := got[tc.host]; c.user != tc.user || c.secret != tc.secret {
				t.Fatalf("%s: %q %q; want %q %q", tc.host, c.user, c.secret, tc.user, tc.secret)
			}
		})
	}
}

func TestLoadCredentials(t *testing.T) {
	p := filepath.Join(t.TempDir(), "config.json")
	body := `{"auths":{"r.example":{"username":"u","password":"p"}}}`
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCredentials(p); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("a file others can read: %v; want failed precondition", err)
	}
	if err := os.Chmod(p, 0o600); err != nil {
		t.Fatal(err)
	}
	creds, err := LoadCredentials(p)
	if err != nil {
		t.Fatal(err)
	}
	if u, s, err := creds("r.example"); u != "u" || s != "p" || err != nil {
		t.Fatalf("r.example: %q %q %v", u, s, err)
	}
	if u, s, _ := creds("other"); u != "" || s != "" {
		t.Fatal("credentials for a host not listed")
	}
	if err := os.WriteFile(p, bytes.Repeat([]byte(" "), maxCredentialsFile+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCredentials(p); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("an oversized file: %v", err)
	}
}

func FuzzParseCredentials(f *testing.F) {
	f.Add([]byte(`{"auths":{"r.example:5000":{"auth":"dTpw"}}}`))
	f.Add([]byte(`{"auths":{"https://index.docker.io/v1/":{"username":"u","password":"p"}}}`))
	f.Add([]byte(`{"auths":{"r":{"identitytoken":"t"}}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		creds, err := ParseCredentials(b)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("error of another class: %v", err)
			}
			return
		}
		for host, c := range creds {
			if host == "" || strings.ContainsAny(host, "/") {
				t.Fatalf("host %q", host)
			}
			if c.user == "" && c.secret == "" {
				t.Fatalf("empty credentials for %q", host)
			}
		}
	})
}

// FuzzParseOrigin: what the mirror passes from a manifest request (?ns= and
// the repository): an origin is accepted only as a reference name whose
// domain and path are exactly host and repo, at most 255 bytes.
func FuzzParseOrigin(f *testing.F) {
	f.Add("docker.io", "library/busybox")
	f.Add("127.0.0.1:5000", "coop/app")
	f.Add("registry.example", "UPPER")
	f.Add("user@host", "a")
	f.Add("[::1]:5000", "a/b")
	f.Fuzz(func(t *testing.T, host, repo string) {
		o, ok := parseOrigin(host, repo)
		if !ok {
			return
		}
		if o.Host != host || o.Repo != repo || len(o.Ref()) > 256 {
			t.Fatalf("parseOrigin(%q, %q) = %+v", host, repo, o)
		}
		named, err := reference.ParseNamed(o.Ref())
		if err != nil || reference.Domain(named) != host || reference.Path(named) != repo {
			t.Fatalf("origin %q is not the reference name host/repo: %v", o.Ref(), err)
		}
	})
}
