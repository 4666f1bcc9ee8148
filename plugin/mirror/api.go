package mirror

// The mirror's own API, on loopback beside the OCI endpoint: which peers hold
// a blob now (LocatePath, for coop locate), what the mirror downloaded
// (DownloadsPath) and the sources of a migration (SourcesPath), both for
// coop migrate.
//
// Who may call what: the read-only endpoints (LocatePath, DownloadsPath,
// and the OCI endpoint itself) answer every local user, as the blobs they
// name are served to peers anyway. The write endpoints (POST and DELETE
// SourcesPath) make a URL a candidate for blobs the node then fetches and
// serves to containerd, so they need the node's API token
// (Options.APIToken, "Authorization: Bearer <token>"), compared in constant
// time; without it they answer 401. A request adds one source of at most
// MaxSourceBlobs blobs, for at most MaxSourceTTL, and the mirror holds at
// most MaxSources at once (429 beyond).

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
)

// DownloadsPath is where the mirror reports its blob downloads from peers,
// on loopback: coop migrate reads it for its progress and provenance.
const DownloadsPath = "/coop/v1/downloads"

// Download is what the mirror did for one blob.
type Download struct {
	Digest      digest.Digest    `json:"digest"`
	Size        int64            `json:"size"`
	BytesByNode map[string]int64 `json:"bytes_by_node"`
	Started     time.Time        `json:"started"`
	Seconds     float64          `json:"seconds"`
	Done        bool             `json:"done"`
	Failed      bool             `json:"failed,omitempty"`
	Hedged      int              `json:"hedged,omitempty"`
}

// downloads tracks recent blob downloads. It is safe for concurrent use.
type downloads struct {
	mu   sync.Mutex
	m    map[digest.Digest]*Download
	keep time.Duration
}

func newDownloads() *downloads {
	return &downloads{m: map[digest.Digest]*Download{}, keep: 30 * time.Minute}
}

func (t *downloads) start(dgst digest.Digest, size int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	for d, x := range t.m {
		if x.Done && now.Sub(x.Started) > t.keep {
			delete(t.m, d)
		}
	}
	t.m[dgst] = &Download{Digest: dgst, Size: size, BytesByNode: map[string]int64{}, Started: now}
}

func (t *downloads) add(dgst digest.Digest, node string, n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if x := t.m[dgst]; x != nil {
		x.BytesByNode[node] += int64(n)
	}
}

// finish records the end of a download; byNode, when not nil, replaces the
// running counts with the bytes actually written from each node (hedged
// duplicates left out).
func (t *downloads) finish(dgst digest.Digest, byNode map[string]int64, hedged int, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	x := t.m[dgst]
	if x == nil {
		return
	}
	if byNode != nil {
		x.BytesByNode = byNode
	}
	x.Done, x.Failed, x.Hedged = true, err != nil, hedged
	x.Seconds = time.Since(x.Started).Seconds()
}

// inFlight counts the downloads not done.
func (t *downloads) inFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, x := range t.m {
		if !x.Done {
			n++
		}
	}
	return n
}

// get returns copies of the downloads of dgsts (all when empty).
func (t *downloads) get(dgsts []digest.Digest) []Download {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Download
	emit := func(x *Download) {
		c := *x
		c.BytesByNode = make(map[string]int64, len(x.BytesByNode))
		for k, v := range x.BytesByNode {
			c.BytesByNode[k] = v
		}
		if !c.Done {
			c.Seconds = time.Since(c.Started).Seconds()
		}
		out = append(out, c)
	}
	if len(dgsts) == 0 {
		for _, x := range t.m {
			emit(x)
		}
		return out
	}
	for _, d := range dgsts {
		if x := t.m[d]; x != nil {
			emit(x)
		}
	}
	return out
}

// SourcesPath is where, on loopback, a migration makes its source node a
// candidate for the image's blobs: POST a SourceRequest, get a
// SourceResponse; DELETE SourcesPath/<id> when done.
const SourcesPath = "/coop/v1/sources"

// SourceRequest adds a candidate for some blobs, whatever the index says.
type SourceRequest struct {
	Node string `json:"node"`
	URL  string `json:"url"`
	// Blobs are the blobs the source holds, digest → size.
	Blobs map[digest.Digest]int64 `json:"blobs"`
	// TTLSeconds drops the source after this long if nobody deletes it
	// (a migration that died). Default 3600.
	TTLSeconds float64 `json:"ttl_seconds,omitempty"`
}

// Limits of SourcesPath.
const (
	// MaxSourceBlobs is the most blobs one SourceRequest may name (400
	// beyond).
	MaxSourceBlobs = 4096
	// MaxSources is the most sources the mirror holds at once: a request
	// beyond answers 429 until one is deleted or expires.
	MaxSources = 64
	// MaxSourceTTL is the longest SourceRequest.TTLSeconds (400 beyond).
	MaxSourceTTL = 24 * time.Hour
	// maxSourceNode bounds SourceRequest.Node.
	maxSourceNode = 253
)

// SourceResponse names an added source.
type SourceResponse struct {
	ID string `json:"id"`
}

func (m *Mirror) serveDownloads(ctx context.Context, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		writeOCIError(ctx, w, http.StatusMethodNotAllowed, peers.CodeUnsupported, "use GET")
		return
	}
	var dgsts []digest.Digest
	for _, d := range r.URL.Query()["digest"] {
		dgst, err := digest.Parse(d)
		if err != nil {
			peers.WriteError(ctx, w, fmt.Errorf("digest %q: %v: %w", d, err, errdefs.ErrInvalidArgument))
			return
		}
		dgsts = append(dgsts, dgst)
	}
	out := m.downloads.get(dgsts)
	if out == nil {
		out = []Download{}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func (m *Mirror) serveSources(ctx context.Context, w http.ResponseWriter, r *http.Request) {
	post := r.Method == http.MethodPost && r.URL.Path == SourcesPath
	del := r.Method == http.MethodDelete && strings.HasPrefix(r.URL.Path, SourcesPath+"/")
	if !post && !del {
		w.Header().Set("Allow", "POST, DELETE")
		writeOCIError(ctx, w, http.StatusMethodNotAllowed, peers.CodeUnsupported, "POST "+SourcesPath+" or DELETE "+SourcesPath+"/ID")
		return
	}
	if err := m.authorize(r); err != nil {
		w.Header().Set("WWW-Authenticate", `Bearer realm="coop mirror"`)
		peers.WriteError(ctx, w, &peers.Error{Status: http.StatusUnauthorized, Code: peers.CodeUnauthorized, Err: err})
		return
	}
	if m.sources == nil {
		peers.WriteError(ctx, w, fmt.Errorf("this mirror takes no migration sources: %w", errdefs.ErrNotFound))
		return
	}
	if del {
		if !m.dropSource(strings.TrimPrefix(r.URL.Path, SourcesPath+"/")) {
			peers.WriteError(ctx, w, fmt.Errorf("no such source: %w", errdefs.ErrNotFound))
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	var req SourceRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxLocateBody)).Decode(&req); err != nil {
		peers.WriteError(ctx, w, fmt.Errorf("bad source request: %v: %w", err, errdefs.ErrInvalidArgument))
		return
	}
	srcURL, err := peers.ParseBaseURL(req.URL)
	if err != nil {
		peers.WriteError(ctx, w, fmt.Errorf("source URL: %w", err))
		return
	}
	if req.Node == "" || len(req.Blobs) == 0 || req.TTLSeconds < 0 {
		peers.WriteError(ctx, w, fmt.Errorf("a source needs a node, a URL and blobs: %w", errdefs.ErrInvalidArgument))
		return
	}
	if len(req.Node) > maxSourceNode {
		peers.WriteError(ctx, w, fmt.Errorf("a node name of %d bytes, at most %d: %w", len(req.Node), maxSourceNode, errdefs.ErrInvalidArgument))
		return
	}
	if len(req.Blobs) > MaxSourceBlobs {
		peers.WriteError(ctx, w, fmt.Errorf("a source of %d blobs, at most %d a request: %w", len(req.Blobs), MaxSourceBlobs, errdefs.ErrInvalidArgument))
		return
	}
	if req.TTLSeconds > MaxSourceTTL.Seconds() {
		peers.WriteError(ctx, w, fmt.Errorf("a TTL of %g s, at most %g: %w", req.TTLSeconds, MaxSourceTTL.Seconds(), errdefs.ErrInvalidArgument))
		return
	}
	for d, size := range req.Blobs {
		if d.Validate() != nil || size < 0 {
			peers.WriteError(ctx, w, fmt.Errorf("blob %q size %d: %w", d, size, errdefs.ErrInvalidArgument))
			return
		}
	}
	ttl := time.Hour
	if req.TTLSeconds > 0 {
		ttl = time.Duration(req.TTLSeconds * float64(time.Second))
	}
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	id := hex.EncodeToString(b[:])
	m.srcMu.Lock()
	switch {
	case m.srcClosed:
		m.srcMu.Unlock()
		peers.WriteError(ctx, w, errClosed)
		return
	case len(m.srcs) >= MaxSources:
		m.srcMu.Unlock()
		peers.WriteError(ctx, w, &peers.Error{Status: http.StatusTooManyRequests, Code: peers.CodeTooManyRequests,
			Err: fmt.Errorf("the mirror holds %d migration sources, at most %d: delete one or wait for one to expire: %w", MaxSources, MaxSources, errdefs.ErrResourceExhausted)})
		return
	}
	cancel := m.sources.Add(peers.Candidate{Node: req.Node, URL: srcURL}, req.Blobs)
	m.srcs[id] = migrationSource{cancel: cancel, ttl: time.AfterFunc(ttl, func() { m.dropSource(id) })}
	m.srcMu.Unlock()
	log.G(ctx).WithFields(log.Fields{"source": req.Node, "url": srcURL, "blobs": len(req.Blobs), "id": id}).Info("migration source added")
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(SourceResponse{ID: id})
}

// authorize returns nil when r carries the mirror's API token, else an
// error of class errdefs.ErrUnauthenticated saying what is missing. The
// comparison takes the same time whatever the token sent.
func (m *Mirror) authorize(r *http.Request) error {
	if m.apiToken == "" {
		return fmt.Errorf("this mirror has no API token: its write endpoints are closed: %w", errdefs.ErrUnauthenticated)
	}
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return fmt.Errorf("want Authorization: Bearer and the node's mirror token: %w", errdefs.ErrUnauthenticated)
	}
	got, want := sha256.Sum256([]byte(tok)), sha256.Sum256([]byte(m.apiToken))
	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		return fmt.Errorf("wrong mirror token: %w", errdefs.ErrUnauthenticated)
	}
	return nil
}

// migrationSource is a source added through SourcesPath: cancel removes it
// from the candidates, ttl drops it if nobody does.
type migrationSource struct {
	cancel func()
	ttl    *time.Timer
}

func (m *Mirror) dropSource(id string) bool {
	m.srcMu.Lock()
	s, ok := m.srcs[id]
	delete(m.srcs, id)
	m.srcMu.Unlock()
	if ok {
		s.ttl.Stop()
		s.cancel()
	}
	return ok
}

// maxLocateBody bounds a locate question's body.
const maxLocateBody = 2 << 20

// serveLocate answers which candidates the node's resolver returns now, for
// operators (coop locate): POST a resolver.LocateRequest, or GET with
// ?digest=D&digest=D.
func (m *Mirror) serveLocate(ctx context.Context, w http.ResponseWriter, r *http.Request) {
	var req resolver.LocateRequest
	switch r.Method {
	case http.MethodGet:
		for _, d := range r.URL.Query()["digest"] {
			req.Digests = append(req.Digests, digest.Digest(d))
		}
	case http.MethodPost:
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxLocateBody)).Decode(&req); err != nil {
			peers.WriteError(ctx, w, fmt.Errorf("bad locate request: %v: %w", err, errdefs.ErrInvalidArgument))
			return
		}
	default:
		w.Header().Set("Allow", "GET, POST")
		writeOCIError(ctx, w, http.StatusMethodNotAllowed, peers.CodeUnsupported, "use GET or POST")
		return
	}
	if len(req.Digests) > resolver.MaxLocateDigests {
		peers.WriteError(ctx, w, fmt.Errorf("%d digests, at most %d: %w", len(req.Digests), resolver.MaxLocateDigests, errdefs.ErrInvalidArgument))
		return
	}
	got, err := m.resolver.Locate(ctx, req.Digests)
	if err != nil {
		if !errdefs.IsInvalidArgument(err) {
			// The operator wants to see why (a dead ClusterKB, say).
			err = &peers.Error{Status: http.StatusServiceUnavailable, Code: peers.CodeUnknown, Err: err}
		}
		peers.WriteError(ctx, w, err)
		return
	}
	if got == nil {
		got = map[digest.Digest][]peers.Candidate{}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(resolver.LocateResponse{Candidates: got})
}
