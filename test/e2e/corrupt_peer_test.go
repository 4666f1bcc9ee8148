//go:build integration

package e2e

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
)

// corruptPeer is a lying neighbour: its /coop/v1/have claims every digest
// asked (with the image's real size when it knows it), and it serves random
// bytes of that size for any blob or manifest, consistent across Range
// requests so that only the digest can tell.
type corruptPeer struct {
	srv   *httptest.Server
	sizes map[digest.Digest]int64

	haves, gets, bytesOut atomic.Int64
}

func startCorruptPeer(t *testing.T, img *harness.Image) *corruptPeer {
	t.Helper()
	p := &corruptPeer{sizes: map[digest.Digest]int64{}}
	for _, b := range img.Blobs() {
		p.sizes[b.Digest] = b.Size
	}
	p.srv = httptest.NewServer(http.HandlerFunc(p.serveHTTP))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *corruptPeer) URL() string { return p.srv.URL }

func (p *corruptPeer) counts() (haves, gets, bytesOut int64) {
	return p.haves.Load(), p.gets.Load(), p.bytesOut.Load()
}

func (p *corruptPeer) size(d digest.Digest) int64 {
	if s, ok := p.sizes[d]; ok {
		return s
	}
	return 1 << 20
}

type lieBlob struct {
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
}

func (p *corruptPeer) serveHTTP(w http.ResponseWriter, r *http.Request) {
	answer := func(blobs []lieBlob) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"node": "evil", "epoch": "e1", "seq": 1, "blobs": blobs})
	}
	switch {
	case r.URL.Path == "/healthz" || r.URL.Path == "/v2/" || r.URL.Path == "/v2":
		w.WriteHeader(http.StatusOK)
	case r.URL.Path == "/coop/v1/have" && r.Method == http.MethodPost:
		p.haves.Add(1)
		var req struct {
			Digests []digest.Digest `json:"digests"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var blobs []lieBlob
		for _, d := range req.Digests {
			blobs = append(blobs, lieBlob{d, p.size(d)})
		}
		answer(blobs)
	case r.URL.Path == "/coop/v1/inventory":
		var blobs []lieBlob
		for d, s := range p.sizes {
			blobs = append(blobs, lieBlob{d, s})
		}
		answer(blobs)
	case strings.HasPrefix(r.URL.Path, "/v2/") && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		i := strings.LastIndex(r.URL.Path, "/")
		d, err := digest.Parse(r.URL.Path[i+1:])
		if err != nil || (!strings.Contains(r.URL.Path, "/blobs/") && !strings.Contains(r.URL.Path, "/manifests/")) {
			http.NotFound(w, r)
			return
		}
		if r.Method == http.MethodGet {
			p.gets.Add(1)
		}
		var seed [32]byte
		copy(seed[:], d.Encoded())
		binary.LittleEndian.PutUint64(seed[:], uint64(p.size(d)))
		junk := make([]byte, p.size(d))
		_, _ = rand.NewChaCha8(seed).Read(junk)
		w.Header().Set("Docker-Content-Digest", d.String()) // the lie
		w.Header().Set("Content-Type", "application/octet-stream")
		cw := &countWriter{ResponseWriter: w}
		http.ServeContent(cw, r, "", time.Time{}, bytes.NewReader(junk))
		p.bytesOut.Add(cw.n)
	default:
		http.NotFound(w, r)
	}
}

type countWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}
