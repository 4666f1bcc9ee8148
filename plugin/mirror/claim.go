package mirror

import (
	"context"
	"fmt"
	"io"
	"slices"

	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
)

var _ content.ClaimSource = (*Mirror)(nil)

// Claimable says whether the node knows, without asking the network, live
// peers holding dgst (the index of periodic and push modes, a migration's
// source, a recent locate), and the size they agree on. A blob whose peer
// transfer failed recently is not claimable.
func (m *Mirror) Claimable(dgst digest.Digest) (int64, bool) {
	if m.recentlyFailed(dgst) {
		return 0, false
	}
	cs := m.agreeOnSize(context.Background(), dgst, m.trusted(resolver.Known(m.resolver, []digest.Digest{dgst})[dgst]))
	if len(cs) == 0 || cs[0].Size > m.maxBlob {
		return 0, false
	}
	// A claim has no fallback inside its pull: only with a peer holding
	// the whole blob (partial ones then help).
	if !slices.ContainsFunc(cs, func(c peers.Candidate) bool { return !c.Partial }) {
		return 0, false
	}
	return cs[0].Size, true
}

// FetchClaim downloads a claimed blob from its peers into w, in order, with
// the multi-source downloader. It shows in /coop/v1/downloads like the
// mirror's fetches.
func (m *Mirror) FetchClaim(ctx context.Context, dgst digest.Digest, size int64, w io.Writer) error {
	cs := sized(m.agreeOnSize(ctx, dgst, m.trusted(resolver.Known(m.resolver, []digest.Digest{dgst})[dgst])), size)
	if len(cs) == 0 {
		// Forgotten since the claim (a neighbour expired): ask again.
		cs = sized(m.candidates(ctx, dgst), size)
	}
	if len(cs) == 0 {
		return fmt.Errorf("claimed blob %s: no peer holds it any more: %w", dgst, peers.ErrAllPeersFailed)
	}
	ctx, cancel := context.WithTimeout(ctx, m.fetchDeadline(size))
	defer cancel()
	m.noteLoads(cs)
	m.downloads.start(dgst, size)
	st, err := m.downloader.Download(ctx, dgst, size, cs, w)
	if err != nil {
		m.markFailed(dgst)
		m.downloads.finish(dgst, st.BytesByNode, st.Hedged, err)
		return fmt.Errorf("claimed blob %s: %w", dgst, err)
	}
	// Partial peers' chunks were verified by no one: when the claim does
	// not verify, they are not candidates for a while.
	if v, ok := w.(interface{ Verify() error }); ok && len(st.Partial) > 0 {
		if err := v.Verify(); err != nil {
			m.distrust(ctx, st)
			m.markFailed(dgst)
			m.downloads.finish(dgst, st.BytesByNode, st.Hedged, err)
			return err
		}
	}
	m.downloads.finish(dgst, st.BytesByNode, st.Hedged, nil)
	log.G(ctx).WithField("bytes_by_node", st.BytesByNode).WithField("hedged", st.Hedged).Debug("claimed blob downloaded")
	return nil
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
