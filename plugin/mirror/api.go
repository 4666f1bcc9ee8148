package mirror

// The mirror's own API, on loopback beside the OCI endpoint: which peers hold
// a blob now (LocatePath, for coop locate), what the mirror downloaded
// (DownloadsPath) and the sources of a migration (SourcesPath), both for
// coop migrate.

import (
	"context"
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
	if m.sources == nil {
		peers.WriteError(ctx, w, fmt.Errorf("this mirror takes no migration sources: %w", errdefs.ErrNotFound))
		return
	}
	switch {
	case r.Method == http.MethodPost && r.URL.Path == SourcesPath:
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
		cancel := m.sources.Add(peers.Candidate{Node: req.Node, URL: srcURL}, req.Blobs)
		id := digest.FromString(fmt.Sprintf("%s %s %d", req.Node, req.URL, time.Now().UnixNano())).Encoded()[:16]
		m.srcMu.Lock()
		if m.srcClosed {
			m.srcMu.Unlock()
			cancel()
			peers.WriteError(ctx, w, errClosed)
			return
		}
		m.srcs[id] = migrationSource{cancel: cancel, ttl: time.AfterFunc(ttl, func() { m.dropSource(id) })}
		m.srcMu.Unlock()
		log.G(ctx).WithFields(log.Fields{"source": req.Node, "url": req.URL, "blobs": len(req.Blobs), "id": id}).Info("migration source added")
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(SourceResponse{ID: id})
	case r.Method == http.MethodDelete && strings.HasPrefix(r.URL.Path, SourcesPath+"/"):
		if !m.dropSource(strings.TrimPrefix(r.URL.Path, SourcesPath+"/")) {
			peers.WriteError(ctx, w, fmt.Errorf("no such source: %w", errdefs.ErrNotFound))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	default:
		w.Header().Set("Allow", "POST, DELETE")
		writeOCIError(ctx, w, http.StatusMethodNotAllowed, peers.CodeUnsupported, "POST "+SourcesPath+" or DELETE "+SourcesPath+"/ID")
	}
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
