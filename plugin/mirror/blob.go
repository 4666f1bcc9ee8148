package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// LocalStore is the node's own content store: the mirror lands every blob
// it fetches from peers there, verified, before containerd sees a byte.
type LocalStore interface {
	ctdcontent.Provider
	ctdcontent.Ingester
	// Abort discards an ingest.
	Abort(ctx context.Context, ref string) error
	// Info returns the blob's info. If the content is not present,
	// ErrNotFound is returned.
	Info(ctx context.Context, dgst digest.Digest) (ctdcontent.Info, error)
}

// parseRangeStart reads "bytes=N-" (the only form containerd sends). ok is
// false for any other form.
func parseRangeStart(h string) (int64, bool) {
	s, found := strings.CutPrefix(h, "bytes=")
	if !found {
		return 0, false
	}
	start, end, found := strings.Cut(s, "-")
	if !found || end != "" {
		return 0, false
	}
	n, err := strconv.ParseInt(start, 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// serveBlob serves a blob by digest. A blob already in the local store is
// served from it. Otherwise the blob is fetched from its candidates into the
// local store, verified by digest there, and only then sent: containerd never
// receives a byte a peer corrupted. When that takes long, headers go out
// first (containerd gives up on a host that sends no headers for 30 s); if
// the fetch then fails, the connection is cut before any body byte, and
// containerd's retry of the same range gets 404 and goes to the registry.
func (m *Mirror) serveBlob(ctx context.Context, w http.ResponseWriter, r *http.Request, dgst digest.Digest) {
	var offset int64
	if h := r.Header.Get("Range"); h != "" {
		n, ok := parseRangeStart(h)
		if !ok {
			// Not a form containerd sends: let the registry handle it.
			m.requests.WithLabelValues("blob", "miss").Inc()
			writeOCIError(ctx, w, http.StatusNotFound, peers.CodeBlobUnknown, "unsupported range; ask the registry")
			return
		}
		offset = n
	}
	if info, err := m.store.Info(ctx, dgst); err == nil {
		m.requests.WithLabelValues("blob", "local").Inc()
		m.sendLocal(ctx, w, r, dgst, info.Size, offset, false)
		return
	}
	if m.recentlyFailed(dgst) {
		m.requests.WithLabelValues("blob", "failed").Inc()
		writeOCIError(ctx, w, http.StatusNotFound, peers.CodeBlobUnknown, "peer transfer failed; ask the registry")
		return
	}
	cs := m.candidates(ctx, dgst)
	if len(cs) == 0 {
		m.requests.WithLabelValues("blob", "miss").Inc()
		writeOCIError(ctx, w, http.StatusNotFound, peers.CodeBlobUnknown, "no peer holds this blob")
		return
	}
	size := cs[0].Size
	if offset > 0 && offset >= size {
		w.Header().Set("Content-Range", "bytes */"+strconv.FormatInt(size, 10))
		writeOCIError(ctx, w, http.StatusRequestedRangeNotSatisfiable, peers.CodeRangeInvalid, "range starts past the blob")
		return
	}
	if r.Method == http.MethodHead {
		m.requests.WithLabelValues("blob", "hit").Inc()
		setBlobHeaders(w, dgst, size, offset)
		w.WriteHeader(statusFor(offset))
		return
	}

	call := m.fetches.start(ctx, dgst, func(fctx context.Context) error {
		return m.fetch(fctx, dgst, size, cs)
	})
	headersSent := false
	timer := time.NewTimer(m.headerDelay)
	defer timer.Stop()
	var err error
wait:
	for {
		select {
		case <-call.done:
			err = call.err
			break wait
		case <-timer.C:
			// Keep containerd from giving up on us: headers now, body once
			// the blob is verified.
			setBlobHeaders(w, dgst, size, offset)
			w.WriteHeader(statusFor(offset))
			_ = http.NewResponseController(w).Flush()
			headersSent = true
		case <-ctx.Done():
			return
		}
	}
	if err != nil {
		m.markFailed(dgst)
		log.G(ctx).WithError(err).WithField("digest", dgst).Warn("no peer could serve the blob; the registry will")
		if !headersSent {
			m.requests.WithLabelValues("blob", "failed").Inc()
			writeOCIError(ctx, w, http.StatusNotFound, peers.CodeBlobUnknown, "no peer could serve this blob")
			return
		}
		m.requests.WithLabelValues("blob", "aborted").Inc()
		panic(http.ErrAbortHandler)
	}
	m.requests.WithLabelValues("blob", "hit").Inc()
	m.sendLocal(ctx, w, r, dgst, size, offset, headersSent)
}

func statusFor(offset int64) int {
	if offset > 0 {
		return http.StatusPartialContent
	}
	return http.StatusOK
}

func setBlobHeaders(w http.ResponseWriter, dgst digest.Digest, size, offset int64) {
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", dgst.String())
	h.Set("Content-Length", strconv.FormatInt(size-offset, 10))
	if offset > 0 {
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", offset, size-1, size))
	}
}

// sendLocal sends the blob from the local store from offset.
func (m *Mirror) sendLocal(ctx context.Context, w http.ResponseWriter, r *http.Request, dgst digest.Digest, size, offset int64, headersSent bool) {
	ra, err := m.store.ReaderAt(ctx, ocispec.Descriptor{Digest: dgst, Size: size})
	if err != nil {
		if headersSent {
			panic(http.ErrAbortHandler)
		}
		writeOCIError(ctx, w, http.StatusNotFound, peers.CodeBlobUnknown, "blob vanished from the local store")
		return
	}
	defer ra.Close()
	if ra.Size() != size || (offset > 0 && offset >= size) {
		if headersSent {
			panic(http.ErrAbortHandler)
		}
		w.Header().Set("Content-Range", "bytes */"+strconv.FormatInt(ra.Size(), 10))
		writeOCIError(ctx, w, http.StatusRequestedRangeNotSatisfiable, peers.CodeRangeInvalid, "range starts past the blob")
		return
	}
	if !headersSent {
		setBlobHeaders(w, dgst, size, offset)
		w.WriteHeader(statusFor(offset))
	}
	if r.Method == http.MethodHead {
		return
	}
	buf := make([]byte, 1<<20)
	if _, err := io.CopyBuffer(w, io.NewSectionReader(ra, offset, size-offset), buf); err != nil {
		log.G(ctx).WithError(err).Debug("containerd went away mid-blob")
		panic(http.ErrAbortHandler)
	}
}

// errStalled is returned when a peer sends nothing for the stall timeout.
var errStalled = errors.New("peer stalled")

// errTooSlow is returned when a peer sends less than the minimum rate over
// a whole stall window.
var errTooSlow = errors.New("peer too slow")

// fetchDeadline bounds a whole blob fetch: the time the blob takes at the
// minimum rate, and never less than 30 s.
func (m *Mirror) fetchDeadline(size int64) time.Duration {
	d := 30 * time.Second
	if m.minRate > 0 {
		d = max(d, time.Duration(float64(size)/float64(m.minRate)*float64(time.Second)))
	}
	return d
}

// fetch lands dgst in the local store from its candidates, with the
// multi-source downloader. The store verifies size and digest on commit. A
// striped blob that does not verify cannot tell which peer lied, so it is
// fetched again one peer at a time, which can.
func (m *Mirror) fetch(ctx context.Context, dgst digest.Digest, size int64, cands []peers.Candidate) error {
	// A swarm download spools its chunks besides the landing: twice the
	// blob on disk until it is verified.
	reserve := size
	if m.swarm {
		reserve *= 2
	}
	release, err := m.budget.Reserve(reserve)
	if err != nil {
		return fmt.Errorf("blob %s: %w", dgst, err)
	}
	defer release()
	// Bound the whole fetch, so peers that trickle just above the minimum
	// rate cannot hold containerd for ever.
	ctx, cancel := context.WithTimeout(ctx, m.fetchDeadline(size))
	defer cancel()
	m.noteLoads(cands)
	m.downloads.start(dgst, size)
	err = m.fetchStriped(ctx, dgst, size, cands)
	if err != nil {
		m.downloads.finish(dgst, nil, 0, err)
	}
	return err
}

// noteLoads feeds the loads the candidates reported to the estimates.
func (m *Mirror) noteLoads(cands []peers.Candidate) {
	for _, c := range cands {
		if c.Load != nil {
			m.downloader.Estimates().SetLoad(c.Node, c.Load.ActiveUploads, c.Load.MaxUploads)
		}
	}
}

func (m *Mirror) fetchStriped(ctx context.Context, dgst digest.Digest, size int64, cands []peers.Candidate) error {
	ref := "coop-mirror-" + dgst.Encoded()
	w, err := m.openWriter(ctx, ref, dgst, size)
	if w == nil {
		m.downloads.finish(dgst, map[string]int64{}, 0, err)
		return err // nil when committed meanwhile
	}
	st, err := m.downloader.Download(ctx, dgst, size, cands, w)
	if err == nil {
		err = w.Commit(ctx, size, dgst)
		w.Close()
		if err == nil || errdefs.IsAlreadyExists(err) {
			log.G(ctx).WithField("digest", dgst).WithField("bytes_by_node", st.BytesByNode).WithField("hedged", st.Hedged).Debug("blob landed from peers")
			m.downloads.finish(dgst, st.BytesByNode, st.Hedged, nil)
			return nil
		}
		log.G(ctx).WithError(err).WithField("bytes_by_node", st.BytesByNode).Warn("striped blob does not verify; fetching it one peer at a time")
		_ = m.store.Abort(context.WithoutCancel(ctx), ref)
		m.distrust(ctx, st)
		m.downloads.start(dgst, size)
		if err := m.fetchSequential(ctx, dgst, size, cands); err != nil {
			return err
		}
		m.downloads.finish(dgst, nil, 0, nil)
		return nil
	}
	w.Close()
	_ = m.store.Abort(context.WithoutCancel(ctx), ref)
	return err
}

// fetchSequential lands dgst from its candidates one peer at a time, the
// next one resuming at the offset where the last one failed. A blob that
// does not verify is discarded and fetched whole from the next candidate.
func (m *Mirror) fetchSequential(ctx context.Context, dgst digest.Digest, size int64, cands []peers.Candidate) error {
	cands = whole(cands) // a partial holder cannot serve a whole blob
	ref := "coop-mirror-" + dgst.Encoded()
	w, err := m.openWriter(ctx, ref, dgst, size)
	if w == nil {
		return err // nil when committed meanwhile
	}
	committed := false
	defer func() {
		if w != nil {
			w.Close()
		}
		if !committed {
			// Leave no partial ingest behind.
			_ = m.store.Abort(context.WithoutCancel(ctx), ref)
		}
	}()
	var errs []error
	var pos int64
	for _, c := range cands {
		n, err := m.copyFrom(ctx, w, c, dgst, pos, size)
		pos += n
		if err == nil && pos == size {
			err = w.Commit(ctx, size, dgst)
			if err == nil || errdefs.IsAlreadyExists(err) {
				committed = true
				return nil
			}
			// Corrupt data, from this peer or an earlier one: start over.
			log.G(ctx).WithError(err).WithField("peer", c.Node).Warn("blob from peers does not verify; discarded")
			w.Close()
			_ = m.store.Abort(ctx, ref)
			if w, err = m.openWriter(ctx, ref, dgst, size); w == nil {
				committed = err == nil // another fetch committed it
				return err
			}
			pos = 0
			errs = append(errs, fmt.Errorf("peer %s: %w", c.Node, errdefs.ErrDataLoss))
			continue
		}
		if err != nil {
			errs = append(errs, err)
			log.G(ctx).WithError(err).WithField("peer", c.Node).WithField("offset", pos).Info("peer failed; trying the next")
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return fmt.Errorf("blob %s: every candidate failed: %w", dgst, errors.Join(errs...))
}

// openWriter opens a fresh local writer for dgst. It returns a nil writer
// and a nil error when the blob got committed meanwhile.
func (m *Mirror) openWriter(ctx context.Context, ref string, dgst digest.Digest, size int64) (ctdcontent.Writer, error) {
	for {
		w, err := m.store.Writer(ctx, ctdcontent.WithRef(ref), ctdcontent.WithDescriptor(ocispec.Descriptor{Digest: dgst, Size: size}))
		if err == nil {
			if err := w.Truncate(0); err != nil {
				w.Close()
				return nil, fmt.Errorf("reset local writer: %w", err)
			}
			return w, nil
		}
		if errdefs.IsAlreadyExists(err) {
			return nil, nil
		}
		if !errdefs.IsUnavailable(err) {
			return nil, fmt.Errorf("open local writer: %w", err)
		}
		// Another writer of the same ref holds the lock.
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// copyFrom copies dgst from offset to size from the candidate into w, and
// returns the bytes written.
func (m *Mirror) copyFrom(ctx context.Context, w io.Writer, c peers.Candidate, dgst digest.Digest, offset, size int64) (int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	body, err := m.peers.Fetch(ctx, c.URL, dgst, offset, size)
	if err != nil {
		return 0, err
	}
	defer body.Close()
	buf := make([]byte, 1<<20)
	var n int64
	window, windowBytes := time.Now(), int64(0)
	for offset+n < size {
		k, rerr := m.readWithin(cancel, body, buf[:min(int64(len(buf)), size-offset-n)])
		windowBytes += int64(k)
		if el := time.Since(window); m.minRate > 0 && el >= m.stall {
			if float64(windowBytes) < float64(m.minRate)*el.Seconds() {
				return n, fmt.Errorf("peer %s at offset %d: %d bytes in %s: %w", c.Node, offset+n, windowBytes, el.Round(time.Millisecond), errTooSlow)
			}
			window, windowBytes = time.Now(), 0
		}
		if k > 0 {
			if _, werr := w.Write(buf[:k]); werr != nil {
				return n, fmt.Errorf("local write: %w", werr)
			}
			n += int64(k)
			m.bytes.WithLabelValues(c.Node).Add(float64(k))
			m.downloads.add(dgst, c.Node, k)
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) && offset+n == size {
				break
			}
			if errors.Is(rerr, io.EOF) {
				rerr = io.ErrUnexpectedEOF
			}
			return n, fmt.Errorf("peer %s at offset %d: %w", c.Node, offset+n, rerr)
		}
	}
	return n, nil
}

// readWithin reads from body, cutting the peer off when it sends nothing for
// the stall timeout.
func (m *Mirror) readWithin(cancel context.CancelFunc, body io.ReadCloser, p []byte) (int, error) {
	var stalled atomic.Bool
	timer := time.AfterFunc(m.stall, func() {
		stalled.Store(true)
		cancel()
		body.Close()
	})
	n, err := body.Read(p)
	if !timer.Stop() && stalled.Load() && n == 0 {
		return 0, errStalled
	}
	return n, err
}
