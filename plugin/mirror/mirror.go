// Package mirror is the loopback OCI endpoint containerd tries before each
// registry (hosts.toml): it serves blobs and manifests by digest from the
// peers the neighbour index names, landing each blob verified in coop's
// store before containerd sees a byte, and answers 404 at once when no peer
// holds it. It is also the source of claimed blobs (content.ClaimSource) and
// serves its own API on loopback (api.go), which Client calls.
package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/upstream"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// PeerFetcher fetches blobs and manifests from peers (peers.Client does).
type PeerFetcher interface {
	// Fetch opens dgst at the peer from offset; the body holds exactly the
	// bytes from offset to size.
	Fetch(ctx context.Context, baseURL string, dgst digest.Digest, offset, size int64) (io.ReadCloser, error)
	// FetchRange opens length bytes of dgst from offset at the peer.
	FetchRange(ctx context.Context, baseURL string, dgst digest.Digest, offset, length, size int64) (io.ReadCloser, error)
	// FetchManifest returns the verified manifest dgst and its media type.
	FetchManifest(ctx context.Context, baseURL string, dgst digest.Digest) ([]byte, string, error)
}

// Options configure a Mirror.
type Options struct {
	// Resolver finds the peers holding a blob. Required.
	Resolver resolver.Resolver
	// Peers fetches from them. Required.
	Peers PeerFetcher
	// StallTimeout cuts a peer that sends nothing for this long. Default 5s.
	StallTimeout time.Duration
	// MinRate is the slowest a peer may send, in bytes/s, averaged over
	// each StallTimeout window; slower peers are cut off. It also bounds a
	// whole blob fetch at max(30s, size/MinRate). Default 64 KiB/s;
	// negative disables it.
	MinRate int64
	// FailedTTL is how long a blob whose peer transfer failed is answered
	// with 404, so that containerd's resume goes to the registry. Default 2m.
	FailedTTL time.Duration
	// HeaderDelay is how long a blob fetch may run before the response
	// headers are sent anyway. Default 5s; containerd waits 30s for headers.
	HeaderDelay time.Duration
	// Store is the node's content store, where fetched blobs land verified.
	// Required.
	Store LocalStore
	// Registerer receives the mirror's metrics; nil registers nothing.
	Registerer prometheus.Registerer
	// Policy selects the peers of a blob (peers.Policies); default
	// peers.PolicyStripe: all useful candidates at once.
	Policy string
	// DownloadBuffer bounds the bytes of one blob fetched ahead of the
	// local writer. Default 64 MiB.
	DownloadBuffer int64
	// ChunkSize is the size of one ranged request. Default 4 MiB.
	ChunkSize int64
	// Estimates are the per-peer estimates shared with the rest of the
	// node; nil keeps the mirror's own.
	Estimates *peers.Estimates
	// Sources, when set, are candidates whatever the resolver says (the
	// source of a migration), managed through SourcesPath.
	Sources *resolver.Sources
	// APIToken guards the write endpoints (POST and DELETE SourcesPath):
	// they need "Authorization: Bearer <APIToken>". Empty closes them (401
	// to everyone). At least MinTokenLen characters; LoadOrCreateToken
	// makes one. The read-only endpoints stay open to local users.
	APIToken string
	// Sizes tell the sizes the manifests being pulled give their blobs: a
	// candidate reporting another size is dropped. nil: the candidates'
	// size vote alone.
	Sizes Sizes
	// MaxBlobSize bounds the size of a blob fetched from peers when no
	// manifest gave it. Default peers.DefaultMaxBlobSize.
	MaxBlobSize int64
	// Budget bounds the disk taken by fetches not verified yet: a fetch it
	// cannot take is left to the registry. nil: no bound.
	Budget *content.Budget
	// Partials, when set, make every download a swarm member: the blob's
	// chunks are served to peers as they arrive, and peers still
	// downloading it serve theirs (peers.Partials). Needs the stripe
	// policy.
	Partials *peers.Partials
	// LocateChildren: before a manifest or index fetched from peers is
	// served, its children are located in one request, so that the
	// claims of its blobs, decided without a round trip, know their peers
	// (claim mode with an index that asks the network: online, kb).
	LocateChildren bool
	// Upstream, when set, learns the registry of each pull from the
	// manifest requests, and is a claim's fallback: a claimed blob the
	// peers fail to deliver is fetched from its registry, and a blob no
	// peer holds is claimed from the registry alone. A blob whose
	// registry refuses coop (containerd may have credentials coop lacks)
	// is claimed only when two peers hold it whole, so that the pull never
	// fails where containerd could have fetched it. nil: claims have no
	// fallback (a failed claim fails its pull once).
	Upstream Upstream
}

// Upstream fetches blobs from the registry of the pull they belong to
// (upstream.Registries).
type Upstream interface {
	// Seen records a manifest request containerd sent the mirror: repo
	// at the registry host, ref a tag or a digest.
	Seen(ctx context.Context, host, repo, ref string)
	// Reach says, without a network round trip, whether coop may fetch
	// dgst from its registry.
	Reach(dgst digest.Digest) upstream.Reach
	// Fetch opens dgst, of size bytes, at its registry from offset. If
	// its registry is not known, ErrNotFound is returned.
	Fetch(ctx context.Context, dgst digest.Digest, size, offset int64) (io.ReadCloser, error)
}

// Sizes tell the size a manifest committed on the node gives a blob
// (content.ExpectedSizes; plugin.Observer also asks containerd).
type Sizes interface {
	ExpectedSize(ctx context.Context, dgst digest.Digest) (int64, bool)
}

// Mirror is the loopback OCI endpoint containerd tries before each registry
// (hosts.toml). It serves blobs and manifests by digest from peers, and
// answers 404 at once when no peer holds them, so containerd goes on to the
// registry by itself.
type Mirror struct {
	resolver    resolver.Resolver
	peers       PeerFetcher
	store       LocalStore
	stall       time.Duration
	minRate     int64
	ttl         time.Duration
	headerDelay time.Duration
	fetches     *fetchGroup
	downloader  *peers.Downloader
	downloads   *downloads
	sources     *resolver.Sources
	apiToken    string
	sizes       Sizes
	maxBlob     int64
	budget      *content.Budget
	// locateChildren: see Options.LocateChildren.
	locateChildren bool
	// swarm: downloads spool their chunks too (Options.Partials).
	swarm bool
	// upstream: see Options.Upstream.
	upstream  Upstream
	srcMu     sync.Mutex
	srcs      map[string]migrationSource
	srcClosed bool

	mu sync.Mutex
	// failed are the blobs whose peer transfer failed; distrusted the
	// partial peers that sent chunks of a blob that did not verify. Both
	// for ttl.
	failed     recent[digest.Digest]
	distrusted recent[string]

	requests *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	locate   prometheus.Histogram
	// locateErrors counts locates that failed (a dead or garbled ClusterKB).
	locateErrors prometheus.Counter
	// sizeRefused counts candidates dropped for a size the manifest denies.
	sizeRefused prometheus.Counter
	// claimChoices counts the claim decisions with their fallback.
	claimChoices *prometheus.CounterVec
	// claimFallbacks counts the claims the registry completed.
	claimFallbacks *prometheus.CounterVec
}

var _ http.Handler = (*Mirror)(nil)

// New returns a Mirror. Close ends the fetches it starts.
func New(opts Options) (*Mirror, error) {
	m := &Mirror{
		resolver:       opts.Resolver,
		peers:          opts.Peers,
		store:          opts.Store,
		stall:          5 * time.Second,
		minRate:        64 << 10,
		ttl:            2 * time.Minute,
		headerDelay:    5 * time.Second,
		fetches:        newFetchGroup(),
		downloads:      newDownloads(),
		sources:        opts.Sources,
		apiToken:       opts.APIToken,
		sizes:          opts.Sizes,
		maxBlob:        peers.DefaultMaxBlobSize,
		budget:         opts.Budget,
		locateChildren: opts.LocateChildren,
		swarm:          opts.Partials != nil,
		upstream:       opts.Upstream,
		srcs:           map[string]migrationSource{},
		failed:         recent[digest.Digest]{},
		distrusted:     recent[string]{},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_mirror_requests_total",
			Help: "Mirror requests by kind (blob, manifest, other) and result (hit: from peers, local: already here, miss: no candidate, failed: peers failed before headers, aborted: after, loop, bad_request).",
		}, []string{"kind", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_mirror_peer_bytes_total",
			Help: "Bytes the mirror received from each peer.",
		}, []string{"node"}),
		locateErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coop_mirror_locate_errors_total",
			Help: "Locates that failed (index unreachable or answering garbage); those blobs went to the registry.",
		}),
		sizeRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coop_mirror_size_refused_total",
			Help: "Candidates dropped because the size they reported is not the one the manifest being pulled gives the blob.",
		}),
		claimChoices: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_claim_decisions_total",
			Help: "Blobs of 1 MiB or more containerd asked about, by what coop decided: peers_registry (claimed from peers, the registry as fallback), peers (claimed from peers only: two or more hold it, or one and its registry is down or not checked yet), registry (claimed from the registry alone), no_fallback (one peer holds it and its registry refuses coop: not claimed, containerd fetches it).",
		}, []string{"decision"}),
		claimFallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_claim_registry_fallbacks_total",
			Help: "Claims whose peers failed and that the registry completed, by why: failed (died, stalled, short) or corrupt (did not verify: fetched again from the start).",
		}, []string{"reason"}),
		locate: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "coop_mirror_locate_seconds",
			Help:    "Time the mirror spent asking the resolver for candidates.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
	}
	if opts.StallTimeout != 0 {
		m.stall = opts.StallTimeout
	}
	if opts.MinRate != 0 {
		m.minRate = max(opts.MinRate, 0)
	}
	if opts.FailedTTL != 0 {
		m.ttl = opts.FailedTTL
	}
	if opts.HeaderDelay != 0 {
		m.headerDelay = opts.HeaderDelay
	}
	if opts.MaxBlobSize != 0 {
		m.maxBlob = opts.MaxBlobSize
	}
	if m.resolver != nil && m.sources != nil {
		m.resolver = resolver.WithSources(m.resolver, m.sources)
	}
	if m.resolver == nil || m.peers == nil || m.store == nil {
		return nil, fmt.Errorf("mirror needs a resolver, a peer fetcher and a store: %w", errdefs.ErrInvalidArgument)
	}
	if m.apiToken != "" {
		if err := validToken(m.apiToken); err != nil {
			return nil, fmt.Errorf("mirror API token: %w", err)
		}
	}
	if m.stall < 0 || m.ttl < 0 || m.headerDelay < 0 || m.maxBlob < 0 {
		return nil, fmt.Errorf("mirror timeouts must be positive: %w", errdefs.ErrInvalidArgument)
	}
	dl, err := peers.NewDownloader(opts.Peers, peers.DownloadOptions{
		Policy:    opts.Policy,
		ChunkSize: opts.ChunkSize,
		Buffer:    opts.DownloadBuffer,
		Stall:     m.stall,
		MinRate:   opts.MinRate,
		Estimates: opts.Estimates,
		MaxSize:   m.maxBlob,
		Partials:  opts.Partials,
		Refresh: func(ctx context.Context, dgst digest.Digest) []peers.Candidate {
			return m.candidates(ctx, dgst)
		},
		OnBytes: func(dgst digest.Digest, node string, n int) {
			m.bytes.WithLabelValues(node).Add(float64(n))
			m.downloads.add(dgst, node, n)
		},
	})
	if err != nil {
		return nil, err
	}
	m.downloader = dl
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{m.requests, m.bytes, m.locate, m.locateErrors, m.sizeRefused, m.claimChoices, m.claimFallbacks} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("mirror metrics: %w", err)
			}
		}
	}
	return m, nil
}

// Close cancels the mirror's fetches and waits for them to end, and drops
// the migration sources it holds. Requests served after Close answer as if
// no peer held anything.
func (m *Mirror) Close() error {
	m.fetches.close()
	m.srcMu.Lock()
	srcs := m.srcs
	m.srcs, m.srcClosed = map[string]migrationSource{}, true
	m.srcMu.Unlock()
	for _, s := range srcs {
		s.ttl.Stop()
		s.cancel()
	}
	return nil
}

// InFlight counts the blobs being fetched from peers now (mirror fetches
// and claims).
func (m *Mirror) InFlight() int { return m.downloads.inFlight() }

// Estimates are what the mirror measured of each peer.
func (m *Mirror) Estimates() *peers.Estimates { return m.downloader.Estimates() }

// ServeHTTP routes /v2/ requests.
func (m *Mirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx := log.WithLogger(r.Context(), log.G(r.Context()).WithField("mirror", r.Method+" "+r.URL.Path))
	r = r.WithContext(ctx)
	switch {
	case r.URL.Path == resolver.LocatePath:
		m.serveLocate(ctx, w, r)
		return
	case r.URL.Path == DownloadsPath:
		m.serveDownloads(ctx, w, r)
		return
	case r.URL.Path == SourcesPath || strings.HasPrefix(r.URL.Path, SourcesPath+"/"):
		m.serveSources(ctx, w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeOCIError(ctx, w, http.StatusMethodNotAllowed, peers.CodeUnsupported, "the mirror is read-only")
		return
	}
	p := r.URL.Path
	switch p {
	case "/healthz":
		_, _ = io.WriteString(w, "ok\n")
		return
	case "/v2/", "/v2":
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, "{}")
		return
	}
	dp, err := peers.ParseDistributionPath(p)
	kind := string(dp.Kind)
	switch {
	case errdefs.IsNotFound(err):
		m.requests.WithLabelValues("other", "bad_request").Inc()
		writeOCIError(ctx, w, http.StatusNotFound, peers.CodeNotFound, "no such endpoint")
		return
	case err != nil:
		m.requests.WithLabelValues(kind, "bad_request").Inc()
		writeOCIError(ctx, w, http.StatusBadRequest, peers.CodeNameInvalid, "invalid repository name")
		return
	}
	ref := dp.Ref
	if r.Header.Get(peers.ForwardedHeader) != "" {
		// Another coop node: never forward, or requests could loop.
		m.requests.WithLabelValues(kind, "loop").Inc()
		writeOCIError(ctx, w, http.StatusNotFound, unknownCode(dp.Kind), "coop mirrors do not forward")
		return
	}
	if dp.Kind == peers.KindManifest && m.upstream != nil {
		if ns := r.URL.Query().Get("ns"); ns != "" {
			m.upstream.Seen(ctx, ns, dp.Name, ref)
		}
	}
	dgst, err := digest.Parse(ref)
	if err != nil {
		if dp.Kind == peers.KindManifest {
			// A tag: peers never resolve tags; the registry does.
			m.requests.WithLabelValues(kind, "miss").Inc()
			writeOCIError(ctx, w, http.StatusNotFound, peers.CodeManifestUnknown, "tags are not resolved through peers")
			return
		}
		m.requests.WithLabelValues(kind, "bad_request").Inc()
		writeOCIError(ctx, w, http.StatusBadRequest, peers.CodeDigestInvalid, err.Error())
		return
	}
	if dp.Kind == peers.KindManifest {
		m.serveManifest(ctx, w, r, dgst)
		return
	}
	m.serveBlob(ctx, w, r, dgst)
}

func unknownCode(kind peers.DistributionKind) string {
	if kind == peers.KindManifest {
		return peers.CodeManifestUnknown
	}
	return peers.CodeBlobUnknown
}

// candidates asks the resolver for dgst's holders, keeping those that agree
// with the most common size.
func (m *Mirror) candidates(ctx context.Context, dgst digest.Digest) []peers.Candidate {
	start := time.Now()
	got, err := m.resolver.Locate(ctx, []digest.Digest{dgst})
	m.locate.Observe(time.Since(start).Seconds())
	if err != nil {
		m.locateErrors.Inc()
		log.G(ctx).WithError(err).Warn("locate failed; letting the registry serve")
		return nil
	}
	return m.agreeOnSize(ctx, dgst, m.trusted(got[dgst]))
}

// trusted drops the partial candidates that sent chunks of a blob that did
// not verify within ttl (a peer still downloading a blob serves chunks not
// verified yet: a liar, or a relay of one).
func (m *Mirror) trusted(cs []peers.Candidate) []peers.Candidate {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.distrusted) == 0 {
		return cs
	}
	now := time.Now()
	out := cs[:0:0]
	for _, c := range cs {
		if c.Partial && m.distrusted.has(c.Node, now, m.ttl) {
			continue
		}
		out = append(out, c)
	}
	return out
}

// distrust marks the partial peers that sent bytes of a blob that did not
// verify (st), so that they are not candidates for ttl.
func (m *Mirror) distrust(ctx context.Context, st peers.DownloadStats) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, n := range st.Partial {
		if st.BytesByNode[n] > 0 {
			m.distrusted.add(n, time.Now(), m.ttl)
			log.G(ctx).WithField("peer", n).Warn("partial peer sent chunks of a blob that does not verify; not a candidate for a while")
		}
	}
}

// recent remembers keys for a while (under the mirror's lock).
type recent[K comparable] map[K]time.Time

// add remembers k from now, and forgets what is older than ttl.
func (r recent[K]) add(k K, now time.Time, ttl time.Duration) {
	for old, t := range r {
		if now.Sub(t) > ttl {
			delete(r, old)
		}
	}
	r[k] = now
}

// has says whether k was added within ttl.
func (r recent[K]) has(k K, now time.Time, ttl time.Duration) bool {
	t, ok := r[k]
	if ok && now.Sub(t) > ttl {
		delete(r, k)
		return false
	}
	return ok
}

// whole keeps the candidates holding the whole blob.
func whole(cs []peers.Candidate) []peers.Candidate {
	out := cs[:0:0]
	for _, c := range cs {
		if !c.Partial {
			out = append(out, c)
		}
	}
	return out
}

// agreeOnSize keeps the candidates of dgst reporting the size the manifest
// gives it, when one did; otherwise those that agree with the most common
// size.
func (m *Mirror) agreeOnSize(ctx context.Context, dgst digest.Digest, cs []peers.Candidate) []peers.Candidate {
	if len(cs) == 0 || m.sizes == nil {
		return agreeOnSize(cs) // no candidate: no size to check, nothing to look up
	}
	want, ok := m.sizes.ExpectedSize(ctx, dgst)
	if !ok {
		return agreeOnSize(cs)
	}
	out := sized(cs, want)
	if dropped := len(cs) - len(out); dropped > 0 {
		m.sizeRefused.Add(float64(dropped))
		log.G(ctx).WithField("digest", dgst).WithField("manifest_size", want).WithField("dropped", dropped).Warn("candidates report another size than the manifest")
	}
	return out
}

// agreeOnSize keeps the candidates that agree with the most common size
// (the smallest on a tie).
func agreeOnSize(cs []peers.Candidate) []peers.Candidate {
	if len(cs) < 2 {
		return cs
	}
	votes := map[int64]int{}
	for _, c := range cs {
		votes[c.Size]++
	}
	best, bestN := int64(-1), 0
	for s, n := range votes {
		if n > bestN || (n == bestN && s < best) {
			best, bestN = s, n
		}
	}
	out := cs[:0:0]
	for _, c := range cs {
		if c.Size == best {
			out = append(out, c)
		}
	}
	return out
}

func (m *Mirror) recentlyFailed(dgst digest.Digest) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.failed.has(dgst, time.Now(), m.ttl)
}

func (m *Mirror) markFailed(dgst digest.Digest) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failed.add(dgst, time.Now(), m.ttl)
}

func (m *Mirror) serveManifest(ctx context.Context, w http.ResponseWriter, r *http.Request, dgst digest.Digest) {
	for _, c := range m.candidates(ctx, dgst) {
		if c.Partial {
			continue // a manifest is served whole or not at all
		}
		fctx, cancel := context.WithTimeout(ctx, m.stall)
		b, mt, err := m.peers.FetchManifest(fctx, c.URL, dgst)
		cancel()
		if err != nil {
			log.G(ctx).WithError(err).WithField("peer", c.Node).Info("peer failed to serve manifest")
			continue
		}
		m.requests.WithLabelValues("manifest", "hit").Inc()
		m.bytes.WithLabelValues(c.Node).Add(float64(len(b)))
		if m.locateChildren && r.Method == http.MethodGet {
			m.locateChildrenOf(ctx, b)
		}
		m.downloads.start(dgst, int64(len(b)))
		m.downloads.finish(dgst, map[string]int64{c.Node: int64(len(b))}, 0, nil)
		w.Header().Set("Content-Type", mt)
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Header().Set("Docker-Content-Digest", dgst.String())
		if r.Method == http.MethodGet {
			_, _ = w.Write(b)
		}
		return
	}
	m.requests.WithLabelValues("manifest", "miss").Inc()
	writeOCIError(ctx, w, http.StatusNotFound, peers.CodeManifestUnknown, "no peer holds this manifest")
}

// locateChildrenOf asks the resolver (which remembers the answers) where
// the children of manifest b are; a failure only means no claims.
func (m *Mirror) locateChildrenOf(ctx context.Context, b []byte) {
	children := content.ManifestChildren(b)
	if len(children) == 0 {
		return
	}
	dgsts := make([]digest.Digest, 0, len(children))
	for _, c := range children {
		dgsts = append(dgsts, c.Digest)
	}
	lctx, cancel := context.WithTimeout(ctx, m.stall)
	defer cancel()
	if _, err := m.resolver.Locate(lctx, dgsts); err != nil {
		log.G(ctx).WithError(err).Debug("locate a manifest's children")
	}
}

// writeOCIError answers with the OCI distribution error body, through the
// peer server's single error writer.
func writeOCIError(ctx context.Context, w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Cache-Control", "no-store")
	peers.WriteError(ctx, w, &peers.Error{Status: status, Code: code, Err: errors.New(msg)})
}
