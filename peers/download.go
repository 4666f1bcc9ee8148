package peers

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
)

// RangeFetcher opens a byte range of a blob at a peer (Client does).
type RangeFetcher interface {
	FetchRange(ctx context.Context, baseURL string, dgst digest.Digest, offset, length, size int64) (io.ReadCloser, error)
}

// Selection policies (--policy).
const (
	// PolicyFirst takes the first candidate found, the next on failure: the
	// original design.
	PolicyFirst = "first"
	// PolicyRandom takes one candidate at random.
	PolicyRandom = "random"
	// PolicyLeastLoaded takes the candidate with the fewest uploads.
	PolicyLeastLoaded = "least-loaded"
	// PolicyFastest takes the candidate with the earliest estimated
	// completion.
	PolicyFastest = "fastest"
	// PolicyStripe downloads from every useful candidate at once.
	PolicyStripe = "stripe"
)

// Policies lists the policies, default first.
var Policies = []string{PolicyStripe, PolicyFirst, PolicyRandom, PolicyLeastLoaded, PolicyFastest}

// DownloadOptions configure a Download.
type DownloadOptions struct {
	// Policy chooses the candidates; default PolicyStripe.
	Policy string
	// ChunkSize is the size of one ranged request. Default 4 MiB; a
	// peer's first chunk is a quarter of it, to seed its estimate early.
	ChunkSize int64
	// Buffer bounds the bytes fetched ahead of the writer (memory).
	// Default 64 MiB; at least two chunks.
	Buffer int64
	// MaxPeers bounds the peers striped at once. Default 8.
	MaxPeers int
	// Stall cuts a peer that sends nothing for this long. Default 5s.
	Stall time.Duration
	// MinRate cuts a peer sending less than this many bytes/s over a
	// Stall window. Default 64 KiB/s; negative disables.
	MinRate int64
	// Estimates are read and updated; nil keeps them for this blob only.
	Estimates *Estimates
	// OnBytes, if set, is called with every n bytes of dgst received from node
	// (hedged duplicates included).
	OnBytes func(dgst digest.Digest, node string, n int)
	// Partials, when set, make every download a swarm member (see
	// Partials): its chunks (of ChunkSize) are spooled there, where peers
	// can take them before the blob is whole, and candidates marked
	// Partial serve it the chunks they have. nil: no swarm.
	Partials *Partials
	// Refresh, when set with Partials, is asked now and then during a
	// download for the blob's candidates again: partial holders appear as
	// other nodes start the same blob.
	Refresh func(ctx context.Context, dgst digest.Digest) []Candidate
	// PartialPoll is how often a swarm download reads its partial peers'
	// chunk maps. Default 250ms; Refresh is asked every fourth time.
	PartialPoll time.Duration
	// MaxSize bounds the size of a blob downloaded: a larger size, which
	// only a broken or hostile peer would report, fails with
	// ErrInvalidArgument before anything is planned. Default
	// DefaultMaxBlobSize.
	MaxSize int64
}

// DefaultMaxBlobSize is the default DownloadOptions.MaxSize.
const DefaultMaxBlobSize = 64 << 30

// DownloadStats tell how a download went.
type DownloadStats struct {
	// BytesByNode counts the bytes written to w from each peer.
	BytesByNode map[string]int64
	// Hedged counts chunks re-issued to a faster peer.
	Hedged int
	// Failed holds why each dropped peer was dropped.
	Failed map[string]error
	// Partial names the peers that served as partial holders (a swarm):
	// their chunks were not verified by anyone.
	Partial []string
	// Busy counts the answers 429 waited out (a busy peer is asked again
	// after its Retry-After, maxBusyTries times in a row).
	Busy int
}

// hedgeCheck is how often idle peers look for a chunk to hedge.
const hedgeCheck = 50 * time.Millisecond

// ErrAllPeersFailed is returned when no candidate could finish the blob.
var ErrAllPeersFailed = errors.New("every candidate failed")

// Downloader downloads blobs from peers. One value serves a node: it keeps
// the chunk buffers for reuse. It is safe for concurrent use.
type Downloader struct {
	f    RangeFetcher
	opts DownloadOptions
	pool sync.Pool
}

// NewDownloader returns a Downloader fetching through f with opts as the
// defaults of every download.
func NewDownloader(f RangeFetcher, opts DownloadOptions) (*Downloader, error) {
	if f == nil {
		return nil, fmt.Errorf("downloader needs a fetcher: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Policy != "" && !slices.Contains(Policies, opts.Policy) {
		return nil, fmt.Errorf("policy %q: want one of %v: %w", opts.Policy, Policies, errdefs.ErrInvalidArgument)
	}
	if opts.MaxSize < 0 {
		return nil, fmt.Errorf("download max size %d: %w", opts.MaxSize, errdefs.ErrInvalidArgument)
	}
	if opts.Estimates == nil {
		opts.Estimates = NewEstimates()
	}
	return &Downloader{f: f, opts: opts}, nil
}

// Estimates returns the downloader's per-peer estimates.
func (dl *Downloader) Estimates() *Estimates { return dl.opts.Estimates }

// Download writes the blob dgst of size bytes to w, in order, fetching it
// from the candidates as the policy says. With PolicyStripe every chosen
// peer is kept busy with chunks in proportion to its throughput (a shared
// queue: faster peers come back for more), a straggling chunk is re-issued
// to a faster idle peer (first answer wins), and at most Buffer bytes wait
// for the writer. A peer that errors, stalls, answers 429 or sends a short
// body is dropped for this blob and its chunk goes back to the queue. The
// caller verifies the digest (the content store does on commit).
//
// Chunks are planned as the window moves, so memory does not grow with size.
// A size of 0 or less, or above MaxSize, fails with ErrInvalidArgument; no
// candidate of that size, with ErrNotFound.
func (dl *Downloader) Download(ctx context.Context, dgst digest.Digest, size int64, cands []Candidate, w io.Writer) (DownloadStats, error) {
	if dl.opts.Partials != nil && (dl.opts.Policy == "" || dl.opts.Policy == PolicyStripe) {
		if s, err := newSwarm(dl, dgst, size, cands); err != nil {
			return DownloadStats{}, err
		} else if s != nil {
			return s.run(ctx, w)
		}
		// Downloading here already: without a spool.
	}
	whole := make([]Candidate, 0, len(cands))
	for _, c := range cands {
		if !c.Partial {
			whole = append(whole, c)
		}
	}
	d, err := newDownload(dl, dgst, size, whole, dl.opts)
	if err != nil {
		return DownloadStats{}, err
	}
	return d.run(ctx, w)
}

type download struct {
	dl    *Downloader
	f     RangeFetcher
	dgst  digest.Digest
	size  int64
	opts  DownloadOptions
	est   *Estimates
	order []Candidate // by preference
	par   int         // peers active at once

	mu      sync.Mutex
	cond    *sync.Cond
	next    int64    // offset of the first byte not yet in a chunk
	planned int      // chunks planned so far
	live    []*chunk // planned chunks not yet written, by offset
	retry   []*chunk // live chunks whose peer failed, waiting for another, by offset
	written int64    // bytes handed to the writer
	active  int      // workers running
	nextC   int      // next candidate in order to start
	stats   DownloadStats
	done    bool // the writer finished or gave up
}

type chunk struct {
	off, n   int64
	data     []byte
	from     string
	ok       bool
	attempts map[*attempt]struct{}
}

type attempt struct {
	peer    string
	started time.Time
	got     atomic.Int64
	cancel  context.CancelFunc
}

// forBlob returns o with its unset fields at their defaults (chunk the
// default chunk size), or ErrInvalidArgument for a blob of size that cannot
// be downloaded: 0 or less, or above MaxSize.
func (o DownloadOptions) forBlob(dgst digest.Digest, size, chunk int64) (DownloadOptions, error) {
	if size <= 0 {
		return o, fmt.Errorf("download of a %d-byte blob: %w", size, errdefs.ErrInvalidArgument)
	}
	if o.MaxSize <= 0 {
		o.MaxSize = DefaultMaxBlobSize
	}
	if size > o.MaxSize {
		return o, fmt.Errorf("blob %s: size %d is above the maximum %d: %w", dgst, size, o.MaxSize, errdefs.ErrInvalidArgument)
	}
	if o.Policy == "" {
		o.Policy = PolicyStripe
	}
	if o.ChunkSize <= 0 {
		o.ChunkSize = chunk
	}
	if o.Buffer <= 0 {
		o.Buffer = 64 << 20
	}
	if o.MaxPeers <= 0 {
		o.MaxPeers = 8
	}
	if o.Stall <= 0 {
		o.Stall = 5 * time.Second
	}
	if o.MinRate == 0 {
		o.MinRate = 64 << 10
	}
	if o.PartialPoll <= 0 {
		o.PartialPoll = 250 * time.Millisecond
	}
	if o.Estimates == nil {
		o.Estimates = NewEstimates()
	}
	return o, nil
}

func newDownload(dl *Downloader, dgst digest.Digest, size int64, cands []Candidate, opts DownloadOptions) (*download, error) {
	opts, err := opts.forBlob(dgst, size, 4<<20)
	if err != nil {
		return nil, err
	}
	opts.Buffer = max(opts.Buffer, 2*opts.ChunkSize)
	est := opts.Estimates
	d := &download{dl: dl, f: dl.f, dgst: dgst, size: size, opts: opts, est: est,
		stats: DownloadStats{BytesByNode: map[string]int64{}, Failed: map[string]error{}}}
	d.cond = sync.NewCond(&d.mu)
	seen := map[string]bool{}
	for _, c := range cands {
		if c.Size == size && !seen[c.Node] {
			seen[c.Node] = true
			d.order = append(d.order, c)
		}
	}
	if len(d.order) == 0 {
		return nil, fmt.Errorf("blob %s: no candidate of size %d: %w", dgst, size, errdefs.ErrNotFound)
	}
	d.par = 1
	switch opts.Policy {
	case PolicyFirst:
	case PolicyRandom:
		rand.Shuffle(len(d.order), func(i, j int) { d.order[i], d.order[j] = d.order[j], d.order[i] })
	case PolicyLeastLoaded:
		slices.SortStableFunc(d.order, func(a, b Candidate) int {
			ea, eb := est.Get(a.Node), est.Get(b.Node)
			return (ea.Active + ea.InUse) - (eb.Active + eb.InUse)
		})
	case PolicyFastest, PolicyStripe:
		unknown := d.unknownRate()
		slices.SortStableFunc(d.order, func(a, b Candidate) int {
			ta, tb := est.Get(a.Node).Completion(size, unknown), est.Get(b.Node).Completion(size, unknown)
			return int(ta - tb)
		})
		if opts.Policy == PolicyStripe {
			d.par = min(len(d.order), opts.MaxPeers)
		}
	default:
		return nil, fmt.Errorf("policy %q: want one of %v: %w", opts.Policy, Policies, errdefs.ErrInvalidArgument)
	}
	return d, nil
}

// planLocked returns the next chunk of the blob, or nil when the blob is
// all planned or the chunk would end beyond end. The first few chunks are
// small, to measure every peer early.
func (d *download) planLocked(end int64) *chunk {
	if d.next >= d.size {
		return nil
	}
	n := d.opts.ChunkSize
	if d.planned < d.par && d.par > 1 {
		n = max(d.opts.ChunkSize/4, 64<<10)
	}
	n = min(n, d.size-d.next)
	if d.next+n > end {
		return nil
	}
	ch := &chunk{off: d.next, n: n, attempts: map[*attempt]struct{}{}}
	d.next += n
	d.planned++
	d.live = append(d.live, ch)
	return ch
}

// unknownRate is the rate assumed for an unmeasured peer: the best known,
// so that new peers get tried.
func (d *download) unknownRate() float64 {
	best := 0.0
	for _, c := range d.order {
		best = max(best, d.est.Get(c.Node).Bandwidth)
	}
	if best == 0 {
		best = 100 << 20
	}
	return best
}

func (d *download) run(ctx context.Context, w io.Writer) (DownloadStats, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	d.mu.Lock()
	for d.nextC < d.par {
		d.startLocked(ctx, &wg)
	}
	d.mu.Unlock()
	if d.par > 1 {
		// Idle peers look again now and then for a straggler to hedge:
		// nothing else wakes them while a slow peer crawls.
		wg.Go(func() {
			t := time.NewTicker(hedgeCheck)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					d.cond.Broadcast()
				}
			}
		})
	}
	defer func() {
		d.mu.Lock()
		d.done = true
		for _, c := range d.live {
			for a := range c.attempts {
				a.cancel()
			}
		}
		d.cond.Broadcast()
		d.mu.Unlock()
		cancel()
		wg.Wait()
	}()
	for {
		// The chunk at the writer's offset is the first live one, once a
		// peer has taken it.
		d.mu.Lock()
		if d.written >= d.size {
			d.mu.Unlock()
			break
		}
		for (len(d.live) == 0 || !d.live[0].ok) && d.active > 0 && ctx.Err() == nil {
			d.cond.Wait()
		}
		if len(d.live) == 0 || !d.live[0].ok {
			err := ctx.Err()
			if err == nil {
				err = d.failureLocked()
			}
			stats := d.statsLocked()
			d.mu.Unlock()
			return stats, err
		}
		c := d.live[0]
		d.live[0] = nil
		d.live = d.live[1:]
		data, from := c.data, c.from
		c.data = nil
		d.mu.Unlock()
		if _, err := w.Write(data); err != nil {
			d.dl.putBuf(data)
			// The workers still run: copy the stats under their lock.
			d.mu.Lock()
			stats := d.statsLocked()
			d.mu.Unlock()
			return stats, fmt.Errorf("local write: %w", err)
		}
		d.dl.putBuf(data)
		d.mu.Lock()
		d.written = c.off + c.n
		d.stats.BytesByNode[from] += c.n
		d.cond.Broadcast()
		d.mu.Unlock()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.statsLocked(), nil
}

// statsLocked returns a copy of the stats (d.mu held): the workers go on
// updating d.stats until run returns.
func (d *download) statsLocked() DownloadStats {
	return d.stats.clone()
}

// clone returns a copy of st that shares nothing with it.
func (st DownloadStats) clone() DownloadStats {
	c := st
	c.BytesByNode, c.Failed = maps.Clone(st.BytesByNode), maps.Clone(st.Failed)
	c.Partial = slices.Clone(st.Partial)
	return c
}

// A busy peer (429) is asked again after its Retry-After (at most
// maxBusyWait, with jitter), maxBusyTries times in a row; then it is dropped
// for the blob.
const (
	maxBusyWait  = 2 * time.Second
	maxBusyTries = 8
)

// waitBusy waits out a busy answer, or until ctx ends.
func waitBusy(ctx context.Context, busy *BusyError) {
	wait := min(max(busy.RetryAfter, 100*time.Millisecond), maxBusyWait)
	select {
	case <-ctx.Done():
	case <-time.After(wait + rand.N(wait/2+1)):
	}
}

func (d *download) failureLocked() error {
	var errs []error
	for _, c := range d.order {
		if err := d.stats.Failed[c.Node]; err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.Node, err))
		}
	}
	return fmt.Errorf("blob %s: %w: %w", d.dgst, ErrAllPeersFailed, errors.Join(errs...))
}

// startLocked starts a worker for the next candidate in order.
func (d *download) startLocked(ctx context.Context, wg *sync.WaitGroup) {
	c := d.order[d.nextC]
	d.nextC++
	d.active++
	wg.Go(func() { d.worker(ctx, c, wg) })
}

// worker fetches chunks from one peer until the blob is done or the peer
// fails.
func (d *download) worker(ctx context.Context, c Candidate, wg *sync.WaitGroup) {
	d.est.begin(c.Node)
	defer d.est.end(c.Node)
	busyTries := 0 // busy answers in a row
	for {
		d.mu.Lock()
		ch, hedge := d.pickLocked(c.Node)
		for ch == nil && !d.done && ctx.Err() == nil && d.unfinishedLocked() {
			d.cond.Wait()
			ch, hedge = d.pickLocked(c.Node)
		}
		if ch == nil {
			d.active--
			d.cond.Broadcast()
			d.mu.Unlock()
			return
		}
		actx, cancel := context.WithCancel(ctx)
		a := &attempt{peer: c.Node, started: time.Now(), cancel: cancel}
		ch.attempts[a] = struct{}{}
		if hedge {
			d.stats.Hedged++
		}
		d.mu.Unlock()

		data, ttfb, err := d.fetchChunk(actx, c, ch, a)
		cancel()

		d.mu.Lock()
		delete(ch.attempts, a)
		switch {
		case err == nil && !ch.ok:
			busyTries = 0
			ch.ok, ch.data, ch.from = true, data, c.Node
			for other := range ch.attempts {
				other.cancel() // a hedge lost
			}
			d.est.Observe(c.Node, ch.n, time.Since(a.started), ttfb)
			d.cond.Broadcast()
			d.mu.Unlock()
			continue
		case err == nil:
			d.dl.putBuf(data) // another attempt won
			d.mu.Unlock()
			continue
		case ch.ok || d.done || ctx.Err() != nil:
			// Cancelled: the chunk came from elsewhere, or we are done.
			d.dl.putBuf(data)
			d.mu.Unlock()
			continue
		}
		var busy *BusyError
		if errors.As(err, &busy) && busyTries < maxBusyTries {
			busyTries++
			// Busy (429): no failure. Its chunk goes back for any peer;
			// this one asks again after Retry-After.
			d.dl.putBuf(data)
			d.stats.Busy++
			if len(ch.attempts) == 0 {
				d.requeueLocked(ch)
			}
			d.cond.Broadcast()
			d.mu.Unlock()
			waitBusy(ctx, busy)
			continue
		}
		// The peer failed: drop it for this blob, requeue its chunk, and
		// bring in the next candidate if any is left.
		d.dl.putBuf(data)
		d.stats.Failed[c.Node] = err
		if len(ch.attempts) == 0 {
			d.requeueLocked(ch)
		}
		d.active--
		if d.nextC < len(d.order) {
			d.startLocked(ctx, wg)
		}
		d.cond.Broadcast()
		d.mu.Unlock()
		log.G(ctx).WithError(err).WithField("peer", c.Node).WithField("digest", d.dgst).Info("peer dropped for this blob")
		return
	}
}

func (d *download) unfinishedLocked() bool {
	return d.written < d.size
}

// requeueLocked puts ch, whose peer failed, back for another peer.
func (d *download) requeueLocked(ch *chunk) {
	i, _ := slices.BinarySearchFunc(d.retry, ch.off, func(c *chunk, off int64) int { return cmp.Compare(c.off, off) })
	d.retry = slices.Insert(d.retry, i, ch)
}

// pickLocked returns the next chunk for peer: the lowest chunk waiting for
// a peer within the buffer window (a requeued one, or else the next one
// planned), or else a straggling chunk worth hedging.
func (d *download) pickLocked(peer string) (*chunk, bool) {
	if d.done {
		return nil, false
	}
	end := d.written + d.opts.Buffer
	if len(d.retry) > 0 {
		// Requeued chunks lie before every chunk not yet planned.
		if ch := d.retry[0]; ch.off+ch.n <= end {
			d.retry[0] = nil
			d.retry = d.retry[1:]
			return ch, false
		}
	} else if ch := d.planLocked(end); ch != nil {
		return ch, false
	}
	// The buffer is full: the writer waits, perhaps on a straggler.
	if d.par < 2 {
		return nil, false
	}
	// Nothing to start: re-issue the earliest chunk whose only attempt
	// would finish later than this peer could do it all.
	me := d.est.Get(peer)
	unknown := d.unknownRate()
	for _, ch := range d.live {
		if ch.ok || len(ch.attempts) != 1 {
			continue
		}
		var a *attempt
		for x := range ch.attempts {
			a = x
		}
		if a.peer == peer {
			continue
		}
		mine := me.Completion(ch.n, unknown)
		left := ch.n - a.got.Load()
		other := d.est.Get(a.peer)
		var theirs time.Duration
		if other.Bandwidth > 0 {
			theirs = time.Duration(float64(left) / other.Bandwidth * float64(time.Second))
		} else {
			// Unmeasured: judge by its progress so far.
			el := time.Since(a.started)
			got := a.got.Load()
			if got == 0 {
				theirs = max(el, d.opts.Stall/2) // nothing yet: assume slow
			} else {
				theirs = time.Duration(float64(left) / (float64(got) / el.Seconds()) * float64(time.Second))
			}
		}
		if theirs > mine*3/2 && theirs > 20*time.Millisecond {
			return ch, true
		}
	}
	return nil, false
}

// fetchChunk reads one chunk from the peer, cutting it off when it stalls
// or trickles.
func (d *download) fetchChunk(ctx context.Context, c Candidate, ch *chunk, a *attempt) ([]byte, time.Duration, error) {
	return d.dl.fetchRange(ctx, c, d.dgst, d.size, ch.off, ch.n, d.opts, a)
}

// fetchRange reads length bytes of dgst at off from the peer into a pooled
// buffer, cutting it off when it stalls or trickles.
func (dl *Downloader) fetchRange(ctx context.Context, c Candidate, dgst digest.Digest, size, off, length int64, opts DownloadOptions, a *attempt) ([]byte, time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	body, err := dl.f.FetchRange(ctx, c.URL, dgst, off, length, size)
	if err != nil {
		return nil, 0, err
	}
	defer body.Close()
	ttfb := time.Since(a.started)
	buf := dl.getBuf(length)
	var n int64
	window, windowBytes := time.Now(), int64(0)
	for n < length {
		fired := make(chan struct{})
		timer := time.AfterFunc(opts.Stall, func() {
			defer close(fired)
			cancel()
			body.Close()
		})
		k, rerr := body.Read(buf[n:length])
		if !timer.Stop() {
			// The timer fired (perhaps just as data came): the body is
			// closed, so this peer is done for this chunk. Its function
			// runs in a goroutine of its own: wait for it.
			<-fired
			return buf, ttfb, fmt.Errorf("offset %d: stalled for %v: %w", off+n, opts.Stall, errdefs.ErrUnavailable)
		}
		if k > 0 {
			n += int64(k)
			a.got.Store(n)
			windowBytes += int64(k)
			if opts.OnBytes != nil {
				opts.OnBytes(dgst, c.Node, k)
			}
		}
		if el := time.Since(window); opts.MinRate > 0 && el >= opts.Stall {
			if float64(windowBytes) < float64(opts.MinRate)*el.Seconds() {
				return buf, ttfb, fmt.Errorf("offset %d: %d bytes in %v: too slow: %w", off+n, windowBytes, el.Round(time.Millisecond), errdefs.ErrUnavailable)
			}
			window, windowBytes = time.Now(), 0
		}
		if rerr != nil {
			if n == length && errors.Is(rerr, io.EOF) {
				break
			}
			if errors.Is(rerr, io.EOF) {
				rerr = io.ErrUnexpectedEOF
			}
			return buf, ttfb, fmt.Errorf("offset %d: %w", off+n, rerr)
		}
	}
	return buf[:length], ttfb, nil
}

// getBuf returns a chunk buffer of n bytes, reused when one is free.
func (dl *Downloader) getBuf(n int64) []byte {
	if b, ok := dl.pool.Get().(*[]byte); ok && int64(cap(*b)) >= n {
		return (*b)[:n]
	}
	return make([]byte, n)
}

func (dl *Downloader) putBuf(b []byte) {
	if b == nil {
		return
	}
	dl.pool.Put(&b)
}
