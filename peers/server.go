package peers

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
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
	// source side) for the namespaces in ContainerNamespaces. Without it
	// ContainersPath answers 403 DENIED: container records (whose OCI spec
	// holds the container's environment, secrets included) are off.
	Containers ContainerRecords
	// ContainerNamespaces are the namespaces whose containers Containers
	// serves; the others are answered 403 DENIED. Required with
	// Containers.
	ContainerNamespaces []string
	// AllowStop lets a migration's destination stop a container of
	// ContainerNamespaces here (coop migrate --stop-source). Off by
	// default; needs Containers.
	AllowStop bool
	// MaxUploads bounds the blob bodies sent at once; beyond it a blob GET
	// is answered 429 with Retry-After. 0: no bound.
	MaxUploads int
	// MaxUploadsPerClient is the share of MaxUploads every client (as
	// ClientKey names it) can count on, so that one client's readers — slow
	// ones included — cannot hold every upload: a client past its share is
	// answered 429 with Retry-After once taking one more slot would leave
	// fewer than this many free. Alone, a client may use MaxUploads minus
	// this many (a destination striping a migration from its only source).
	// 0: DefaultMaxUploadsPerClient; negative: no bound. Without MaxUploads
	// there is nothing to share and no bound.
	MaxUploadsPerClient int
	// ClientKey names the client of a request for MaxUploadsPerClient.
	// Default ClientIP.
	ClientKey func(*http.Request) string
	// WriteStall cuts a blob answer whose client has taken nothing for this
	// long, which frees its upload slot: the write deadline moves on while
	// bytes flow (see NewStallWriter). Default DefaultWriteStall.
	WriteStall time.Duration
	// Partials, when set, are the blobs this node is downloading: a ranged
	// GET of chunks already here is served from them, of chunks being
	// fetched after they arrive (at most PartialWait), and PartialPath
	// tells which chunks are here (a swarm, see Partials).
	Partials *Partials
	// PartialWait bounds the wait for a chunk being fetched before the
	// answer says "not yet" (503 with NotYetHeader). Default
	// DefaultPartialWait.
	PartialWait time.Duration
}

const (
	// DefaultMaxUploadsPerClient is the default
	// ServerOptions.MaxUploadsPerClient.
	DefaultMaxUploadsPerClient = 4
	// DefaultWriteStall is the default ServerOptions.WriteStall.
	DefaultWriteStall = 15 * time.Second
	// DefaultPartialWait is the default ServerOptions.PartialWait: below
	// a peer client's wait for response headers.
	DefaultPartialWait = 3 * time.Second
)

// ClientIP returns the IP address a request came from (the host of its
// RemoteAddr), the default ServerOptions.ClientKey.
func ClientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// Request kinds, the "kind" label of coop_peer_requests_total.
const (
	kindBlob      = string(KindBlob)
	kindManifest  = string(KindManifest)
	kindInventory = "inventory"
	kindHave      = "have"
	kindPartial   = "partial"
	kindOther     = "other"
)

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

	containers   ContainerRecords
	containerNSs []string
	allowStop    bool
	maxUploads   int
	maxPerClient int // 0: no bound
	clientKey    func(*http.Request) string
	writeStall   time.Duration
	partials     *Partials
	partialWait  time.Duration
	waiting      atomic.Int64   // partial requests waiting for a chunk
	slotsMu      sync.Mutex     // taking and giving back an upload slot
	byClient     map[string]int // upload slots held, by client key
	active       atomic.Int64   // blob bodies being sent
	sent         atomic.Int64   // blob bytes sent, for the upload rate
	rateMu       sync.Mutex
	rateAt       time.Time
	rateSent     int64
	rate         float64
}

var _ http.Handler = (*Server)(nil)

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
	if err := validateContainers(opts); err != nil {
		return nil, err
	}
	if opts.MaxUploads < 0 {
		return nil, fmt.Errorf("peer server max uploads %d: %w", opts.MaxUploads, errdefs.ErrInvalidArgument)
	}
	if opts.WriteStall < 0 {
		return nil, fmt.Errorf("peer server write stall %v: %w", opts.WriteStall, errdefs.ErrInvalidArgument)
	}
	perClient := opts.MaxUploadsPerClient
	switch {
	case perClient == 0:
		perClient = DefaultMaxUploadsPerClient
	case perClient < 0:
		perClient = 0
	}
	clientKey := opts.ClientKey
	if clientKey == nil {
		clientKey = ClientIP
	}
	writeStall := opts.WriteStall
	if writeStall == 0 {
		writeStall = DefaultWriteStall
	}
	partialWait := opts.PartialWait
	if partialWait <= 0 {
		partialWait = DefaultPartialWait
	}
	m := newServerMetrics()
	m.maxUploads.Set(float64(opts.MaxUploads))
	if opts.Registerer != nil {
		if err := m.register(opts.Registerer); err != nil {
			return nil, fmt.Errorf("register peer server metrics: %w: %w", err, errdefs.ErrInvalidArgument)
		}
	}
	s := &Server{
		maxUploads:   opts.MaxUploads,
		maxPerClient: perClient,
		clientKey:    clientKey,
		writeStall:   writeStall,
		partials:     opts.Partials,
		partialWait:  partialWait,
		byClient:     map[string]int{},
		containers:   opts.Containers,
		containerNSs: slices.Clone(opts.ContainerNamespaces),
		allowStop:    opts.AllowStop,
		rateAt:       time.Now(),
		node:         opts.Node,
		store:        opts.Store,
		inv:          opts.Inventory,
		metrics:      m,
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

// dispatch routes r and returns its kind and the handler's error. The
// handlers live by what they serve: registry.go (OCI blobs and manifests),
// coopapi.go (inventory, have, load), containers.go (container records).
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
	if ref, ok := strings.CutPrefix(p, PartialPath+"/"); ok {
		return kindPartial, allow(w, r, func(w http.ResponseWriter, r *http.Request) error { return s.servePartialStatus(w, r, ref) }, http.MethodGet)
	}
	if strings.HasPrefix(p, ContainersPath+"/") {
		return kindOther, s.serveContainer(w, r, strings.TrimPrefix(p, ContainersPath+"/"))
	}
	if !strings.HasPrefix(p, "/v2/") {
		return kindOther, newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "no endpoint at %q", p)
	}
	dp, err := ParseDistributionPath(p)
	kind := kindOther
	if dp.Kind != "" {
		kind = string(dp.Kind)
	}
	// The distribution API is read-only: whatever the route, only reads.
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return kind, methodNotAllowed(w, r, http.MethodGet, http.MethodHead)
	}
	if err != nil {
		return kind, err
	}
	if dp.Kind == KindBlob {
		return kind, s.serveBlob(w, r, dp.Ref)
	}
	return kind, s.serveManifest(w, r, dp.Ref)
}

// acquireUpload takes an upload slot for r and returns the function that
// gives it back. When MaxUploads are running, or r's client is past its
// share (MaxUploadsPerClient) and the free slots are down to the others'
// share, it answers 429 with Retry-After instead.
func (s *Server) acquireUpload(w http.ResponseWriter, r *http.Request) (release func(), err error) {
	key := s.clientKey(r)
	s.slotsMu.Lock()
	defer s.slotsMu.Unlock()
	n, mine := s.active.Load(), s.byClient[key]
	switch {
	case s.maxUploads > 0 && n >= int64(s.maxUploads):
		s.metrics.busy.Inc()
		w.Header().Set("Retry-After", "1")
		return nil, newError(http.StatusTooManyRequests, CodeTooManyRequests, errdefs.ErrUnavailable, "%d uploads running, at most %d", n, s.maxUploads)
	case s.maxUploads > 0 && s.maxPerClient > 0 && mine >= s.maxPerClient && int64(s.maxUploads)-n-1 < int64(s.maxPerClient):
		s.metrics.busyClient.Inc()
		w.Header().Set("Retry-After", "1")
		return nil, newError(http.StatusTooManyRequests, CodeTooManyRequests, errdefs.ErrUnavailable, "%d uploads running for client %q, at most %d a client", mine, key, s.maxPerClient)
	}
	s.active.Add(1)
	s.byClient[key]++
	return func() {
		s.slotsMu.Lock()
		defer s.slotsMu.Unlock()
		s.active.Add(-1)
		if s.byClient[key]--; s.byClient[key] <= 0 {
			delete(s.byClient, key)
		}
	}, nil
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
	maxUploads    prometheus.Gauge
	busy          prometheus.Counter
	busyClient    prometheus.Counter
	partial       *prometheus.CounterVec
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
		maxUploads: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coop_peer_max_uploads",
			Help: "Blobs the peer server sends at once at most (--max-uploads; 0: no bound).",
		}),
		busy: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coop_peer_busy_total",
			Help: "Blob requests refused with 429 because --max-uploads were running.",
		}),
		busyClient: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coop_peer_client_busy_total",
			Help: "Blob requests refused with 429 because their client had as many uploads running as one client may.",
		}),
		partial: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_peer_partial_requests_total",
			Help: "Ranged blob requests for a blob still downloading here, by result (served: the chunks were here or arrived in time; not_yet: 503 with X-Coop-Not-Yet).",
		}, []string{"result"}),
	}
}

func (m *serverMetrics) register(reg prometheus.Registerer) error {
	cs := []prometheus.Collector{m.requests, m.servedBytes, m.activeUploads, m.maxUploads, m.busy, m.busyClient, m.partial}
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
