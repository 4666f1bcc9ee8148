// Package clusterkb is ClusterKB: a central, in-memory, soft-state index
// digest → nodes, fed by polling every node (pull) or by the nodes' events
// through the broker (push), answering batched locate questions. It also
// holds the client nodes use to register and to locate.
package clusterkb

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"sync"
	"time"
	"unicode"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/resolver"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Paths of the ClusterKB API.
const (
	NodesPath  = "/coop/v1/nodes"
	HealthPath = "/healthz"
)

// Feeds of the index.
const (
	FeedPull = "pull"
	FeedPush = "push"
)

// RegisterRequest registers a node, or renews its registration (heartbeat).
type RegisterRequest struct {
	Name string `json:"name"`
	URL  string `json:"url"`
	// Neighbors, when not nil, are the only nodes the node may fetch from;
	// nil means every node.
	Neighbors []string `json:"neighbors,omitempty"`
}

// RegisterResponse tells the node how often to renew.
type RegisterResponse struct {
	PeriodSeconds float64 `json:"period_seconds"`
	TTLSeconds    float64 `json:"ttl_seconds"`
}

// NodeInfo is what ClusterKB knows of one node.
type NodeInfo struct {
	Name          string    `json:"name"`
	URL           string    `json:"url"`
	Static        bool      `json:"static,omitempty"`
	Neighbors     []string  `json:"neighbors,omitempty"`
	LastHeartbeat time.Time `json:"last_heartbeat,omitzero"`
	Epoch         string    `json:"epoch,omitempty"`
	Seq           uint64    `json:"seq"`
	Blobs         int       `json:"blobs"`
	LastSeen      time.Time `json:"last_seen,omitzero"`
}

// Options configure a KB.
type Options struct {
	// Feed is FeedPull or FeedPush. Required.
	Feed string
	// Period is the poll period (pull) and the nodes' heartbeat and
	// full-update period. Default 10s.
	Period time.Duration
	// TTL drops a registered node silent for this long. Default 3 periods.
	TTL time.Duration
	// Static nodes are always members.
	Static []resolver.Neighbor
	// Reader reads nodes' inventories (pull feed, and push repairs).
	// Required.
	Reader resolver.InventoryReader
	// Conn is the broker (push feed). Required for FeedPush.
	Conn *nats.Conn
	// PollTimeout bounds one poll. Default 2s.
	PollTimeout time.Duration
	// Registerer receives the metrics; nil registers nothing.
	Registerer prometheus.Registerer
	// Gatherer is served on /metrics; nil serves no metrics.
	Gatherer prometheus.Gatherer
	// Authenticated requires every registration to come from the node it
	// names: its client certificate (trust.Name) must name it. Set it when
	// the KB serves mutual TLS.
	Authenticated bool
}

// KB is ClusterKB.
type KB struct {
	opts    Options
	idx     *resolver.Index
	metrics *resolver.Metrics
	poller  *resolver.Poller
	sub     *resolver.Subscriber

	mu      sync.RWMutex
	members map[string]*member
	// unread are the members registered or moved since Run last looked,
	// whose inventory Run reads at once; wake tells it to look.
	unread map[string]firstRead
	wake   chan struct{}

	locates   *prometheus.CounterVec
	locateDur prometheus.Histogram
}

// firstRead is a registration waiting for its first read.
type firstRead struct {
	url   string
	moved bool // drop what the index holds first
}

type member struct {
	name      string
	url       string
	neighbors map[string]bool // nil: all
	static    bool
	heartbeat time.Time
}

var (
	_ http.Handler        = (*KB)(nil)
	_ resolver.Membership = (*KB)(nil)
)

// New returns a KB; Run feeds it, ServeHTTP answers.
func New(opts Options) (*KB, error) {
	if opts.Period == 0 {
		opts.Period = 10 * time.Second
	}
	if opts.TTL == 0 {
		opts.TTL = 3 * opts.Period
	}
	if opts.PollTimeout == 0 {
		opts.PollTimeout = 2 * time.Second
	}
	if opts.Period < 0 || opts.TTL < 0 || opts.PollTimeout < 0 {
		return nil, fmt.Errorf("clusterkb period, ttl and timeout must be positive: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Reader == nil {
		return nil, fmt.Errorf("clusterkb needs an inventory reader: %w", errdefs.ErrInvalidArgument)
	}
	metrics, err := resolver.NewMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	k := &KB{
		opts:    opts,
		idx:     resolver.NewIndex(),
		metrics: metrics,
		members: map[string]*member{},
		unread:  map[string]firstRead{},
		wake:    make(chan struct{}, 1),
		locates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_kb_locate_requests_total",
			Help: "Locate questions answered, by result (ok, bad_request).",
		}, []string{"result"}),
		locateDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "coop_kb_locate_seconds",
			Help:    "Time to answer a locate question, body decoding included.",
			Buckets: prometheus.ExponentialBuckets(0.00002, 2, 16),
		}),
	}
	for _, n := range opts.Static {
		k.members[n.Name] = &member{name: n.Name, url: n.URL, static: true}
	}
	if opts.Registerer != nil {
		nodes := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "coop_kb_nodes", Help: "Nodes in the index."},
			func() float64 { return float64(len(k.idx.Nodes())) })
		entries := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "coop_kb_entries", Help: "(node, blob) pairs in the index."},
			func() float64 { return float64(k.idx.Entries()) })
		for _, c := range []prometheus.Collector{k.locates, k.locateDur, nodes, entries} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("clusterkb metrics: %w", err)
			}
		}
	}
	switch opts.Feed {
	case FeedPull:
		if k.poller, err = resolver.NewPoller(resolver.PollerOptions{
			Index: k.idx, Reader: opts.Reader, Nodes: k, Period: opts.Period, Timeout: opts.PollTimeout, Metrics: metrics,
		}); err != nil {
			return nil, err
		}
	case FeedPush:
		if opts.Conn == nil {
			return nil, fmt.Errorf("clusterkb push feed needs a broker: %w", errdefs.ErrInvalidArgument)
		}
		if k.sub, err = resolver.NewSubscriber(resolver.SubscriberOptions{
			Index: k.idx, Conn: opts.Conn, Members: k, Reader: opts.Reader, Period: opts.Period, Metrics: metrics,
		}); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("clusterkb feed %q: want pull or push: %w", opts.Feed, errdefs.ErrInvalidArgument)
	}
	return k, nil
}

// Index is the KB's index (for benchmarks and tests).
func (k *KB) Index() *resolver.Index { return k.idx }

// Run feeds the index, reads newly registered members at once and expires
// silent ones until ctx ends; it returns once everything it started has
// ended.
func (k *KB) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	var err error
	wg.Go(func() {
		if k.poller != nil {
			err = k.poller.Run(ctx)
		} else {
			err = k.sub.Run(ctx)
		}
	})
	t := time.NewTicker(k.opts.Period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			return err
		case <-t.C:
			k.expireMembers(ctx)
		case <-k.wake:
			k.mu.Lock()
			unread := k.unread
			k.unread = map[string]firstRead{}
			k.mu.Unlock()
			for name, r := range unread {
				wg.Go(func() { k.readFirst(ctx, name, r) })
			}
		}
	}
}

// readFirst reads a newly registered member at once, so that a new or
// restarted KB is complete quickly.
func (k *KB) readFirst(ctx context.Context, name string, r firstRead) {
	rctx, cancel := context.WithTimeout(ctx, k.opts.PollTimeout)
	defer cancel()
	if r.moved {
		k.idx.Drop(name)
	}
	if err := resolver.Sync(rctx, k.idx, k.opts.Reader, resolver.Neighbor{Name: name, URL: r.url}, k.metrics, "poll"); err != nil && ctx.Err() == nil {
		log.G(ctx).WithError(err).WithField("node", name).Info("first read of a registered node failed")
	}
}

func (k *KB) expireMembers(ctx context.Context) {
	cutoff := time.Now().Add(-k.opts.TTL)
	var gone []string
	k.mu.Lock()
	for name, m := range k.members {
		if !m.static && m.heartbeat.Before(cutoff) {
			delete(k.members, name)
			delete(k.unread, name)
			gone = append(gone, name)
		}
	}
	k.mu.Unlock()
	for _, name := range gone {
		k.idx.Drop(name)
	}
	k.metrics.Dropped.WithLabelValues("expired").Add(float64(len(gone)))
	if len(gone) > 0 {
		log.G(ctx).WithField("nodes", gone).Info("silent nodes expired")
	}
}

// Neighbors lists the members (the pull feed polls them).
func (k *KB) Neighbors() []resolver.Neighbor {
	k.mu.RLock()
	defer k.mu.RUnlock()
	out := make([]resolver.Neighbor, 0, len(k.members))
	for _, m := range k.members {
		out = append(out, resolver.Neighbor{Name: m.name, URL: m.url})
	}
	return out
}

// Follow accepts every node (push feed): a member at its registered URL,
// another at the URL it claims, if valid.
func (k *KB) Follow(node, claimed string) (string, bool) {
	k.mu.RLock()
	m := k.members[node]
	var url string
	if m != nil {
		url = m.url
	}
	k.mu.RUnlock()
	if m != nil {
		return url, true
	}
	if u, err := peers.ParseBaseURL(claimed); err == nil {
		return u, true
	}
	return "", false
}

// Followed says every node is followed.
func (k *KB) Followed() ([]resolver.Neighbor, bool) { return nil, true }

// Register adds or renews a member. A new member, or one at a new URL, is
// read at once by Run.
func (k *KB) Register(ctx context.Context, req RegisterRequest) error {
	if err := validName(req.Name); err != nil {
		return err
	}
	u, err := peers.ParseBaseURL(req.URL)
	if err != nil {
		return fmt.Errorf("node %s: %w", req.Name, err)
	}
	req.URL = u // stored as scheme, host and port, as every other URL
	var nb map[string]bool
	if req.Neighbors != nil {
		nb = make(map[string]bool, len(req.Neighbors))
		for _, n := range req.Neighbors {
			nb[n] = true
		}
	}
	k.mu.Lock()
	m, known := k.members[req.Name]
	if !known {
		m = &member{name: req.Name}
		k.members[req.Name] = m
	}
	moved := m.url != req.URL
	m.url, m.neighbors, m.heartbeat = req.URL, nb, time.Now()
	if !known || moved {
		// Run reads it at once, so a new or restarted KB is complete
		// quickly.
		r := k.unread[req.Name]
		k.unread[req.Name] = firstRead{url: req.URL, moved: r.moved || (known && moved)}
	}
	k.mu.Unlock()
	if !known || moved {
		log.G(ctx).WithField("node", req.Name).WithField("url", req.URL).Info("node registered")
		select {
		case k.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// Locate answers a locate question from the index.
func (k *KB) Locate(req resolver.LocateRequest) (resolver.LocateResponse, error) {
	if len(req.Digests) > resolver.MaxLocateDigests {
		return resolver.LocateResponse{}, fmt.Errorf("%d digests, at most %d: %w", len(req.Digests), resolver.MaxLocateDigests, errdefs.ErrInvalidArgument)
	}
	if err := resolver.ValidateDigests(req.Digests); err != nil {
		return resolver.LocateResponse{}, err
	}
	opts := resolver.LocateOptions{Exclude: req.Node}
	if req.Node != "" {
		k.mu.RLock()
		if m := k.members[req.Node]; m != nil && m.neighbors != nil {
			opts.Only = m.neighbors
		}
		k.mu.RUnlock()
	}
	return resolver.LocateResponse{Candidates: k.idx.Locate(req.Digests, opts)}, nil
}

// Nodes lists the members and what the index holds of each.
func (k *KB) Nodes() []NodeInfo {
	st := map[string]resolver.NodeStatus{}
	for _, s := range k.idx.Nodes() {
		st[s.Name] = s
	}
	k.mu.RLock()
	out := make([]NodeInfo, 0, len(k.members))
	for _, m := range k.members {
		ni := NodeInfo{Name: m.name, URL: m.url, Static: m.static, LastHeartbeat: m.heartbeat}
		for n := range m.neighbors {
			ni.Neighbors = append(ni.Neighbors, n)
		}
		sort.Strings(ni.Neighbors)
		if s, ok := st[m.name]; ok {
			ni.Epoch, ni.Seq, ni.Blobs, ni.LastSeen = s.Epoch, s.Seq, s.Blobs, s.LastSeen
			delete(st, m.name)
		}
		out = append(out, ni)
	}
	k.mu.RUnlock()
	// Nodes known only from the broker.
	for _, s := range st {
		out = append(out, NodeInfo{Name: s.Name, URL: s.URL, Epoch: s.Epoch, Seq: s.Seq, Blobs: s.Blobs, LastSeen: s.LastSeen})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// maxBody bounds a request body: a locate of MaxLocateDigests digests.
const maxBody = 2 << 20

// ServeHTTP serves the ClusterKB API.
func (k *KB) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	var err error
	switch r.URL.Path {
	case resolver.LocatePath:
		err = k.serveLocate(w, r)
	case NodesPath:
		switch r.Method {
		case http.MethodGet:
			err = writeJSON(w, k.Nodes())
		case http.MethodPost:
			var req RegisterRequest
			if err = readJSON(w, r, &req); err == nil {
				err = k.checkIdentity(r, req.Name)
			}
			if err == nil {
				if err = k.Register(ctx, req); err == nil {
					err = writeJSON(w, RegisterResponse{PeriodSeconds: k.opts.Period.Seconds(), TTLSeconds: k.opts.TTL.Seconds()})
				}
			}
		default:
			w.Header().Set("Allow", "GET, POST")
			err = &peers.Error{Status: http.StatusMethodNotAllowed, Code: peers.CodeUnsupported, Err: errors.New("use GET or POST")}
		}
	case HealthPath:
		_, _ = io.WriteString(w, "ok\n")
	case peers.MetricsPath:
		if k.opts.Gatherer == nil {
			err = fmt.Errorf("no metrics: %w", errdefs.ErrNotFound)
			break
		}
		promhttp.HandlerFor(k.opts.Gatherer, promhttp.HandlerOpts{}).ServeHTTP(w, r)
	default:
		err = fmt.Errorf("no such endpoint %s: %w", r.URL.Path, errdefs.ErrNotFound)
	}
	if err != nil {
		peers.WriteError(ctx, w, err)
	}
}

func (k *KB) serveLocate(w http.ResponseWriter, r *http.Request) error {
	start := time.Now()
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		return &peers.Error{Status: http.StatusMethodNotAllowed, Code: peers.CodeUnsupported, Err: errors.New("use POST")}
	}
	var req resolver.LocateRequest
	if err := readJSON(w, r, &req); err != nil {
		k.locates.WithLabelValues("bad_request").Inc()
		return err
	}
	resp, err := k.Locate(req)
	if err != nil {
		k.locates.WithLabelValues("bad_request").Inc()
		return err
	}
	err = writeJSON(w, resp)
	k.locates.WithLabelValues("ok").Inc()
	k.locateDur.Observe(time.Since(start).Seconds())
	return err
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return &peers.Error{Status: http.StatusRequestEntityTooLarge, Code: peers.CodeSizeInvalid, Err: fmt.Errorf("body larger than %d bytes: %w", maxBody, errdefs.ErrInvalidArgument)}
		}
		return fmt.Errorf("read body: %w", err)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("bad request body: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(append(b, '\n'))
	return nil
}

func validName(name string) error {
	if name == "" || len(name) > 253 {
		return fmt.Errorf("node name %q: want 1 to 253 characters: %w", name, errdefs.ErrInvalidArgument)
	}
	for _, c := range name {
		if unicode.IsSpace(c) || unicode.IsControl(c) || c == '=' || c == ',' {
			return fmt.Errorf("node name %q: no spaces, control characters, '=' or ',': %w", name, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// checkIdentity refuses a registration of name by a client whose
// certificate names another process, when the KB is Authenticated.
func (k *KB) checkIdentity(r *http.Request, name string) error {
	if !k.opts.Authenticated {
		return nil
	}
	if who, ok := trust.Name(r); !ok || who != name {
		return fmt.Errorf("%q may not register as %q: a node registers only as the name in its certificate: %w", who, name, errdefs.ErrPermissionDenied)
	}
	return nil
}
