package peers

import (
	"context"
	// Registered so that sha256 and sha512 digests are available to go-digest.
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
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

var _ BlobStore = (*content.Store)(nil)

const (
	// copyBufferSize is the buffer a blob is streamed through.
	copyBufferSize = 1 << 20
)

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
			if p := s.partials.Get(dgst); p != nil {
				return s.servePartial(w, r, p)
			}
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
		release, err := s.acquireUpload(w, r)
		if err != nil {
			return err
		}
		defer release()
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

	return s.sendBody(w, dgst, ra, start, length)
}

// sendBody sends length bytes of dgst from ra at start, the answer's
// headers written.
func (s *Server) sendBody(w http.ResponseWriter, dgst digest.Digest, ra io.ReaderAt, start, length int64) error {
	s.metrics.activeUploads.Inc()
	defer s.metrics.activeUploads.Dec()
	buf := s.bufs.Get().(*[]byte)
	defer s.bufs.Put(buf)
	// Counted as it goes, so the metric shows a transfer in progress; cut
	// when the client takes nothing for writeStall.
	out := &servedCounter{w: NewStallWriter(w, s.writeStall), c: s.metrics.servedBytes, n: &s.sent}
	n, err := io.CopyBuffer(out, io.NewSectionReader(ra, start, length), *buf)
	if err != nil {
		return fmt.Errorf("send blob %s after %d bytes: %w", dgst, n, err)
	}
	if n != length {
		return fmt.Errorf("blob %s ended after %d of %d bytes: %w", dgst, n, length, io.ErrUnexpectedEOF)
	}
	return nil
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
