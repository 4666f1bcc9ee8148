package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/upstream"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
)

var _ content.ClaimSource = (*Mirror)(nil)

// RegistryNode names the registry in a download's bytes by node.
const RegistryNode = "(registry)"

// Claim decisions (coop_claim_decisions_total).
const (
	claimPeersRegistry = "peers_registry"
	claimPeers         = "peers" // two or more holders, or a registry not known to refuse coop
	claimRegistry      = "registry"
	claimNoFallback    = "no_fallback"
)

// errBadBytes marks a claim whose bytes did not verify.
var errBadBytes = errors.New("claimed bytes do not verify")

// Claimable says whether the node knows, without asking the network, where
// to fetch dgst from, and its size. Peers come from the index of periodic
// and push modes, a migration's source, or a recent locate, and must hold
// the whole blob; a blob whose peer transfer failed recently has none. With
// an Upstream, a claim must not fail where containerd could have fetched the
// blob: it needs the blob's registry as its fallback (then a blob no peer
// holds is claimed from the registry alone, its size from the manifest),
// or a second peer holding it whole, unless the registry is known to refuse
// coop (containerd, with credentials coop lacks, could fetch it there).
func (m *Mirror) Claimable(dgst digest.Digest) (int64, bool) {
	var cs []peers.Candidate
	if !m.recentlyFailed(dgst) {
		cs = m.agreeOnSize(context.Background(), dgst, m.trusted(resolver.Known(m.resolver, []digest.Digest{dgst})[dgst]))
	}
	holders := len(whole(cs))
	if len(cs) > 0 && cs[0].Size > m.maxBlob {
		holders = 0
	}
	if m.upstream == nil {
		// No fallback inside the pull: only with a peer holding the
		// whole blob (partial ones then help).
		if holders == 0 {
			return 0, false
		}
		return cs[0].Size, true
	}
	reach := m.upstream.Reach(dgst)
	reg := reach == upstream.Usable
	switch {
	case holders > 0 && reg:
		m.claimChoices.WithLabelValues(claimPeersRegistry).Inc()
		return cs[0].Size, true
	case holders >= 2 || (holders == 1 && reach != upstream.Denied):
		// Down: containerd could not fetch from it either. Checking:
		// the registry is the fallback if the check passes (FetchClaim
		// waits for it). Unknown (no pull named it: a migration): as
		// before the registry fallback.
		m.claimChoices.WithLabelValues(claimPeers).Inc()
		return cs[0].Size, true
	case holders == 1:
		m.claimChoices.WithLabelValues(claimNoFallback).Inc()
		return 0, false
	case reg && m.sizes != nil:
		size, ok := m.sizes.ExpectedSize(context.Background(), dgst)
		if !ok || size <= 0 || size > m.maxBlob {
			return 0, false
		}
		m.claimChoices.WithLabelValues(claimRegistry).Inc()
		return size, true
	}
	return 0, false
}

// FetchClaim downloads a claimed blob into w, in order: from its peers with
// the multi-source downloader, and when they fail (or none is left) from
// its registry, from where they stopped; when the bytes do not verify, it
// rewinds w and fetches the blob again from the registry. It shows in
// /coop/v1/downloads like the mirror's fetches.
func (m *Mirror) FetchClaim(ctx context.Context, dgst digest.Digest, size int64, w io.Writer) error {
	m.downloads.start(dgst, size)
	cw := &countingWriter{w: w}
	byNode, hedged, err := m.claimFromPeers(ctx, dgst, size, w, cw)
	if err != nil && m.upstream != nil && m.awaitReach(ctx, dgst) == upstream.Usable {
		var n int64
		n, err = m.claimFromRegistry(ctx, dgst, size, w, cw, err)
		if n > 0 {
			if byNode == nil {
				byNode = map[string]int64{}
			}
			byNode[RegistryNode] += n
		}
	}
	m.downloads.finish(dgst, byNode, hedged, err)
	return err
}

// awaitReach returns what coop knows of dgst's registry, waiting while its
// first check runs (a claim from one peer may be made before it ends; the
// peer may fail sooner), at most reachWait.
func (m *Mirror) awaitReach(ctx context.Context, dgst digest.Digest) upstream.Reach {
	deadline := time.Now().Add(reachWait)
	for {
		r := m.upstream.Reach(dgst)
		if r != upstream.Checking || time.Now().After(deadline) {
			return r
		}
		select {
		case <-ctx.Done():
			return r
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// reachWait bounds awaitReach: a registry check's own bound, and a little.
const reachWait = 20 * time.Second

// claimFromPeers downloads dgst from its peers into cw (whose writer is w),
// and verifies it when w can.
func (m *Mirror) claimFromPeers(ctx context.Context, dgst digest.Digest, size int64, w io.Writer, cw *countingWriter) (map[string]int64, int, error) {
	var cs []peers.Candidate
	if !m.recentlyFailed(dgst) {
		cs = sized(m.agreeOnSize(ctx, dgst, m.trusted(resolver.Known(m.resolver, []digest.Digest{dgst})[dgst])), size)
		if len(cs) == 0 {
			// Forgotten since the claim (a neighbour expired): ask again.
			cs = sized(m.candidates(ctx, dgst), size)
		}
	}
	if len(cs) == 0 {
		return nil, 0, fmt.Errorf("claimed blob %s: no peer holds it: %w", dgst, peers.ErrAllPeersFailed)
	}
	ctx, cancel := context.WithTimeout(ctx, m.fetchDeadline(size))
	defer cancel()
	m.noteLoads(cs)
	st, err := m.downloader.Download(ctx, dgst, size, cs, cw)
	if err != nil {
		m.markFailed(dgst)
		return st.BytesByNode, st.Hedged, fmt.Errorf("claimed blob %s: %w", dgst, err)
	}
	// Partial peers' chunks were verified by no one: when the claim does
	// not verify, they are not candidates for a while.
	if v, ok := w.(interface{ Verify() error }); ok {
		if err := v.Verify(); err != nil {
			m.distrust(ctx, st)
			m.markFailed(dgst)
			return st.BytesByNode, st.Hedged, fmt.Errorf("%w: %w", errBadBytes, err)
		}
	}
	log.G(ctx).WithField("bytes_by_node", st.BytesByNode).WithField("hedged", st.Hedged).Debug("claimed blob downloaded")
	return st.BytesByNode, st.Hedged, nil
}

// claimFromRegistry completes a claim its peers failed (peerErr) from the
// blob's registry: from where the peers stopped, or, when their bytes did
// not verify, from the start after rewinding w. It returns the bytes the
// registry sent.
func (m *Mirror) claimFromRegistry(ctx context.Context, dgst digest.Digest, size int64, w io.Writer, cw *countingWriter, peerErr error) (int64, error) {
	rw, canRewind := w.(interface{ Rewind() error })
	v, canVerify := w.(interface{ Verify() error })
	bad := errors.Is(peerErr, errBadBytes)
	reason := "failed"
	if bad {
		reason = "corrupt"
	}
	var total int64
	for {
		if bad {
			if !canRewind {
				return total, peerErr
			}
			if err := rw.Rewind(); err != nil {
				return total, errors.Join(peerErr, err)
			}
			cw.n = 0
		}
		from := cw.n
		log.G(ctx).WithError(peerErr).WithField("from", from).Warn("claimed blob: the peers failed; fetching it from its registry")
		n, err := m.copyFromRegistry(ctx, dgst, size, from, cw)
		total += n
		if err != nil {
			return total, fmt.Errorf("claimed blob %s: peers: %w; registry: %w", dgst, peerErr, err)
		}
		if !canVerify {
			m.claimFallbacks.WithLabelValues(reason).Inc()
			return total, nil
		}
		verr := v.Verify()
		if verr == nil {
			m.claimFallbacks.WithLabelValues(reason).Inc()
			return total, nil
		}
		if from == 0 {
			// The registry's own bytes: nothing left to try.
			return total, fmt.Errorf("claimed blob %s: the registry's bytes do not verify either: %w", dgst, verr)
		}
		// The peers' part was bad too: once more, all of it.
		peerErr, bad, reason = fmt.Errorf("%w: %w", errBadBytes, verr), true, "corrupt"
	}
}

// copyFromRegistry copies dgst's bytes from offset from its registry to w.
// A registry that sends nothing for 6 stall timeouts is cut off.
func (m *Mirror) copyFromRegistry(ctx context.Context, dgst digest.Digest, size, from int64, w io.Writer) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, m.fetchDeadline(size-from))
	defer cancel()
	idle := max(6*m.stall, 30*time.Second)
	watchdog := time.AfterFunc(idle, cancel)
	defer watchdog.Stop()
	rc, err := m.upstream.Fetch(ctx, dgst, size, from)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	buf := make([]byte, 1<<20)
	var n int64
	for n < size-from {
		k, rerr := rc.Read(buf[:min(int64(len(buf)), size-from-n)])
		if k > 0 {
			watchdog.Reset(idle)
			if _, werr := w.Write(buf[:k]); werr != nil {
				return n, werr
			}
			n += int64(k)
			m.downloads.add(dgst, RegistryNode, k)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if ctx.Err() != nil {
				return n, fmt.Errorf("registry sent nothing for %v or took too long: %w", idle, ctx.Err())
			}
			return n, rerr
		}
	}
	if n != size-from {
		return n, fmt.Errorf("registry sent %d of %d bytes: %w", n, size-from, errdefs.ErrDataLoss)
	}
	return n, nil
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// sized keeps the candidates reporting size.
func sized(cs []peers.Candidate, size int64) []peers.Candidate {
	var out []peers.Candidate
	for _, c := range cs {
		if c.Size == size {
			out = append(out, c)
		}
	}
	return out
}
