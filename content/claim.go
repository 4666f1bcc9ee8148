package content

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
)

// ClaimSource decides which missing blobs the store claims and fetches them.
type ClaimSource interface {
	// Claimable says, from what the node already knows (no network round
	// trip: it is asked inside containerd's metadata transaction), whether
	// peers hold dgst, and its size.
	Claimable(dgst digest.Digest) (size int64, ok bool)
	// FetchClaim writes the size bytes of dgst to w, in order. The claim
	// verifies the digest.
	FetchClaim(ctx context.Context, dgst digest.Digest, size int64, w io.Writer) error
}

// RecordCleaner removes containerd's records of a blob in every namespace.
// A claimed blob is recorded by containerd as soon as Info says found; when
// the claim fails the record must go, or containerd would never fetch the
// blob again.
type RecordCleaner interface {
	Forget(ctx context.Context, dgst digest.Digest) error
}

// ClaimOptions configure a ClaimStore.
type ClaimOptions struct {
	// Source decides and fetches claims. Required.
	Source ClaimSource
	// Cleaner removes containerd's records of failed claims; nil leaves them
	// (a failed claim then needs `ctr content rm` before a retry works).
	Cleaner RecordCleaner
	// Dir holds the blobs being claimed. Default <store root>/claims; blobs
	// left there by an earlier run are removed at start and forgotten.
	Dir string
	// UnreadTimeout cancels a claim nobody has started reading, unfinished,
	// this long after it was made. Default 2m.
	UnreadTimeout time.Duration
	// FailedTTL is how long a digest whose claim failed is not claimed
	// again (containerd's retry goes to the mirror and the registry).
	// Default 2m.
	FailedTTL time.Duration
	// Active is how many claims download at once (each from all its peers).
	// Default 1: the layer being unpacked gets the whole bandwidth, the next
	// starts as it nears its end. A claim someone waits for goes first.
	Active int
	// Tail is the remaining size under which a claim no longer counts as
	// active, so the next one starts. Default 8 MiB.
	Tail int64
	// Registerer receives the claim metrics; nil registers nothing.
	Registerer prometheus.Registerer
	// MinSize is the smallest blob claimed. A claim lets a layer unpack as
	// it streams in; a small blob (a manifest, a config) gains nothing from
	// it, and a claim that fails fails its pull, while the mirror's path
	// falls back to the registry. 0: every size.
	MinSize int64
	// Budget bounds the disk taken by claims not verified yet: a blob the
	// budget cannot take is not claimed (the registry serves it). nil: no
	// bound beyond the downloader's maximum blob size.
	Budget *Budget
	// Copies is how many copies of a claimed blob are on disk until it is
	// verified: 2 when the source spools its chunks for a swarm. Default 1.
	Copies int64
}

// ClaimStore is a Store that also claims missing blobs peers hold: Info says
// found at once and the blob is fetched in the background; reads of a claimed
// blob wait for their bytes. It is what containerd is served in claim mode.
// Close stops what it runs in the background.
type ClaimStore struct {
	*Store
	src     ClaimSource
	cleaner RecordCleaner
	dir     string
	unread  time.Duration
	ttl     time.Duration
	slots   int
	tail    int64
	budget  *Budget
	copies  int64
	minSize int64

	// bg is the store's own lifetime, not a caller's: the downloads and
	// the background forgets run under it, and Close cancels it.
	bg   context.Context
	stop context.CancelFunc
	// wg counts every goroutine the store starts (see goLocked), and the
	// unread timers' functions while they run; Close waits for them.
	wg sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	claims  map[digest.Digest]*claim
	failed  map[digest.Digest]time.Time
	queue   []*claim // made, waiting for a download slot
	running int      // claims holding a slot

	results *prometheus.CounterVec
	waits   prometheus.Histogram
}

var _ ctdcontent.Store = (*ClaimStore)(nil)

// Claim results (coop_claims_total).
const (
	claimMade      = "made"
	claimDone      = "done"
	claimFailed    = "failed"
	claimCancelled = "cancelled"
)

// ErrRewound is the error of a read of a claimed blob whose source rewound
// it (see claim.Rewind): the bytes read before were bad, and the blob is
// being written again from its start. An unpack that gets it starts over
// (the Diff service's applier does, see restartingApplier).
var ErrRewound = fmt.Errorf("claimed blob rewound: the bytes read were bad and it is fetched again: %w", errdefs.ErrAborted)

// errClaimStoreClosed ends the claims still running when the store closes.
var errClaimStoreClosed = fmt.Errorf("claim store closed: %w", errdefs.ErrUnavailable)

// NewClaimStore returns store with claims. ctx serves the recovery of the
// claims an earlier run left (see ClaimOptions.Dir) and lends its values (its
// logger) to the background work, not its lifetime: that runs until Close.
func NewClaimStore(ctx context.Context, store *Store, opts ClaimOptions) (*ClaimStore, error) {
	if store == nil || opts.Source == nil {
		return nil, fmt.Errorf("claim store needs a store and a claim source: %w", errdefs.ErrInvalidArgument)
	}
	cs := &ClaimStore{
		Store: store, src: opts.Source, cleaner: opts.Cleaner, dir: opts.Dir, budget: opts.Budget, minSize: opts.MinSize, copies: max(opts.Copies, 1),
		unread: 2 * time.Minute, ttl: 2 * time.Minute, slots: 1, tail: 8 << 20,
		claims: map[digest.Digest]*claim{}, failed: map[digest.Digest]time.Time{},
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_claims_total",
			Help: "Claims of blobs from peers by result: made (Info said found), done (verified and stored), failed (every peer failed or the bytes did not verify), cancelled (deleted, or unread).",
		}, []string{"result"}),
		waits: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "coop_claim_read_wait_seconds",
			Help:    "Time reads of claimed blobs waited for their bytes.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
	}
	if cs.dir == "" {
		cs.dir = filepath.Join(store.root, "claims")
	}
	if opts.UnreadTimeout != 0 {
		cs.unread = opts.UnreadTimeout
	}
	if opts.FailedTTL != 0 {
		cs.ttl = opts.FailedTTL
	}
	if opts.Active != 0 {
		cs.slots = opts.Active
	}
	if opts.Tail != 0 {
		cs.tail = opts.Tail
	}
	if cs.unread < 0 || cs.ttl < 0 || cs.slots < 1 || cs.tail < 0 {
		return nil, fmt.Errorf("claim timeouts, slots and tail must be positive: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{cs.results, cs.waits} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("claim metrics: %w", err)
			}
		}
	}
	if err := os.MkdirAll(cs.dir, 0o700); err != nil {
		return nil, fmt.Errorf("claims directory: %w", err)
	}
	cs.bg, cs.stop = context.WithCancel(context.WithoutCancel(ctx))
	if err := cs.recover(ctx); err != nil {
		cs.stop()
		return nil, err
	}
	return cs, nil
}

// Close stops the store's background work and waits for it: the downloads
// are cancelled, the claims still made fail their readers, and no blob is
// claimed any more (Info answers from the store alone). The files of those
// claims stay for the next run to remove (see ClaimOptions.Dir). The Store
// itself stays usable. Close always returns nil; it is safe to call twice.
func (cs *ClaimStore) Close() error {
	cs.mu.Lock()
	if cs.closed {
		cs.mu.Unlock()
		cs.wg.Wait()
		return nil
	}
	cs.closed = true
	left := make([]*claim, 0, len(cs.claims))
	for _, c := range cs.claims {
		left = append(left, c)
	}
	cs.mu.Unlock()
	cs.stop()
	for _, c := range left {
		cs.end(c, errClaimStoreClosed, claimCancelled)
	}
	cs.wg.Wait()
	return nil
}

// goLocked runs f in a goroutine Close waits for, unless the store is
// closed (cs.mu held).
func (cs *ClaimStore) goLocked(f func()) {
	if !cs.closed {
		cs.wg.Go(f)
	}
}

// enter counts a function the runtime started (a timer's) among those
// Close waits for; it returns false, counting nothing, when the store is
// closed. The caller calls cs.wg.Done when enter returned true.
func (cs *ClaimStore) enter() bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.closed {
		return false
	}
	cs.wg.Add(1)
	return true
}

// recover removes the claims an earlier run left unfinished and has
// containerd forget them, in the background (containerd may not be up yet).
func (cs *ClaimStore) recover(ctx context.Context) error {
	ents, err := os.ReadDir(cs.dir)
	if err != nil {
		return fmt.Errorf("claims directory: %w", err)
	}
	var left []digest.Digest
	for _, e := range ents {
		if err := os.Remove(filepath.Join(cs.dir, e.Name())); err != nil {
			return fmt.Errorf("remove unfinished claim: %w", err)
		}
		if d := digest.NewDigestFromEncoded(digest.SHA256, e.Name()); d.Validate() == nil {
			left = append(left, d)
		}
	}
	if len(left) == 0 || cs.cleaner == nil {
		return nil
	}
	log.G(ctx).WithField("blobs", len(left)).Info("removed claims an earlier run left unfinished")
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cs.goLocked(func() { cs.forgetLeft(cs.bg, left) })
	return nil
}

// forgetLeft has containerd forget the claims an earlier run left, retrying
// while containerd is not up, until ctx ends.
func (cs *ClaimStore) forgetLeft(ctx context.Context, left []digest.Digest) {
	for _, d := range left {
		for try := 0; ; try++ {
			err := cs.forget(ctx, d)
			if err == nil {
				break
			}
			if try == 30 {
				log.G(ctx).WithError(err).WithField("digest", d).Warn("containerd still records an unfinished claim: remove it with ctr content rm")
				break
			}
			t := time.NewTimer(2 * time.Second)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// forget has containerd drop its records of dgst unless the blob is here or
// claimed again.
func (cs *ClaimStore) forget(ctx context.Context, dgst digest.Digest) error {
	if cs.cleaner == nil {
		return nil
	}
	if _, err := cs.Store.Info(ctx, dgst); err == nil {
		return nil
	}
	cs.mu.Lock()
	_, claimed := cs.claims[dgst]
	cs.mu.Unlock()
	if claimed {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return cs.cleaner.Forget(ctx, dgst)
}

// Info returns the blob's info. A missing blob that peers hold is claimed:
// found, with the size they report, while it is fetched.
// If the content is neither present nor claimable, ErrNotFound is returned.
func (cs *ClaimStore) Info(ctx context.Context, dgst digest.Digest) (ctdcontent.Info, error) {
	info, err := cs.Store.Info(ctx, dgst)
	if err == nil || !errdefs.IsNotFound(err) {
		return info, err
	}
	if dgst.Validate() != nil {
		return info, err
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if c, ok := cs.claims[dgst]; ok {
		return c.info(), nil
	}
	if cs.closed {
		return info, err
	}
	if t, ok := cs.failed[dgst]; ok {
		if time.Since(t) < cs.ttl {
			return info, err
		}
		delete(cs.failed, dgst)
	}
	size, ok := cs.src.Claimable(dgst)
	if !ok || size <= 0 || size < cs.minSize {
		return info, err
	}
	c, cerr := cs.newClaimLocked(dgst, size)
	if cerr != nil {
		log.G(ctx).WithError(cerr).WithField("digest", dgst).Warn("cannot claim blob")
		return info, err
	}
	return c.info(), nil
}

// Writer opens a writer of the store. containerd opens one with the
// descriptor of the manifest it pulls when a claimed blob's size disagrees
// with that descriptor: the peers' size was wrong, so the claim fails at once
// (its bytes are not wanted) and containerd fetches the blob itself.
func (cs *ClaimStore) Writer(ctx context.Context, opts ...ctdcontent.WriterOpt) (ctdcontent.Writer, error) {
	var wo ctdcontent.WriterOpts
	for _, o := range opts {
		if err := o(&wo); err != nil {
			return nil, err
		}
	}
	if wo.Desc.Size > 0 {
		if c := cs.claimed(wo.Desc.Digest); c != nil && c.size != wo.Desc.Size {
			cs.end(c, fmt.Errorf("claimed blob %s: peers said %d bytes, the manifest says %d: %w",
				c.dgst, c.size, wo.Desc.Size, errdefs.ErrFailedPrecondition), claimFailed)
		}
	}
	return cs.Store.Writer(ctx, opts...)
}

// Update returns the info of a claimed blob as is (containerd keeps labels
// itself), and updates stored blobs.
func (cs *ClaimStore) Update(ctx context.Context, info ctdcontent.Info, fieldpaths ...string) (ctdcontent.Info, error) {
	if c := cs.claimed(info.Digest); c != nil {
		return c.info(), nil
	}
	return cs.Store.Update(ctx, info, fieldpaths...)
}

// Walk walks the stored blobs, then (with no filters) the claimed ones.
func (cs *ClaimStore) Walk(ctx context.Context, fn ctdcontent.WalkFunc, fs ...string) error {
	seen := map[digest.Digest]bool{}
	if err := cs.Store.Walk(ctx, func(info ctdcontent.Info) error {
		seen[info.Digest] = true
		return fn(info)
	}, fs...); err != nil {
		return err
	}
	if len(fs) > 0 {
		return nil
	}
	cs.mu.Lock()
	infos := make([]ctdcontent.Info, 0, len(cs.claims))
	for d, c := range cs.claims {
		if !seen[d] {
			infos = append(infos, c.info())
		}
	}
	cs.mu.Unlock()
	for _, info := range infos {
		if err := fn(info); err != nil {
			return err
		}
	}
	return nil
}

// Delete removes a blob; a claimed one is cancelled (containerd's garbage
// collector deletes only what no namespace references).
// If the content is not present, ErrNotFound is returned.
func (cs *ClaimStore) Delete(ctx context.Context, dgst digest.Digest) error {
	if c := cs.claimed(dgst); c != nil {
		c.mu.Lock()
		read := c.readers > 0
		c.mu.Unlock()
		if read {
			// Deleted while being read: the pull reading it failed
			// (its unpack saw bad bytes before the digest could be
			// checked). Its retry must not claim it again.
			cs.mu.Lock()
			cs.failed[dgst] = time.Now()
			cs.mu.Unlock()
		}
		cs.end(c, fmt.Errorf("claimed blob %s was deleted: %w", dgst, errdefs.ErrNotFound), claimCancelled)
		if err := cs.Store.Delete(ctx, dgst); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
		return nil
	}
	return cs.Store.Delete(ctx, dgst)
}

// ReaderAt opens a blob. Reads of a claimed blob wait until their bytes have
// arrived, and those reaching its end until it is verified; they fail if the
// claim fails.
// If the content is not present, ErrNotFound is returned.
func (cs *ClaimStore) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (ctdcontent.ReaderAt, error) {
	cs.mu.Lock()
	c := cs.claims[desc.Digest]
	if c != nil {
		r, err := c.open(ctx, cs)
		if err != nil {
			cs.mu.Unlock()
			return nil, err
		}
		cs.promoteLocked(c)
		cs.mu.Unlock()
		return r, nil
	}
	cs.mu.Unlock()
	ra, err := cs.Store.ReaderAt(ctx, desc)
	if errdefs.IsNotFound(err) {
		// containerd reads only what it records: a record with no blob
		// is a claim that failed or was lost with a restart. Have it
		// forgotten, so that the retried pull fetches the blob.
		if ferr := cs.forget(ctx, desc.Digest); ferr != nil {
			log.G(ctx).WithError(ferr).WithField("digest", desc.Digest).Warn("could not have containerd forget a missing blob")
		}
	}
	return ra, err
}

// ApplyProvider returns the provider the Diff service unpacks from: reads
// as ReaderAt, and the claimed blobs an unpack reads are told to the
// unpack's restartingApplier, which settles a claim its failure leaves
// unverified (see restartingApplier).
func (cs *ClaimStore) ApplyProvider() ctdcontent.Provider { return applyProvider{cs} }

type applyProvider struct{ cs *ClaimStore }

func (p applyProvider) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (ctdcontent.ReaderAt, error) {
	ra, err := p.cs.ReaderAt(ctx, desc)
	if r, ok := ra.(*claimReader); ok {
		st, _ := ctx.Value(applyStateKey{}).(*applyState)
		st.read(p.cs, r.c, r.gen)
	}
	return ra, err
}

// Claimed returns the digests being claimed.
func (cs *ClaimStore) Claimed() []digest.Digest {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	out := make([]digest.Digest, 0, len(cs.claims))
	for d := range cs.claims {
		out = append(out, d)
	}
	return out
}

func (cs *ClaimStore) claimed(dgst digest.Digest) *claim {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.claims[dgst]
}

func (cs *ClaimStore) newClaimLocked(dgst digest.Digest, size int64) (*claim, error) {
	release, err := cs.budget.Reserve(size * cs.copies)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(cs.dir, dgst.Encoded())
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		release()
		return nil, err
	}
	ctx, cancel := context.WithCancel(cs.bg)
	now := time.Now()
	c := &claim{dgst: dgst, size: size, path: path, f: f, created: now, ctx: ctx, cancel: cancel, changed: make(chan struct{}), digester: dgst.Algorithm().Digester(), unbudget: release}
	cs.claims[dgst] = c
	cs.queue = append(cs.queue, c)
	cs.results.WithLabelValues(claimMade).Inc()
	cs.pumpLocked()
	c.unreadTimer = time.AfterFunc(cs.unread, func() {
		if !cs.enter() {
			return
		}
		defer cs.wg.Done()
		if c.unread() {
			cs.end(c, fmt.Errorf("claimed blob %s: nobody read it within %v: %w", dgst, cs.unread, context.DeadlineExceeded), claimCancelled)
		}
	})
	return c, nil
}

// promoteLocked moves a queued claim someone reads to the queue's front.
func (cs *ClaimStore) promoteLocked(c *claim) {
	for i, q := range cs.queue {
		if q == c && i > 0 {
			copy(cs.queue[1:i+1], cs.queue[:i])
			cs.queue[0] = c
			return
		}
	}
}

// pumpLocked starts queued claims while slots are free.
func (cs *ClaimStore) pumpLocked() {
	for !cs.closed && cs.running < cs.slots && len(cs.queue) > 0 {
		c := cs.queue[0]
		cs.queue = cs.queue[1:]
		cs.running++
		c.slot = true
		cs.goLocked(func() { cs.run(c) })
	}
}

// release frees c's download slot (once).
func (cs *ClaimStore) release(c *claim) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if c.slot {
		c.slot = false
		cs.running--
		cs.pumpLocked()
	}
}

// run downloads c and ends it.
func (cs *ClaimStore) run(c *claim) {
	ctx := log.WithLogger(c.ctx, log.G(c.ctx).WithField("digest", c.dgst))
	c.mu.Lock()
	c.onTail = func() { cs.release(c) }
	c.tail = cs.tail
	c.mu.Unlock()
	err := cs.src.FetchClaim(ctx, c.dgst, c.size, c)
	if err == nil {
		err = c.Verify()
	}
	if err == nil {
		// Readers may finish now; the sync and the rename follow.
		c.finish(nil)
		err = c.f.Sync()
	}
	if err != nil {
		cs.end(c, err, claimFailed)
		return
	}
	cs.mu.Lock()
	if cs.claims[c.dgst] != c { // cancelled meanwhile
		cs.mu.Unlock()
		return
	}
	err = cs.adopt(context.WithoutCancel(ctx), c.path, c.dgst, c.size)
	if err != nil {
		cs.mu.Unlock()
		cs.end(c, fmt.Errorf("store claimed blob: %w", err), claimFailed)
		return
	}
	delete(cs.claims, c.dgst)
	c.unreadTimer.Stop()
	cs.mu.Unlock()
	c.unbudget()
	c.f.Close()
	cs.release(c)
	cs.results.WithLabelValues(claimDone).Inc()
	log.G(ctx).WithField("size", c.size).WithField("seconds", time.Since(c.created).Seconds()).Debug("claimed blob stored")
}

// end ends c with err: it is no longer claimed, its bytes are removed, its
// readers fail, and containerd forgets it. Once the store is closed, the
// bytes stay and nothing is forgotten: the next run does both.
func (cs *ClaimStore) end(c *claim, err error, result string) {
	cs.mu.Lock()
	if cs.claims[c.dgst] != c {
		cs.mu.Unlock()
		return
	}
	closed := cs.closed
	c.unreadTimer.Stop()
	delete(cs.claims, c.dgst)
	for i, q := range cs.queue {
		if q == c {
			cs.queue = append(cs.queue[:i], cs.queue[i+1:]...)
			break
		}
	}
	if result == claimFailed {
		now := time.Now()
		for d, t := range cs.failed {
			if now.Sub(t) > cs.ttl {
				delete(cs.failed, d)
			}
		}
		cs.failed[c.dgst] = now
	}
	cs.mu.Unlock()
	c.cancel()
	c.finish(err)
	if !closed {
		_ = os.Remove(c.path)
	}
	c.unbudget()
	cs.release(c)
	cs.results.WithLabelValues(result).Inc()
	ctx := log.WithLogger(cs.bg, log.G(cs.bg).WithField("digest", c.dgst))
	log.G(ctx).WithError(err).WithField("result", result).Warn("claim ended; containerd's retry goes to the mirror and the registry")
	if result != claimCancelled || !errors.Is(err, errdefs.ErrNotFound) {
		// Not a garbage-collector delete: containerd may record it.
		cs.mu.Lock()
		cs.goLocked(func() {
			if ferr := cs.forget(ctx, c.dgst); ferr != nil {
				log.G(ctx).WithError(ferr).Warn("could not have containerd forget a failed claim")
			}
		})
		cs.mu.Unlock()
	}
}

// forgetFailed has containerd forget the failed claim c, once, before it
// returns.
func (cs *ClaimStore) forgetFailed(ctx context.Context, c *claim) {
	c.forgot.Do(func() {
		if ferr := cs.forget(context.WithoutCancel(ctx), c.dgst); ferr != nil {
			log.G(ctx).WithError(ferr).WithField("digest", c.dgst).Warn("could not have containerd forget a failed claim")
		}
	})
}

// claim is one blob being fetched for containerd. It is the download's
// io.Writer: bytes land in its file in order and are hashed as they go.
type claim struct {
	dgst     digest.Digest
	size     int64
	path     string
	f        *os.File
	created  time.Time
	ctx      context.Context // the download's, under the store's lifetime
	cancel   context.CancelFunc
	digester digest.Digester
	// unreadTimer cancels the claim if nobody reads it (cs.mu: stopped
	// when the claim ends).
	unreadTimer *time.Timer
	// unbudget gives the claim's size back to the budget (once).
	unbudget func()

	mu      sync.Mutex
	written int64
	// gen counts the rewinds: a reader opened at another gen read bytes
	// since dropped.
	gen     int
	done    bool // every byte arrived and verified
	err     error
	readers int
	slot    bool
	tail    int64
	onTail  func()
	changed chan struct{} // closed and replaced on every change
	forgot  sync.Once
}

func (c *claim) info() ctdcontent.Info {
	return ctdcontent.Info{Digest: c.dgst, Size: c.size, CreatedAt: c.created, UpdatedAt: c.created}
}

func (c *claim) unread() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.readers == 0 && !c.done && c.err == nil
}

// Write appends p to the blob.
func (c *claim) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return 0, c.err
	}
	if c.written+int64(len(p)) > c.size {
		c.mu.Unlock()
		return 0, fmt.Errorf("claimed blob %s: more than %d bytes: %w", c.dgst, c.size, errdefs.ErrDataLoss)
	}
	c.mu.Unlock()
	n, err := c.f.Write(p)
	c.digester.Hash().Write(p[:n])
	c.mu.Lock()
	c.written += int64(n)
	var onTail func()
	if c.onTail != nil && c.size-c.written <= c.tail {
		onTail, c.onTail = c.onTail, nil
	}
	c.signalLocked()
	c.mu.Unlock()
	if onTail != nil {
		onTail()
	}
	return n, err
}

// Verify checks the bytes written: all of them, with the claimed digest. A
// ClaimSource may ask it of its writer (a swarm download does, to learn
// which peers sent a blob that does not verify).
func (c *claim) Verify() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.written != c.size {
		return fmt.Errorf("claimed blob %s: got %d of %d bytes: %w", c.dgst, c.written, c.size, errdefs.ErrDataLoss)
	}
	if got := c.digester.Digest(); got != c.dgst {
		return fmt.Errorf("claimed blob %s does not verify: got %s: %w", c.dgst, got, errdefs.ErrDataLoss)
	}
	return nil
}

// Rewind drops the bytes written so far: the source found them bad (the
// blob did not verify) and writes the blob again from its start. The
// readers opened before fail with ErrRewound from now on. A ClaimSource may
// ask it of its writer; it is called between writes, never during one.
func (c *claim) Rewind() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	if c.done {
		return fmt.Errorf("claimed blob %s is verified: %w", c.dgst, errdefs.ErrFailedPrecondition)
	}
	if err := c.f.Truncate(0); err != nil {
		return fmt.Errorf("rewind claimed blob %s: %w", c.dgst, err)
	}
	if _, err := c.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("rewind claimed blob %s: %w", c.dgst, err)
	}
	c.written = 0
	c.digester = c.dgst.Algorithm().Digester()
	c.gen++
	c.signalLocked()
	return nil
}

// finish marks c verified (err nil) or failed, and wakes its readers.
func (c *claim) finish(err error) {
	c.mu.Lock()
	if err != nil {
		c.err = err
		c.done = false
		defer c.f.Close()
	} else {
		c.done = true
	}
	c.signalLocked()
	c.mu.Unlock()
}

func (c *claim) signalLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// open returns a reader of c (cs.mu held: c is still claimed).
func (c *claim) open(ctx context.Context, cs *ClaimStore) (*claimReader, error) {
	f, err := os.Open(c.path)
	if err != nil {
		return nil, fmt.Errorf("open claimed blob %s: %w", c.dgst, err)
	}
	c.mu.Lock()
	c.readers++
	gen := c.gen
	c.mu.Unlock()
	return &claimReader{ctx: ctx, c: c, cs: cs, f: f, gen: gen}, nil
}

// claimReader reads a claimed blob, waiting for its bytes.
type claimReader struct {
	ctx context.Context
	c   *claim
	cs  *ClaimStore
	f   *os.File
	gen int // the claim's gen when opened
}

// rewoundLocked says, c.mu held, whether the claim was rewound since r was
// opened.
func (r *claimReader) rewoundLocked() bool { return r.c.gen != r.gen }

// settle waits until c is verified, failed or rewound past gen, or ctx
// ends; it says whether it was rewound.
func (c *claim) settle(ctx context.Context, gen int) bool {
	for {
		c.mu.Lock()
		if c.gen != gen {
			c.mu.Unlock()
			return true
		}
		if c.done || c.err != nil {
			c.mu.Unlock()
			return false
		}
		ch := c.changed
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return false
		}
	}
}

func (r *claimReader) Size() int64 { return r.c.size }

// Close closes the reader.
func (r *claimReader) Close() error { return r.f.Close() }

// ReadAt waits until p's range has arrived (the end of the blob: until it is
// verified), then reads it.
func (r *claimReader) ReadAt(p []byte, off int64) (int, error) {
	c := r.c
	if off >= c.size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), c.size)
	var start time.Time
	for {
		c.mu.Lock()
		switch {
		case r.rewoundLocked():
			c.mu.Unlock()
			return 0, fmt.Errorf("read claimed blob %s: %w", c.dgst, ErrRewound)
		case c.err != nil:
			err := c.err
			c.mu.Unlock()
			// containerd recorded the blob when Info said found: have
			// it forget the blob before the caller's error ends the
			// pull, so that a retry fetches it.
			r.cs.forgetFailed(r.ctx, c)
			return 0, fmt.Errorf("read claimed blob: %w", err)
		case c.done || (end < c.size && c.written >= end):
			c.mu.Unlock()
			if !start.IsZero() {
				r.cs.waits.Observe(time.Since(start).Seconds())
			}
			n, err := r.f.ReadAt(p[:end-off], off)
			c.mu.Lock()
			rewound := r.rewoundLocked()
			c.mu.Unlock()
			if rewound {
				return 0, fmt.Errorf("read claimed blob %s: %w", c.dgst, ErrRewound)
			}
			if err == nil && end == c.size && n < len(p) {
				err = io.EOF
			}
			return n, err
		}
		ch := c.changed
		c.mu.Unlock()
		if start.IsZero() {
			start = time.Now()
		}
		select {
		case <-ch:
		case <-r.ctx.Done():
			return 0, fmt.Errorf("read claimed blob %s: %w", c.dgst, r.ctx.Err())
		}
	}
}
