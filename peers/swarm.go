package peers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
)

// PartialFetcher also reads a peer's chunk map (Client does): a swarm
// download then takes chunks from peers still downloading the blob.
type PartialFetcher interface {
	RangeFetcher
	PartialStatus(ctx context.Context, baseURL string, dgst digest.Digest, size int64) (*PartialStatus, error)
}

// SwarmChunk is the chunk of a swarm download (at most): small enough that
// nodes starting one blob at once ask the source for different chunks,
// large enough that a request costs little. Every node must use the same
// to use each other's chunk maps.
const SwarmChunk = 1 << 20

// notYetBackoff is how long a peer that answered "not yet" for a chunk is
// not asked for it again.
const notYetBackoff = 300 * time.Millisecond

// swarm is one download in a swarm: chunks land in a spool file (a Partial
// that peers read) in any order, and the writer takes them in order.
//
// Which chunk a peer is asked for: a peer still downloading the blob
// serves the chunks it has (or is fetching: it answers once they arrive),
// the rarest first among the peers known, then at random; a peer holding
// the whole blob (the source) serves only the chunks no partial peer has
// or is fetching, at random, so that in a rollout every node asks the
// source for other chunks and each chunk leaves it about once. The writer's
// next chunk is hedged on another peer when its only attempt runs long.
type swarm struct {
	dl     *Downloader
	pf     PartialFetcher // nil: no partial peers
	dgst   digest.Digest
	size   int64
	opts   DownloadOptions
	est    *Estimates
	part   *Partial
	n      int
	window int

	mu       sync.Mutex
	cond     *sync.Cond
	peers    map[string]*swarmPeer
	order    []*swarmPeer
	attempts map[int][]*attempt // the attempts running, by chunk
	from     []string           // the peer each chunk came from
	next     int                // the writer's next chunk
	stats    DownloadStats
	done     bool
	active   int
	rng      *rand.Rand
	lastByte atomic.Int64 // unix nanoseconds of the last byte received
}

type swarmPeer struct {
	c              Candidate
	whole          bool
	have, fetching bitmap
	notYet         map[int]time.Time
	running        bool
	failed         error
}

// newSwarm starts a swarm download, or returns nil when dgst is being
// downloaded here already.
func newSwarm(dl *Downloader, dgst digest.Digest, size int64, cands []Candidate) (*swarm, error) {
	opts, err := dl.opts.forBlob(dgst, size, SwarmChunk)
	if err != nil {
		return nil, err
	}
	// Every node uses the same chunks; a chunk map stays within
	// MaxPartialChunks.
	chunk := max(min(opts.ChunkSize, SwarmChunk), MinPartialChunk, (size+MaxPartialChunks-1)/MaxPartialChunks)
	opts.ChunkSize = chunk
	ok := false
	for _, c := range cands {
		ok = ok || c.Size == size
	}
	if !ok {
		return nil, fmt.Errorf("blob %s: no candidate of size %d: %w", dgst, size, errdefs.ErrNotFound)
	}
	part, started, err := opts.Partials.Start(dgst, size, chunk)
	if err != nil || !started {
		return nil, err
	}
	n := part.Chunks()
	s := &swarm{dl: dl, dgst: dgst, size: size, opts: opts, est: opts.Estimates, part: part, n: n,
		window: max(int(opts.Buffer/chunk), 2),
		peers:  map[string]*swarmPeer{},
		from:   make([]string, n), attempts: map[int][]*attempt{},
		stats: DownloadStats{BytesByNode: map[string]int64{}, Failed: map[string]error{}},
		rng:   rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
	}
	s.pf, _ = dl.f.(PartialFetcher)
	s.lastByte.Store(time.Now().UnixNano())
	onBytes := opts.OnBytes
	s.opts.OnBytes = func(d digest.Digest, node string, n int) {
		s.lastByte.Store(time.Now().UnixNano())
		if onBytes != nil {
			onBytes(d, node, n)
		}
	}
	s.cond = sync.NewCond(&s.mu)
	s.mu.Lock()
	s.addLocked(cands)
	s.mu.Unlock()
	return s, nil
}

// addLocked adds the candidates not known yet (of the right size; partial
// ones only when their chunk maps can be read).
func (s *swarm) addLocked(cands []Candidate) {
	for _, c := range cands {
		if c.Size != s.size || (c.Partial && s.pf == nil) {
			continue
		}
		if p, ok := s.peers[c.Node]; ok {
			if !c.Partial && !p.whole && p.failed == nil {
				p.whole = true // it finished
			}
			continue
		}
		p := &swarmPeer{c: c, whole: !c.Partial, notYet: map[int]time.Time{}}
		if !p.whole {
			p.have, p.fetching = newBitmap(s.n), newBitmap(s.n)
		}
		s.peers[c.Node] = p
		s.order = append(s.order, p)
	}
}

func (s *swarm) run(ctx context.Context, w io.Writer) (DownloadStats, error) {
	defer s.part.End()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	// The partial peers known now: their chunk maps first, so that the
	// source is not asked for what they have.
	s.poll(ctx, s.opts.PartialPoll)
	s.mu.Lock()
	s.startWorkersLocked(ctx, &wg)
	s.mu.Unlock()
	wg.Go(func() { s.watch(ctx, &wg) })
	defer func() {
		s.mu.Lock()
		s.done = true
		s.cond.Broadcast()
		s.mu.Unlock()
		cancel()
		wg.Wait()
	}()
	buf := s.dl.getBuf(s.opts.ChunkSize)
	defer s.dl.putBuf(buf)
	for {
		s.mu.Lock()
		if s.next >= s.n {
			stats := s.statsLocked()
			s.mu.Unlock()
			return stats, nil
		}
		for !s.part.Has(s.next) && ctx.Err() == nil && !s.stuckLocked() {
			s.cond.Wait()
		}
		if !s.part.Has(s.next) {
			err := ctx.Err()
			if err == nil {
				err = s.failureLocked()
			}
			stats := s.statsLocked()
			s.mu.Unlock()
			return stats, err
		}
		i, from := s.next, s.from[s.next]
		s.mu.Unlock()
		off, n := s.part.Span(i)
		if _, err := s.part.ReadAt(buf[:n], off); err != nil {
			return s.lockedStats(), fmt.Errorf("spool of %s: %w", s.dgst, err)
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return s.lockedStats(), fmt.Errorf("local write: %w", err)
		}
		s.mu.Lock()
		s.stats.BytesByNode[from] += n
		s.next++
		s.cond.Broadcast()
		s.mu.Unlock()
	}
}

// stuckLocked says whether the download cannot go on: no worker left, or
// no byte arrived for twice the stall timeout (peers answering only "not
// yet", say).
func (s *swarm) stuckLocked() bool {
	return s.active == 0 || s.sinceByte() > 2*s.opts.Stall
}

// sinceByte is the time since the last byte arrived from any peer.
func (s *swarm) sinceByte() time.Duration {
	return time.Duration(time.Now().UnixNano() - s.lastByte.Load())
}

func (s *swarm) lockedStats() DownloadStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.statsLocked()
}

func (s *swarm) statsLocked() DownloadStats {
	st := s.stats.clone()
	for _, p := range s.order {
		if p.c.Partial {
			st.Partial = append(st.Partial, p.c.Node)
		}
	}
	return st
}

func (s *swarm) failureLocked() error {
	var errs []error
	for _, p := range s.order {
		if p.failed != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p.c.Node, p.failed))
		}
	}
	if len(errs) == 0 {
		errs = append(errs, fmt.Errorf("no chunk arrived for %v", 2*s.opts.Stall))
	}
	return fmt.Errorf("blob %s: %w: %w", s.dgst, ErrAllPeersFailed, errors.Join(errs...))
}

// startWorkersLocked starts a worker for every usable peer not running,
// up to MaxPeers running.
func (s *swarm) startWorkersLocked(ctx context.Context, wg *sync.WaitGroup) {
	for _, p := range s.order {
		if s.active >= s.opts.MaxPeers {
			return
		}
		if p.running || p.failed != nil {
			continue
		}
		p.running = true
		s.active++
		wg.Go(func() { s.worker(ctx, p, wg) })
	}
}

// watch reads the partial peers' chunk maps every PartialPoll, asks Refresh
// for more candidates every fourth time, and wakes idle workers.
func (s *swarm) watch(ctx context.Context, wg *sync.WaitGroup) {
	t := time.NewTicker(s.opts.PartialPoll)
	defer t.Stop()
	for tick := 1; ; tick++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// Others starting the blob at the same time show up after
		// the first tick.
		if s.opts.Refresh != nil && tick%4 == 1 {
			rctx, cancel := context.WithTimeout(ctx, 4*s.opts.PartialPoll)
			cands := s.opts.Refresh(rctx, s.dgst)
			cancel()
			s.mu.Lock()
			s.addLocked(cands)
			s.startWorkersLocked(ctx, wg)
			s.mu.Unlock()
		}
		s.poll(ctx, 4*s.opts.PartialPoll)
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	}
}

// poll reads every live partial peer's chunk map, at once, each within
// timeout.
func (s *swarm) poll(ctx context.Context, timeout time.Duration) {
	if s.pf == nil {
		return
	}
	s.mu.Lock()
	var ps []*swarmPeer
	for _, p := range s.order {
		if !p.whole && p.failed == nil {
			ps = append(ps, p)
		}
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, timeout)
			st, err := s.pf.PartialStatus(pctx, p.c.URL, s.dgst, s.size)
			cancel()
			s.mu.Lock()
			defer s.mu.Unlock()
			switch {
			case err != nil && errdefs.IsNotFound(err):
				// Its download ended without the blob: it failed there.
				p.have, p.fetching = newBitmap(s.n), newBitmap(s.n)
			case err != nil:
				// Unreachable now: its chunks are not counted on.
				p.fetching = newBitmap(s.n)
			case st.Whole:
				p.whole = true
			case st.ChunkSize != s.opts.ChunkSize:
				// Another chunk grid: its maps mean nothing here.
			default:
				p.have, p.fetching = bitmapFromBytes(st.Have, s.n), bitmapFromBytes(st.Fetching, s.n)
			}
		})
	}
	wg.Wait()
}

// holdersLocked counts the live partial peers that have chunk i or are
// fetching it.
func (s *swarm) holdersLocked(i int) int {
	k := 0
	for _, p := range s.order {
		if !p.whole && p.failed == nil && (p.have.has(i) || p.fetching.has(i)) {
			k++
		}
	}
	return k
}

// pickLocked returns the chunk peer p should fetch now, -1 for none, and
// whether it hedges an attempt running elsewhere.
func (s *swarm) pickLocked(p *swarmPeer) (int, bool) {
	if s.done {
		return -1, false
	}
	end := min(s.n, s.next+s.window)
	now := time.Now()
	// Nothing arrived for a while: the partial peers' chunks are not
	// counted on (their downloads may hang), the source serves any.
	starved := s.sinceByte() > s.opts.Stall
	var best []int
	bestScore := -1
	for i := s.next; i < end; i++ {
		if len(s.attempts[i]) > 0 || s.part.Has(i) {
			continue
		}
		var score int // higher is better
		if p.whole {
			if !starved && s.holdersLocked(i) > 0 {
				continue // a partial peer has it or soon will
			}
			score = 1
		} else {
			if t, ok := p.notYet[i]; ok && now.Sub(t) < notYetBackoff {
				continue
			}
			switch {
			case p.have.has(i):
				score = 2 * s.n
			case p.fetching.has(i):
				score = s.n
			default:
				continue
			}
			score -= s.holdersLocked(i) // the rarest first
		}
		switch {
		case score > bestScore:
			best, bestScore = append(best[:0], i), score
		case score == bestScore:
			best = append(best, i)
		}
	}
	if len(best) > 0 {
		return best[s.rng.IntN(len(best))], false
	}
	// Nothing to start: hedge the earliest chunk whose only attempt would
	// finish later than this peer could do it all (or, for the writer's
	// next chunk, runs longer than half the stall timeout).
	me := s.est.Get(p.c.Node)
	unknown := s.unknownRateLocked()
	for i := s.next; i < end; i++ {
		as := s.attempts[i]
		if len(as) != 1 || as[0].peer == p.c.Node || s.part.Has(i) || (!p.whole && !p.have.has(i)) {
			continue
		}
		a := as[0]
		_, n := s.part.Span(i)
		if i == s.next && now.Sub(a.started) > s.opts.Stall/2 {
			return i, true
		}
		mine := me.Completion(n, unknown)
		left := n - a.got.Load()
		var theirs time.Duration
		if bw := s.est.Get(a.peer).Bandwidth; bw > 0 {
			theirs = time.Duration(float64(left) / bw * float64(time.Second))
		} else if got, el := a.got.Load(), now.Sub(a.started); got > 0 {
			theirs = time.Duration(float64(left) / (float64(got) / el.Seconds()) * float64(time.Second))
		} else {
			theirs = max(el, s.opts.Stall/2) // nothing yet: assume slow
		}
		if theirs > mine*3/2 && theirs > 20*time.Millisecond {
			return i, true
		}
	}
	return -1, false
}

// unknownRateLocked is the rate assumed for an unmeasured peer: the best
// known, so that new peers get tried.
func (s *swarm) unknownRateLocked() float64 {
	best := 0.0
	for _, p := range s.order {
		best = max(best, s.est.Get(p.c.Node).Bandwidth)
	}
	if best == 0 {
		best = 100 << 20
	}
	return best
}

// worker fetches chunks from one peer until the blob is done or the peer
// fails.
func (s *swarm) worker(ctx context.Context, p *swarmPeer, wg *sync.WaitGroup) {
	s.est.begin(p.c.Node)
	defer s.est.end(p.c.Node)
	busyTries := 0 // busy answers in a row
	for {
		s.mu.Lock()
		i, hedge := s.pickLocked(p)
		for i < 0 && !s.done && ctx.Err() == nil {
			s.cond.Wait()
			i, hedge = s.pickLocked(p)
		}
		if i < 0 {
			s.active--
			p.running = false
			s.cond.Broadcast()
			s.mu.Unlock()
			return
		}
		actx, cancel := context.WithCancel(ctx)
		a := &attempt{peer: p.c.Node, started: time.Now(), cancel: cancel}
		s.attempts[i] = append(s.attempts[i], a)
		if hedge {
			s.stats.Hedged++
		}
		s.mu.Unlock()
		s.part.Fetching(i, true)

		off, n := s.part.Span(i)
		data, ttfb, err := s.dl.fetchRange(actx, p.c, s.dgst, s.size, off, n, s.opts, a)
		if err == nil && !s.part.Has(i) {
			err = s.part.Put(i, data)
			if err == nil {
				s.mu.Lock()
				s.from[i] = p.c.Node
				for _, other := range s.attempts[i] {
					if other != a {
						other.cancel() // a hedge lost
					}
				}
				s.mu.Unlock()
				s.est.Observe(p.c.Node, n, time.Since(a.started), ttfb)
			}
		}
		lost := err != nil && actx.Err() != nil && ctx.Err() == nil // cancelled: another attempt won
		cancel()
		s.dl.putBuf(data)

		s.mu.Lock()
		s.attempts[i] = slices.DeleteFunc(s.attempts[i], func(x *attempt) bool { return x == a })
		if len(s.attempts[i]) == 0 {
			delete(s.attempts, i)
			if !s.part.Has(i) {
				s.part.Fetching(i, false)
			}
		}
		if lost {
			err = nil
		}
		if err == nil {
			busyTries = 0
		}
		switch {
		case err == nil, s.done, ctx.Err() != nil:
			s.cond.Broadcast()
			s.mu.Unlock()
			continue
		case IsNotYet(err):
			p.notYet[i] = time.Now()
			s.cond.Broadcast()
			s.mu.Unlock()
			continue
		}
		var busy *BusyError
		if errors.As(err, &busy) && busyTries < maxBusyTries {
			busyTries++
			// In a burst the source is busy: that is no failure. Its
			// chunk goes to others meanwhile; ask it again later.
			s.stats.Busy++
			s.cond.Broadcast()
			s.mu.Unlock()
			waitBusy(ctx, busy)
			continue
		}
		// The peer failed: drop it for this blob, bring in another.
		p.failed, p.running = err, false
		s.stats.Failed[p.c.Node] = err
		s.active--
		s.startWorkersLocked(ctx, wg)
		s.cond.Broadcast()
		s.mu.Unlock()
		log.G(ctx).WithError(err).WithField("peer", p.c.Node).WithField("digest", s.dgst).Info("peer dropped for this blob")
		return
	}
}
