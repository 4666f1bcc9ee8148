package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log" //nolint:depguard // go-containerregistry's registry.Logger option takes a *log.Logger
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	digest "github.com/opencontainers/go-digest"
)

// RegistryOptions configure StartRegistry.
type RegistryOptions struct {
	// Logf, if set, receives one line per request.
	Logf func(format string, args ...any)
	// Addr is the address to listen on; default 127.0.0.1:0 (a free port).
	Addr string
	// Listen, when set, opens the listener instead of net.Listen (to serve
	// from another network namespace, say).
	Listen func(addr string) (net.Listener, error)
}

// RegistryCounts are the requests a Registry answered since its last
// ResetCounts.
type RegistryCounts struct {
	// Requests counts every request, of any kind.
	Requests int64
	// BlobGets counts GET /v2/<name>/blobs/<digest>.
	BlobGets int64
	// RangeGets counts the blob GETs that carried a Range header (containerd
	// resuming a broken body).
	RangeGets int64
	// ManifestGets counts GET and HEAD /v2/<name>/manifests/<ref>.
	ManifestGets int64
	// BlobBytes is the number of blob body bytes written to clients.
	BlobBytes int64
}

// Registry is an in-process OCI registry on loopback (go-containerregistry's
// pkg/registry over an in-memory blob store), with request counters. It can
// be stopped and started again on the same port, keeping its content, to
// simulate a registry outage.
//
// Blob GET and HEAD are answered here with http.ServeContent, so every Range
// form containerd sends (bytes=N- on resume) works; everything else goes to
// pkg/registry.
type Registry struct {
	logf    func(format string, args ...any)
	addr    string
	listen  func(addr string) (net.Listener, error)
	handler http.Handler
	blobs   *memBlobs

	requests, blobGets, rangeGets, manifestGets, blobBytes atomic.Int64

	mu  sync.Mutex
	srv *http.Server
}

// StartRegistry starts a registry listening on opts.Addr (127.0.0.1:0 by
// default).
func StartRegistry(ctx context.Context, opts RegistryOptions) (*Registry, error) {
	r := &Registry{
		logf:   opts.Logf,
		addr:   opts.Addr,
		listen: opts.Listen,
		blobs:  &memBlobs{m: map[digest.Digest][]byte{}},
	}
	if r.addr == "" {
		r.addr = "127.0.0.1:0"
	}
	logger := log.New(io.Discard, "", 0)
	if r.logf != nil {
		logger = log.New(logfWriter{logf: r.logf, prefix: "registry: "}, "", 0)
	}
	r.handler = ggcrregistry.New(ggcrregistry.Logger(logger), ggcrregistry.WithBlobHandler(r.blobs))
	if err := r.Start(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// Host is the registry's host:port, as used in image references.
func (r *Registry) Host() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addr
}

// URL is the registry's base URL, http://host:port.
func (r *Registry) URL() string {
	return "http://" + r.Host()
}

// Running reports whether the registry is serving.
func (r *Registry) Running() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.srv != nil
}

// Start serves again after Stop, on the same address. Starting a running
// registry is a no-op.
func (r *Registry) Start(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.srv != nil {
		return nil
	}
	var ln net.Listener
	var err error
	// The port was just released by Stop; retry briefly in case the kernel
	// has not let go of it yet.
	for attempt := 0; ; attempt++ {
		if r.listen != nil {
			ln, err = r.listen(r.addr)
		} else {
			var lc net.ListenConfig
			ln, err = lc.Listen(ctx, "tcp", r.addr)
		}
		if err == nil || attempt >= 50 || ctx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("registry: listen %s: %w", r.addr, err)
	}
	r.addr = ln.Addr().String()
	srv := &http.Server{
		Handler:           http.HandlerFunc(r.serveHTTP),
		ReadHeaderTimeout: 10 * time.Second,
	}
	r.srv = srv
	go func() { _ = srv.Serve(ln) }()
	return nil
}

// Stop closes the listener and every open connection: clients then get
// "connection refused" until Start. Content is kept.
func (r *Registry) Stop() error {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv == nil {
		return nil
	}
	err := srv.Close()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// Close stops the registry for good.
func (r *Registry) Close() error {
	return r.Stop()
}

// Counts returns the request counters.
func (r *Registry) Counts() RegistryCounts {
	return RegistryCounts{
		Requests:     r.requests.Load(),
		BlobGets:     r.blobGets.Load(),
		RangeGets:    r.rangeGets.Load(),
		ManifestGets: r.manifestGets.Load(),
		BlobBytes:    r.blobBytes.Load(),
	}
}

// ResetCounts sets the request counters to zero.
func (r *Registry) ResetCounts() {
	r.requests.Store(0)
	r.blobGets.Store(0)
	r.rangeGets.Store(0)
	r.manifestGets.Store(0)
	r.blobBytes.Store(0)
}

// HasBlob reports whether the registry holds dgst.
func (r *Registry) HasBlob(dgst digest.Digest) bool {
	_, ok := r.blobs.get(dgst)
	return ok
}

func (r *Registry) serveHTTP(w http.ResponseWriter, req *http.Request) {
	r.requests.Add(1)
	name, kind, ref := splitV2Path(req.URL.Path)
	switch {
	case kind == "blobs" && (req.Method == http.MethodGet || req.Method == http.MethodHead) && name != "":
		dgst, err := digest.Parse(ref)
		if err != nil {
			break // pkg/registry answers bad digests and upload paths.
		}
		if req.Method == http.MethodGet {
			r.blobGets.Add(1)
			if req.Header.Get("Range") != "" {
				r.rangeGets.Add(1)
			}
		}
		b, ok := r.blobs.get(dgst)
		if !ok {
			r.logRequest(req, http.StatusNotFound)
			writeOCIError(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown to registry")
			return
		}
		cw := &countingResponseWriter{ResponseWriter: w}
		w.Header().Set("Docker-Content-Digest", dgst.String())
		w.Header().Set("Content-Type", "application/octet-stream")
		http.ServeContent(cw, req, "", time.Time{}, bytes.NewReader(b))
		r.blobBytes.Add(cw.n)
		r.logRequest(req, cw.status())
		return
	case kind == "manifests" && (req.Method == http.MethodGet || req.Method == http.MethodHead):
		r.manifestGets.Add(1)
	}
	r.handler.ServeHTTP(w, req)
}

func (r *Registry) logRequest(req *http.Request, status int) {
	if r.logf != nil {
		r.logf("registry: %s %s %s -> %d", req.Method, req.URL.RequestURI(), req.Header.Get("Range"), status)
	}
}

// splitV2Path splits /v2/<name>/<kind>/<ref> into its parts; kind is "blobs"
// or "manifests" (or "" for other paths).
func splitV2Path(p string) (name, kind, ref string) {
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return "", "", ""
	}
	for _, k := range []string{"/blobs/", "/manifests/"} {
		if i := strings.LastIndex(rest, k); i > 0 {
			return rest[:i], strings.Trim(k, "/"), rest[i+len(k):]
		}
	}
	return "", "", ""
}

func writeOCIError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q}]}`, code, msg)
}

// putBlob stores b under its digest.
func (r *Registry) putBlob(b []byte) digest.Digest {
	dgst := digest.FromBytes(b)
	r.blobs.put(dgst, b)
	return dgst
}

type countingResponseWriter struct {
	http.ResponseWriter
	n    int64
	code int
}

func (c *countingResponseWriter) WriteHeader(code int) {
	if c.code == 0 {
		c.code = code
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingResponseWriter) Write(p []byte) (int, error) {
	if c.code == 0 {
		c.code = http.StatusOK
	}
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingResponseWriter) status() int {
	if c.code == 0 {
		return http.StatusOK
	}
	return c.code
}

// memBlobs is the registry's blob store: pkg/registry's BlobHandler (with the
// stat, put and delete extensions) over a map.
type memBlobs struct {
	mu sync.RWMutex
	m  map[digest.Digest][]byte
}

var (
	_ ggcrregistry.BlobHandler       = (*memBlobs)(nil)
	_ ggcrregistry.BlobStatHandler   = (*memBlobs)(nil)
	_ ggcrregistry.BlobPutHandler    = (*memBlobs)(nil)
	_ ggcrregistry.BlobDeleteHandler = (*memBlobs)(nil)
)

func (m *memBlobs) get(dgst digest.Digest) ([]byte, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	b, ok := m.m[dgst]
	return b, ok
}

func (m *memBlobs) put(dgst digest.Digest, b []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.m[dgst] = b
}

func (m *memBlobs) Stat(_ context.Context, _ string, h v1.Hash) (int64, error) {
	b, ok := m.get(digest.Digest(h.String()))
	if !ok {
		return 0, ggcrregistry.ErrNotFound
	}
	return int64(len(b)), nil
}

func (m *memBlobs) Get(_ context.Context, _ string, h v1.Hash) (io.ReadCloser, error) {
	b, ok := m.get(digest.Digest(h.String()))
	if !ok {
		return nil, ggcrregistry.ErrNotFound
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (m *memBlobs) Put(_ context.Context, _ string, h v1.Hash, rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return err
	}
	m.put(digest.Digest(h.String()), b)
	return nil
}

func (m *memBlobs) Delete(_ context.Context, _ string, h v1.Hash) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	dgst := digest.Digest(h.String())
	if _, ok := m.m[dgst]; !ok {
		return ggcrregistry.ErrNotFound
	}
	delete(m.m, dgst)
	return nil
}

// logfWriter turns writes (of a stdlib logger) into Logf lines.
type logfWriter struct {
	logf   func(format string, args ...any)
	prefix string
}

func (l logfWriter) Write(p []byte) (int, error) {
	l.logf("%s%s", l.prefix, strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
