package peers

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

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

var _ InventoryView = (*content.Inventory)(nil)

const (
	// maxHaveBody bounds the body of a have request: MaxHaveDigests sha512
	// digests take about 1.4 MiB.
	maxHaveBody = 4 << 20
)

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
			return writeJSON(w, r, InventoryResponse{Node: s.node, Load: &l, Epoch: epoch, Seq: cur, Added: added, Removed: removed, Partial: s.partials.Blobs()})
		}
	}
	snap := s.inv.Snapshot()
	if snap.Blobs == nil {
		snap.Blobs = []content.Blob{}
	}
	l := s.Load()
	return writeJSON(w, r, InventoryResponse{Node: s.node, Load: &l, Epoch: snap.Epoch, Seq: snap.Seq, Full: true, Blobs: snap.Blobs, Partial: s.partials.Blobs()})
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
	var partial []content.Blob
	if s.partials != nil {
		held := make(map[digest.Digest]bool, len(blobs))
		for _, b := range blobs {
			held[b.Digest] = true
		}
		for _, d := range req.Digests {
			if p := s.partials.Get(d); p != nil && !held[d] {
				partial = append(partial, content.Blob{Digest: d, Size: p.Size()})
			}
		}
	}
	l := s.Load()
	return writeJSON(w, r, HaveResponse{Node: s.node, Load: &l, Epoch: epoch, Seq: seq, Blobs: blobs, Partial: partial})
}
