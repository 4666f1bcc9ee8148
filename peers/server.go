package peers

import (
	"context"
	// Registered so that sha256 and sha512 digests are available to go-digest.
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// BlobStore is the content the peer server serves.
type BlobStore interface {
	// ReaderAt opens the blob desc.Digest. If the content is not present,
	// ErrNotFound is returned.
	ctdcontent.Provider
	// Info returns the blob's info. If the content is not present,
	// ErrNotFound is returned.
	Info(ctx context.Context, dgst digest.Digest) (ctdcontent.Info, error)
}

// ContainerRecords reads this node's containers from containerd.
type ContainerRecords interface {
	// Record returns the container's record; ErrNotFound if unknown.
	Record(ctx context.Context, namespace, id string) (*ContainerRecord, error)
	// Stop stops the container's task, if it runs.
	Stop(ctx context.Context, namespace, id string) error
}

// InventoryView is what the peer server reports of the node's inventory.
type InventoryView interface {
	// Snapshot returns the whole inventory.
	Snapshot() content.Snapshot
	// HaveAt returns the blobs among dgsts that are held, in the order
	// asked, with the inventory's epoch and seq when they were read.
	HaveAt(dgsts []digest.Digest) ([]content.Blob, string, uint64)
	// Since returns the changes after seq in epoch; ok is false when
	// they are not all remembered.
	Since(epoch string, seq uint64) (changes []content.Change, cur uint64, ok bool)
}

var (
	_ BlobStore     = (*content.Store)(nil)
	_ InventoryView = (*content.Inventory)(nil)
)

// ServerOptions configure a Server.
type ServerOptions struct {
	// Node is this node's name, reported by the coop API. Required.
	Node string
	// Store holds the blobs served. Required.
	Store BlobStore
	// Inventory answers the coop API. Required.
	Inventory InventoryView
	// Registerer, when set, gets the server's metrics.
	Registerer prometheus.Registerer
	// Gatherer, when set, is served at MetricsPath; without it MetricsPath
	// answers 404.
	Gatherer prometheus.Gatherer
	// Containers, when set, answers ContainersPath (coop migrate's
	// source side).
	Containers ContainerRecords
	// AllowStop lets a migration's destination stop a container here
	// (coop migrate --stop-source). Off by default.
	AllowStop bool
	// MaxUploads bounds the blob bodies sent at once; beyond it a blob GET
	// is answered 429 with Retry-After. 0: no bound.
	MaxUploads int
}

// Request kinds, the "kind" label of coop_peer_requests_total.
const (
	kindBlob      = "blob"
	kindManifest  = "manifest"
	kindInventory = "inventory"
	kindHave      = "have"
	kindOther     = "other"
)

const (
	// copyBufferSize is the buffer a blob is streamed through.
	copyBufferSize = 1 << 20
	// maxHaveBody bounds the body of a have request: MaxHaveDigests sha512
	// digests take about 1.4 MiB.
	maxHaveBody = 4 << 20
)

// ociNameRegexp is a repository name as the OCI distribution spec defines it.
// It is read-only after init.
var ociNameRegexp = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)

// Server is a node's peer endpoint: a read-only, pull-only OCI distribution
// API over the local store (blobs with Range, manifests by digest) and the
// coop API (inventory, have, health, metrics). It answers from the local store
// only: it never forwards a request anywhere.
type Server struct {
	node    string
	store   BlobStore
	inv     InventoryView
	metrics *serverMetrics
	promh   http.Handler // nil without a Gatherer
	bufs    sync.Pool    // *[]byte of copyBufferSize

	containers ContainerRecords
	allowStop  bool
	maxUploads int
	active     atomic.Int64 // blob bodies being sent
	sent       atomic.Int64 // blob bytes sent, for the upload rate
	rateMu     sync.Mutex
	rateAt     time.Time
	rateSent   int64
	rate       float64
}

var _ http.Handler = (*Server)(nil)

// ValidName reports whether name is a repository name as the OCI
// distribution spec defines it.
func ValidName(name string) bool {
	return ociNameRegexp.MatchString(name)
}

// NewServer returns a peer server. It fails with ErrInvalidArgument when a
// required option is missing, and when the metrics cannot be registered.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.Node == "" {
		return nil, fmt.Errorf("peer server needs a node name: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Store == nil {
		return nil, fmt.Errorf("peer server needs a store: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Inventory == nil {
		return nil, fmt.Errorf("peer server needs an inventory: %w", errdefs.ErrInvalidArgument)
	}
	m := newServerMetrics()
	if opts.Registerer != nil {
		if err := m.register(opts.Registerer); err != nil {
			return nil, fmt.Errorf("register peer server metrics: %w: %w", err, errdefs.ErrInvalidArgument)
		}
	}
	if opts.MaxUploads < 0 {
		return nil, fmt.Errorf("peer server max uploads %d: %w", opts.MaxUploads, errdefs.ErrInvalidArgument)
	}
	s := &Server{
		maxUploads: opts.MaxUploads,
		containers: opts.Containers,
		allowStop:  opts.AllowStop,
		rateAt:     time.Now(),
		node:       opts.Node,
		store:      opts.Store,
		inv:        opts.Inventory,
		metrics:    m,
		bufs: sync.Pool{New: func() any {
			b := make([]byte, copyBufferSize)
			return &b
		}},
	}
	if opts.Gatherer != nil {
		s.promh = promhttp.HandlerFor(opts.Gatherer, promhttp.HandlerOpts{})
	}
	return s, nil
}

// ServeHTTP answers one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	ctx := log.WithLogger(r.Context(), log.G(r.Context()).WithFields(log.Fields{
		"method": r.Method,
		"path":   r.URL.Path,
		"remote": r.RemoteAddr,
	}))
	r = r.WithContext(ctx)
	rw := &countingWriter{ResponseWriter: w}

	kind, err := s.dispatch(rw, r)
	if err != nil {
		if rw.status != 0 {
			// The answer has begun: the client sees a short body.
			log.G(ctx).WithError(err).Warn("peer response aborted")
		} else {
			WriteError(ctx, rw, err)
		}
	}
	status := rw.status
	if status == 0 {
		status = http.StatusOK
	}
	s.metrics.requests.WithLabelValues(kind, strconv.Itoa(status)).Inc()
	log.G(ctx).WithFields(log.Fields{
		"kind":     kind,
		"status":   status,
		"bytes":    rw.written,
		"duration": time.Since(start),
	}).Debug("peer request")
}

// dispatch routes r and returns its kind and the handler's error.
func (s *Server) dispatch(w http.ResponseWriter, r *http.Request) (string, error) {
	// Every valid path is plain ASCII with no escapes: an escaped path
	// (%2F, %2e%2e, ...) names nothing here.
	if r.URL.RawPath != "" {
		return kindOther, newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "path %q must not be escaped", r.URL.RawPath)
	}
	p := r.URL.Path
	switch p {
	case "/v2/":
		return kindOther, allow(w, r, s.serveBase, http.MethodGet, http.MethodHead)
	case InventoryPath:
		return kindInventory, allow(w, r, s.serveInventory, http.MethodGet, http.MethodHead)
	case HavePath:
		return kindHave, allow(w, r, s.serveHave, http.MethodPost)
	case LoadPath:
		return kindOther, allow(w, r, s.serveLoad, http.MethodGet, http.MethodHead)
	case HealthPath:
		return kindOther, allow(w, r, serveHealth, http.MethodGet, http.MethodHead)
	case MetricsPath:
		return kindOther, allow(w, r, s.serveMetrics, http.MethodGet, http.MethodHead)
	}
	if strings.HasPrefix(p, ContainersPath+"/") {
		return kindOther, s.serveContainer(w, r, strings.TrimPrefix(p, ContainersPath+"/"))
	}
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return kindOther, newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "no endpoint at %q", p)
	}
	// The distribution API is read-only: whatever the route, only reads.
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		kind := kindOther
		if k, _, _, ok := splitDistributionPath(rest); ok {
			kind = k
		}
		return kind, methodNotAllowed(w, r, http.MethodGet, http.MethodHead)
	}
	kind, name, ref, ok := splitDistributionPath(rest)
	if !ok {
		return kindOther, newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "no endpoint at %q", p)
	}
	if !ociNameRegexp.MatchString(name) {
		return kind, newError(http.StatusBadRequest, CodeNameInvalid, errdefs.ErrInvalidArgument, "invalid repository name %q", name)
	}
	if kind == kindBlob {
		return kind, s.serveBlob(w, r, ref)
	}
	return kind, s.serveManifest(w, r, ref)
}

// splitDistributionPath splits "<name>/blobs/<digest>" and
// "<name>/manifests/<reference>". ok is false for any other path.
func splitDistributionPath(rest string) (kind, name, ref string, ok bool) {
	i := strings.LastIndexByte(rest, '/')
	if i < 0 {
		return "", "", "", false
	}
	head, ref := rest[:i], rest[i+1:]
	name, seg := "", head
	if j := strings.LastIndexByte(head, '/'); j >= 0 {
		name, seg = head[:j], head[j+1:]
	}
	switch seg {
	case "blobs":
		return kindBlob, name, ref, true
	case "manifests":
		return kindManifest, name, ref, true
	}
	return "", "", "", false
}

// allow calls h when r's method is one of methods, and answers 405 otherwise.
func allow(w http.ResponseWriter, r *http.Request, h func(http.ResponseWriter, *http.Request) error, methods ...string) error {
	for _, m := range methods {
		if r.Method == m {
			return h(w, r)
		}
	}
	return methodNotAllowed(w, r, methods...)
}

func methodNotAllowed(w http.ResponseWriter, r *http.Request, methods ...string) error {
	w.Header().Set("Allow", strings.Join(methods, ", "))
	return newError(http.StatusMethodNotAllowed, CodeUnsupported, errdefs.ErrNotImplemented, "method %s is not supported here", r.Method)
}

// serveBase answers the API version check.
func (s *Server) serveBase(w http.ResponseWriter, _ *http.Request) error {
	h := w.Header()
	h.Set("Docker-Distribution-API-Version", "registry/2.0")
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", "2")
	w.WriteHeader(http.StatusOK)
	_, err := io.WriteString(w, "{}")
	return err
}

// parseDigest parses a digest from a path.
func parseDigest(ref string) (digest.Digest, error) {
	dgst, err := digest.Parse(ref)
	if err != nil {
		return "", newError(http.StatusBadRequest, CodeDigestInvalid, errdefs.ErrInvalidArgument, "digest %q: %v", ref, err)
	}
	return dgst, nil
}

// serveBlob answers HEAD and GET of a blob, with a single byte range.
//
// Range handling: one range of the forms "bytes=a-b", "bytes=a-" and
// "bytes=-n" is served as 206 (an end beyond the blob is cut to its end). A
// range that starts beyond the blob, a zero suffix, any range of an empty
// blob, and also - by choice, since a peer client never sends them - a
// malformed header and a multi-range header are answered 416 with
// "Content-Range: bytes */<size>" rather than with the whole blob, so a
// client bug is never mistaken for a full answer. Range is ignored on HEAD
// and when an If-Range header does not match the blob's ETag.
func (s *Server) serveBlob(w http.ResponseWriter, r *http.Request, ref string) error {
	ctx := r.Context()
	dgst, err := parseDigest(ref)
	if err != nil {
		return err
	}
	info, err := s.store.Info(ctx, dgst)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "blob %s", dgst)
		}
		return fmt.Errorf("blob %s info: %w", dgst, err)
	}
	size := info.Size
	etag := `"` + dgst.String() + `"`

	start, length, partial := int64(0), size, false
	if rh := r.Header.Get("Range"); rh != "" && r.Method == http.MethodGet {
		if ir := r.Header.Get("If-Range"); ir == "" || ir == etag {
			start, length, err = parseByteRange(rh, size)
			if err != nil {
				w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
				return err
			}
			partial = true
		}
	}

	var ra ctdcontent.ReaderAt
	if r.Method == http.MethodGet {
		if n := s.active.Add(1); s.maxUploads > 0 && n > int64(s.maxUploads) {
			s.active.Add(-1)
			s.metrics.busy.Inc()
			w.Header().Set("Retry-After", "1")
			return newError(http.StatusTooManyRequests, CodeTooManyRequests, errdefs.ErrUnavailable, "%d uploads running, at most %d", n-1, s.maxUploads)
		}
		defer s.active.Add(-1)
		ra, err = s.store.ReaderAt(ctx, ocispec.Descriptor{Digest: dgst, Size: size})
		if err != nil {
			if errdefs.IsNotFound(err) {
				return newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "blob %s", dgst)
			}
			return fmt.Errorf("open blob %s: %w", dgst, err)
		}
		defer ra.Close()
	}

	h := w.Header()
	h.Set("Docker-Content-Digest", dgst.String())
	h.Set("ETag", etag)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", strconv.FormatInt(length, 10))
	if partial {
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, start+length-1, size))
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.WriteHeader(http.StatusOK)
	}
	if ra == nil {
		return nil
	}

	s.metrics.activeUploads.Inc()
	defer s.metrics.activeUploads.Dec()
	buf := s.bufs.Get().(*[]byte)
	defer s.bufs.Put(buf)
	// Counted as it goes, so the metric shows a transfer in progress.
	n, err := io.CopyBuffer(&servedCounter{w: w, c: s.metrics.servedBytes, n: &s.sent}, io.NewSectionReader(ra, start, length), *buf)
	if err != nil {
		return fmt.Errorf("send blob %s after %d bytes: %w", dgst, n, err)
	}
	if n != length {
		return fmt.Errorf("blob %s ended after %d of %d bytes: %w", dgst, n, length, io.ErrUnexpectedEOF)
	}
	return nil
}

// serveContainer answers GET <namespace>/<id> with the container's record
// and POST <namespace>/<id>/stop by stopping its task (when allowed).
func (s *Server) serveContainer(w http.ResponseWriter, r *http.Request, rest string) error {
	if s.containers == nil {
		return newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "this node does not read containerd (--containerd-address)")
	}
	parts := strings.Split(rest, "/")
	stop := len(parts) == 3 && parts[2] == "stop"
	if (len(parts) != 2 && !stop) || parts[0] == "" || parts[1] == "" {
		return newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "want %s/NAMESPACE/ID", ContainersPath)
	}
	ns, id := parts[0], parts[1]
	if stop {
		if r.Method != http.MethodPost {
			return methodNotAllowed(w, r, http.MethodPost)
		}
		if !s.allowStop {
			return newError(http.StatusForbidden, CodeUnsupported, errdefs.ErrPermissionDenied, "stopping containers from peers is off here (--allow-remote-stop)")
		}
		// Finish the stop even if the asker goes away meanwhile.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), time.Minute)
		defer cancel()
		if err := s.containers.Stop(sctx, ns, id); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return methodNotAllowed(w, r, http.MethodGet, http.MethodHead)
	}
	rec, err := s.containers.Record(r.Context(), ns, id)
	if err != nil {
		return err
	}
	rec.Node = s.node
	return writeJSON(w, r, rec)
}

// Load returns the node's upload load now.
func (s *Server) Load() Load {
	now := time.Now()
	sent := s.sent.Load()
	s.rateMu.Lock()
	if dt := now.Sub(s.rateAt); dt >= time.Second {
		s.rate = float64(sent-s.rateSent) / dt.Seconds()
		s.rateAt, s.rateSent = now, sent
	}
	rate := s.rate
	s.rateMu.Unlock()
	return Load{ActiveUploads: int(s.active.Load()), MaxUploads: s.maxUploads, UploadBytesPerSecond: rate}
}

func (s *Server) serveLoad(w http.ResponseWriter, r *http.Request) error {
	l := s.Load()
	return writeJSON(w, r, LoadResponse{Node: s.node, Load: l})
}

// servedCounter counts bytes into a counter as they are written.
type servedCounter struct {
	w io.Writer
	c prometheus.Counter
	n *atomic.Int64 // optional: also counted here
}

func (s *servedCounter) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	s.c.Add(float64(n))
	if s.n != nil {
		s.n.Add(int64(n))
	}
	return n, err
}

// parseByteRange parses a Range header for a blob of size bytes into the
// range's start and length. The error is a 416 *Error; see serveBlob.
func parseByteRange(header string, size int64) (start, length int64, err error) {
	unsatisfiable := func(format string, args ...any) error {
		return &Error{
			Status: http.StatusRequestedRangeNotSatisfiable,
			Code:   CodeRangeInvalid,
			Detail: map[string]any{"range": header, "size": size},
			Err:    fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), errdefs.ErrInvalidArgument),
		}
	}
	const unit = "bytes="
	if len(header) < len(unit) || !strings.EqualFold(header[:len(unit)], unit) {
		return 0, 0, unsatisfiable("range %q: only byte ranges are served", header)
	}
	spec := strings.TrimSpace(header[len(unit):])
	if strings.Contains(spec, ",") {
		return 0, 0, unsatisfiable("range %q: only a single range is served", header)
	}
	first, last, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, unsatisfiable("range %q is malformed", header)
	}
	first, last = strings.TrimSpace(first), strings.TrimSpace(last)
	if first == "" {
		n, ok := parseRangeInt(last)
		if !ok {
			return 0, 0, unsatisfiable("range %q is malformed", header)
		}
		if n == 0 || size == 0 {
			return 0, 0, unsatisfiable("range %q is outside the blob's %d bytes", header, size)
		}
		n = min(n, size)
		return size - n, n, nil
	}
	a, ok := parseRangeInt(first)
	if !ok {
		return 0, 0, unsatisfiable("range %q is malformed", header)
	}
	b := size - 1
	if last != "" {
		if b, ok = parseRangeInt(last); !ok || b < a {
			return 0, 0, unsatisfiable("range %q is malformed", header)
		}
	}
	if a >= size {
		return 0, 0, unsatisfiable("range %q is outside the blob's %d bytes", header, size)
	}
	b = min(b, size-1)
	return a, b - a + 1, nil
}

// parseRangeInt parses a non-empty string of decimal digits.
func parseRangeInt(s string) (int64, bool) {
	if s == "" {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

// serveManifest answers HEAD and GET of a manifest by digest. Peers never
// resolve tags: a tag is answered 404 MANIFEST_UNKNOWN.
func (s *Server) serveManifest(w http.ResponseWriter, r *http.Request, ref string) error {
	ctx := r.Context()
	if !strings.Contains(ref, ":") {
		return newError(http.StatusNotFound, CodeManifestUnknown, errdefs.ErrNotFound, "manifest %q: tags are not resolved by peers", ref)
	}
	dgst, err := parseDigest(ref)
	if err != nil {
		return err
	}
	unknown := func(format string, args ...any) error {
		return newError(http.StatusNotFound, CodeManifestUnknown, errdefs.ErrNotFound, "manifest %s: %s", dgst, fmt.Sprintf(format, args...))
	}
	info, err := s.store.Info(ctx, dgst)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return unknown("not held")
		}
		return fmt.Errorf("manifest %s info: %w", dgst, err)
	}
	if info.Size > MaxManifestSize {
		return unknown("%d bytes is too large for a manifest", info.Size)
	}
	b, err := ctdcontent.ReadBlob(ctx, s.store, ocispec.Descriptor{Digest: dgst, Size: info.Size})
	if err != nil {
		if errdefs.IsNotFound(err) {
			return unknown("not held")
		}
		return fmt.Errorf("read manifest %s: %w", dgst, err)
	}
	mt, ok := manifestMediaType(b)
	if !ok {
		return unknown("not a manifest")
	}

	h := w.Header()
	h.Set("Docker-Content-Digest", dgst.String())
	h.Set("ETag", `"`+dgst.String()+`"`)
	h.Set("Content-Type", mt)
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	n, err := w.Write(b)
	s.metrics.servedBytes.Add(float64(n))
	if err != nil {
		return fmt.Errorf("send manifest %s: %w", dgst, err)
	}
	return nil
}

// manifestMediaType returns the media type of the manifest b: its mediaType
// field, or else the OCI index type for a document with manifests, or the OCI
// image manifest type for one with config and layers. ok is false when b is
// not a JSON object of either kind.
func manifestMediaType(b []byte) (string, bool) {
	var m struct {
		MediaType string          `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
		Config    json.RawMessage `json:"config"`
		Layers    json.RawMessage `json:"layers"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return "", false
	}
	switch {
	case m.MediaType != "":
		if _, _, err := mime.ParseMediaType(m.MediaType); err != nil {
			return "", false
		}
		return m.MediaType, true
	case m.Manifests != nil:
		return ocispec.MediaTypeImageIndex, true
	case m.Config != nil && m.Layers != nil:
		return ocispec.MediaTypeImageManifest, true
	}
	return "", false
}

// serveInventory answers the node's whole inventory, or with ?since= the
// changes after that position when they are still in the log.
func (s *Server) serveInventory(w http.ResponseWriter, r *http.Request) error {
	if q := r.URL.Query().Get(SinceQuery); q != "" {
		epoch, seq, err := ParseSince(q)
		if err != nil {
			return err // 400
		}
		if changes, cur, ok := s.inv.Since(epoch, seq); ok {
			added, removed := NetChanges(changes)
			l := s.Load()
			return writeJSON(w, r, InventoryResponse{Node: s.node, Load: &l, Epoch: epoch, Seq: cur, Added: added, Removed: removed})
		}
	}
	snap := s.inv.Snapshot()
	if snap.Blobs == nil {
		snap.Blobs = []content.Blob{}
	}
	l := s.Load()
	return writeJSON(w, r, InventoryResponse{Node: s.node, Load: &l, Epoch: snap.Epoch, Seq: snap.Seq, Full: true, Blobs: snap.Blobs})
}

// serveHave answers which of the digests asked are held. Its epoch and seq
// are those of a snapshot taken just before the lookup: the answer reflects at
// least that state of the inventory.
func (s *Server) serveHave(w http.ResponseWriter, r *http.Request) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxHaveBody))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return newError(http.StatusRequestEntityTooLarge, CodeSizeInvalid, errdefs.ErrInvalidArgument, "have request larger than %d bytes", maxHaveBody)
		}
		return fmt.Errorf("read have request: %w", err)
	}
	var req HaveRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return fmt.Errorf("have request: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if len(req.Digests) > MaxHaveDigests {
		return newError(http.StatusRequestEntityTooLarge, CodeSizeInvalid, errdefs.ErrInvalidArgument, "have request with %d digests, at most %d", len(req.Digests), MaxHaveDigests)
	}
	for _, d := range req.Digests {
		if err := d.Validate(); err != nil {
			return newError(http.StatusBadRequest, CodeDigestInvalid, errdefs.ErrInvalidArgument, "digest %q: %v", d, err)
		}
	}
	blobs, epoch, seq := s.inv.HaveAt(req.Digests)
	if blobs == nil {
		blobs = []content.Blob{}
	}
	l := s.Load()
	return writeJSON(w, r, HaveResponse{Node: s.node, Load: &l, Epoch: epoch, Seq: seq, Blobs: blobs})
}

func serveHealth(w http.ResponseWriter, _ *http.Request) error {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Length", "2")
	w.WriteHeader(http.StatusOK)
	_, err := io.WriteString(w, "ok")
	return err
}

func (s *Server) serveMetrics(w http.ResponseWriter, r *http.Request) error {
	if s.promh == nil {
		return newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "metrics are not served by this node")
	}
	s.promh.ServeHTTP(w, r)
	return nil
}

// writeJSON answers 200 with v as JSON.
func writeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode answer: %w", err)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	_, err = w.Write(b)
	return err
}

// countingWriter records the status and the body bytes written. It hides
// the ResponseWriter's io.ReaderFrom, so io.CopyBuffer uses its buffer.
type countingWriter struct {
	http.ResponseWriter
	status  int
	written int64
}

func (c *countingWriter) WriteHeader(status int) {
	if c.status == 0 && status >= 200 {
		c.status = status
	}
	c.ResponseWriter.WriteHeader(status)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	n, err := c.ResponseWriter.Write(p)
	c.written += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (c *countingWriter) Unwrap() http.ResponseWriter {
	return c.ResponseWriter
}

// serverMetrics are one server's metrics; they are registered only where
// ServerOptions.Registerer says.
type serverMetrics struct {
	requests      *prometheus.CounterVec
	servedBytes   prometheus.Counter
	activeUploads prometheus.Gauge
	busy          prometheus.Counter
}

func newServerMetrics() *serverMetrics {
	return &serverMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_peer_requests_total",
			Help: "Requests answered by the peer server, by kind (blob, manifest, inventory, have, other) and status code.",
		}, []string{"kind", "code"}),
		servedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coop_peer_served_bytes_total",
			Help: "Blob and manifest bytes sent by the peer server.",
		}),
		activeUploads: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coop_peer_active_uploads",
			Help: "Blobs the peer server is sending now.",
		}),
		busy: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coop_peer_busy_total",
			Help: "Blob requests refused with 429 because --max-uploads were running.",
		}),
	}
}

func (m *serverMetrics) register(reg prometheus.Registerer) error {
	cs := []prometheus.Collector{m.requests, m.servedBytes, m.activeUploads, m.busy}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, done := range cs[:i] {
				reg.Unregister(done)
			}
			return err
		}
	}
	return nil
}
