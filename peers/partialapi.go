package peers

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/containerd/errdefs"
)

// NotYetHeader marks a 503 answer to a ranged GET of a blob still
// downloading here whose chunks have not arrived in time: the client should
// ask again later, or elsewhere; the peer has not failed.
const NotYetHeader = "X-Coop-Not-Yet"

// CodeNotYet is the error code of a NotYetHeader answer.
const CodeNotYet = "NOT_YET"

// maxPartialWaiting bounds the requests of a server waiting for chunks;
// beyond it, chunks not here are answered "not yet" at once.
const maxPartialWaiting = 256

// servePartial answers a ranged GET of a blob being downloaded here: once
// every chunk of the range is here (waiting at most partialWait for those
// being fetched), from the spool file; otherwise 503 with NotYetHeader. A
// HEAD or a GET of the whole blob is answered 404: the blob is not here
// until it is whole and verified.
func (s *Server) servePartial(w http.ResponseWriter, r *http.Request, p *Partial) error {
	rh := r.Header.Get("Range")
	if r.Method != http.MethodGet || rh == "" {
		return newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "blob %s: still downloading here", p.Digest())
	}
	size := p.Size()
	start, length, err := parseByteRange(rh, size)
	if err != nil {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
		return err
	}
	first, last := int(start/p.ChunkSize()), int((start+length-1)/p.ChunkSize())
	wait := s.partialWait
	// Requests waiting for chunks hold no upload slot: bound them too.
	if n := s.waiting.Add(1); n > maxPartialWaiting {
		wait = 0
	}
	defer s.waiting.Add(-1)
	wctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	for i := first; i <= last; i++ {
		if err := p.Wait(wctx, i); err != nil {
			s.metrics.partial.WithLabelValues("not_yet").Inc()
			w.Header().Set(NotYetHeader, "1")
			w.Header().Set("Retry-After", "1")
			return newError(http.StatusServiceUnavailable, CodeNotYet, errdefs.ErrUnavailable, "blob %s bytes %d-%d: chunk %d is not here yet", p.Digest(), start, start+length-1, i)
		}
	}
	release, err := s.acquireUpload(w, r)
	if err != nil {
		return err
	}
	defer release()
	f, err := p.Open()
	if err != nil {
		return fmt.Errorf("open spool of %s: %w", p.Digest(), err)
	}
	defer f.Close()
	s.metrics.partial.WithLabelValues("served").Inc()
	h := w.Header()
	h.Set("Docker-Content-Digest", p.Digest().String())
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", strconv.FormatInt(length, 10))
	h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, start+length-1, size))
	w.WriteHeader(http.StatusPartialContent)
	return s.sendBody(w, p.Digest(), f, start, length)
}

// servePartialStatus answers GET PartialPath/<digest>: the chunks of a blob
// being downloaded here, or Whole when it is here verified, or 404.
func (s *Server) servePartialStatus(w http.ResponseWriter, r *http.Request, ref string) error {
	dgst, err := parseDigest(ref)
	if err != nil {
		return err
	}
	if info, err := s.store.Info(r.Context(), dgst); err == nil {
		return writeJSON(w, r, PartialStatus{Node: s.node, Digest: dgst, Size: info.Size, Whole: true})
	} else if !errdefs.IsNotFound(err) {
		return fmt.Errorf("blob %s info: %w", dgst, err)
	}
	p := s.partials.Get(dgst)
	if p == nil {
		return newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "blob %s: not here, not downloading", dgst)
	}
	return writeJSON(w, r, p.Status(s.node))
}

// NotYetError is a peer's answer that the chunks asked for have not arrived
// there yet (NotYetHeader).
type NotYetError struct {
	Peer string
}

func (e *NotYetError) Error() string {
	return fmt.Sprintf("peer %s: not yet", e.Peer)
}

// Unwrap classes it as unavailable.
func (e *NotYetError) Unwrap() error { return errdefs.ErrUnavailable }

// IsNotYet says whether err is a NotYetError.
func IsNotYet(err error) bool {
	var ny *NotYetError
	return errors.As(err, &ny)
}
