package content

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/content/testsuite"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// fakeSource serves blobs it is given, a piece each time step receives
// (or at once when step is nil), optionally lying.
type fakeSource struct {
	mu      sync.Mutex
	blobs   map[digest.Digest][]byte
	piece   int
	step    chan struct{}
	corrupt bool
	// rewind: after the corrupt bytes, rewind the claim and write the
	// right ones (a registry fallback).
	rewind  bool
	failAt  int64 // fail after this many bytes (0: never)
	started []digest.Digest
	ctxs    map[digest.Digest]context.Context
}

func newFakeSource() *fakeSource {
	return &fakeSource{blobs: map[digest.Digest][]byte{}, piece: 1 << 10, ctxs: map[digest.Digest]context.Context{}}
}

func (f *fakeSource) add(b []byte) digest.Digest {
	d := digest.FromBytes(b)
	f.mu.Lock()
	f.blobs[d] = b
	f.mu.Unlock()
	return d
}

func (f *fakeSource) Claimable(d digest.Digest) (int64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.blobs[d]
	return int64(len(b)), ok
}

func (f *fakeSource) FetchClaim(ctx context.Context, d digest.Digest, size int64, w io.Writer) error {
	f.mu.Lock()
	b := append([]byte(nil), f.blobs[d]...)
	f.started = append(f.started, d)
	f.ctxs[d] = ctx
	corrupt, rewind, failAt, step, piece := f.corrupt, f.rewind, f.failAt, f.step, f.piece
	f.mu.Unlock()
	good := slices.Clone(b)
	if corrupt {
		b[len(b)-1] ^= 0xff
	}
	if err := f.write(ctx, b, w, failAt, step, piece); err != nil || !rewind {
		return err
	}
	if err := w.(interface{ Rewind() error }).Rewind(); err != nil {
		return err
	}
	return f.write(ctx, good, w, 0, step, piece)
}

func (f *fakeSource) write(ctx context.Context, b []byte, w io.Writer, failAt int64, step chan struct{}, piece int) error {
	for off := 0; off < len(b); off += piece {
		if failAt > 0 && int64(off) >= failAt {
			return fmt.Errorf("peer died at %d: %w", off, errdefs.ErrUnavailable)
		}
		if step != nil {
			select {
			case <-step:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if _, err := w.Write(b[off:min(off+piece, len(b))]); err != nil {
			return err
		}
	}
	return nil
}

func (f *fakeSource) startedList() []digest.Digest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]digest.Digest(nil), f.started...)
}

type fakeCleaner struct {
	mu     sync.Mutex
	forgot []digest.Digest
}

func (c *fakeCleaner) Forget(_ context.Context, d digest.Digest) error {
	c.mu.Lock()
	c.forgot = append(c.forgot, d)
	c.mu.Unlock()
	return nil
}

func (c *fakeCleaner) has(d digest.Digest) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, x := range c.forgot {
		if x == d {
			return true
		}
	}
	return false
}

func newClaimStore(t *testing.T, src ClaimSource, opts ClaimOptions) (*ClaimStore, *Inventory, *fakeCleaner) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	inv := NewInventory()
	s, err := NewStore(ctx, t.TempDir(), inv)
	if err != nil {
		t.Fatal(err)
	}
	cl := &fakeCleaner{}
	opts.Source, opts.Cleaner = src, cl
	cs, err := NewClaimStore(ctx, s, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cs.Close() })
	return cs, inv, cl
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// The content suite passes when nothing is claimable: the claim store is a
// plain store then.
func TestClaimStoreContentSuite(t *testing.T) {
	testsuite.ContentSuite(t, "coop-claim", func(ctx context.Context, root string) (context.Context, ctdcontent.Store, func() error, error) {
		s, err := NewStore(ctx, root, NewInventory())
		if err != nil {
			return nil, nil, nil, err
		}
		cs, err := NewClaimStore(ctx, s, ClaimOptions{Source: newFakeSource()})
		if err != nil {
			return nil, nil, nil, err
		}
		return ctx, cs, cs.Close, nil
	})
}

func TestClaimStreamsAndStores(t *testing.T) {
	synctest.Test(t, testClaimStreamsAndStores)
}

func testClaimStreamsAndStores(t *testing.T) {
	ctx := context.Background()
	src := newFakeSource()
	src.step = make(chan struct{})
	blob := randomBytes(t, 64<<10)
	d := src.add(blob)
	cs, inv, cl := newClaimStore(t, src, ClaimOptions{})

	if _, err := cs.Info(ctx, digest.FromString("nobody has it")); !errdefs.IsNotFound(err) {
		t.Fatalf("Info of an unknown blob: %v, want not found", err)
	}
	info, err := cs.Info(ctx, d)
	if err != nil || info.Size != int64(len(blob)) {
		t.Fatalf("Info of a claimable blob = %+v, %v; want found with size %d", info, err, len(blob))
	}
	var walked []digest.Digest
	if err := cs.Walk(ctx, func(i ctdcontent.Info) error { walked = append(walked, i.Digest); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(walked) != 1 || walked[0] != d {
		t.Fatalf("Walk during the claim = %v, want the claimed blob", walked)
	}
	ra, err := cs.ReaderAt(ctx, ocispec.Descriptor{Digest: d, Size: int64(len(blob))})
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	if ra.Size() != int64(len(blob)) {
		t.Fatalf("reader size %d", ra.Size())
	}
	// A read of the first KiB waits for the first piece.
	got := make(chan error, 1)
	p := make([]byte, 1<<10)
	go func() { _, err := ra.ReadAt(p, 0); got <- err }()
	synctest.Wait()
	select {
	case err := <-got:
		t.Fatalf("read returned (%v) before its bytes arrived", err)
	default:
	}
	src.step <- struct{}{}
	if err := <-got; err != nil || !bytes.Equal(p, blob[:1<<10]) {
		t.Fatalf("first KiB: %v", err)
	}
	// Let the rest arrive while reading it all.
	go func() {
		for range len(blob)/src.piece - 1 {
			src.step <- struct{}{}
		}
	}()
	all, err := io.ReadAll(ctdcontent.NewReader(ra))
	if err != nil || !bytes.Equal(all, blob) {
		t.Fatalf("whole blob: %v (%d bytes)", err, len(all))
	}
	synctest.Wait() // the download stores the blob
	if _, err := cs.Store.Info(ctx, d); err != nil {
		t.Fatalf("the claimed blob is not stored: %v", err)
	}
	if n, ok := inv.Size(d); !ok || n != int64(len(blob)) {
		t.Fatalf("stored claim not in the inventory: %d %v", n, ok)
	}
	if len(cs.Claimed()) != 0 || cl.has(d) {
		t.Fatalf("after success: claimed %v, forgotten %v", cs.Claimed(), cl.forgot)
	}
	if ents, _ := os.ReadDir(cs.dir); len(ents) != 0 {
		t.Fatalf("claims directory not empty: %v", ents)
	}
}

func TestClaimFailures(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt bool
		failAt  int64
	}{
		{name: "corrupt bytes", corrupt: true},
		{name: "peer dies mid-blob", failAt: 8 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx := context.Background()
				src := newFakeSource()
				src.corrupt, src.failAt = tc.corrupt, tc.failAt
				src.step = make(chan struct{})
				blob := randomBytes(t, 32<<10)
				d := src.add(blob)
				cs, inv, cl := newClaimStore(t, src, ClaimOptions{})
				if _, err := cs.Info(ctx, d); err != nil {
					t.Fatal(err)
				}
				ra, err := cs.ReaderAt(ctx, ocispec.Descriptor{Digest: d, Size: int64(len(blob))})
				if err != nil {
					t.Fatal(err)
				}
				defer ra.Close()
				stop := make(chan struct{})
				defer close(stop)
				go func() {
					for {
						select {
						case src.step <- struct{}{}:
						case <-stop:
							return
						}
					}
				}()
				_, err = io.ReadAll(ctdcontent.NewReader(ra))
				if err == nil {
					t.Fatal("reading a failed claim succeeded")
				}
				if !cl.has(d) {
					t.Fatal("a failed claim was not forgotten by containerd before the read failed")
				}
				synctest.Wait() // the failed download ends
				if _, err := cs.Info(ctx, d); !errdefs.IsNotFound(err) {
					t.Fatalf("Info after the claim failed: %v, want not found (the retry goes to the registry)", err)
				}
				if _, ok := inv.Size(d); ok {
					t.Fatal("a failed claim is in the inventory")
				}
				if _, err := cs.Store.Info(ctx, d); !errdefs.IsNotFound(err) {
					t.Fatalf("a failed claim was stored: %v", err)
				}
				if ents, _ := os.ReadDir(cs.dir); len(ents) != 0 {
					t.Fatalf("claims directory not empty: %v", ents)
				}
			})
		})
	}
}

func TestClaimDeletedByGC(t *testing.T) {
	synctest.Test(t, testClaimDeletedByGC)
}

func testClaimDeletedByGC(t *testing.T) {
	ctx := context.Background()
	src := newFakeSource()
	src.step = make(chan struct{})
	d := src.add(randomBytes(t, 16<<10))
	cs, _, cl := newClaimStore(t, src, ClaimOptions{})
	if _, err := cs.Info(ctx, d); err != nil {
		t.Fatal(err)
	}
	synctest.Wait()
	if got := src.startedList(); len(got) != 1 {
		t.Fatalf("downloads started: %v, want one", got)
	}
	if err := cs.Delete(ctx, d); err != nil {
		t.Fatalf("Delete of a claimed blob: %v", err)
	}
	src.mu.Lock()
	dctx := src.ctxs[d]
	src.mu.Unlock()
	if dctx.Err() == nil {
		t.Fatal("Delete did not cancel the download")
	}
	synctest.Wait() // the cancelled download ends
	if len(cs.Claimed()) != 0 {
		t.Fatalf("still claimed after Delete: %v", cs.Claimed())
	}
	if cl.has(d) {
		t.Fatal("a blob the garbage collector deleted was forgotten: containerd references nothing of it")
	}
	if err := cs.Delete(ctx, d); !errdefs.IsNotFound(err) {
		t.Fatalf("second Delete: %v, want not found", err)
	}
}

func TestClaimUnreadTimeout(t *testing.T) {
	synctest.Test(t, testClaimUnreadTimeout)
}

func testClaimUnreadTimeout(t *testing.T) {
	ctx := context.Background()
	src := newFakeSource()
	src.step = make(chan struct{})
	d := src.add(randomBytes(t, 16<<10))
	const unread = 100 * time.Millisecond
	cs, _, cl := newClaimStore(t, src, ClaimOptions{UnreadTimeout: unread})
	if _, err := cs.Info(ctx, d); err != nil {
		t.Fatal(err)
	}
	time.Sleep(unread - time.Nanosecond)
	synctest.Wait()
	if len(cs.Claimed()) != 1 {
		t.Fatalf("claim cancelled before its unread timeout: %v", cs.Claimed())
	}
	time.Sleep(time.Nanosecond)
	synctest.Wait()
	if len(cs.Claimed()) != 0 {
		t.Fatalf("unread claim not cancelled: %v", cs.Claimed())
	}
	if !cl.has(d) {
		t.Fatal("containerd not told to forget an unread claim")
	}
}

func TestClaimSlots(t *testing.T) {
	synctest.Test(t, testClaimSlots)
}

func testClaimSlots(t *testing.T) {
	ctx := context.Background()
	src := newFakeSource()
	src.step = make(chan struct{})
	a := src.add(randomBytes(t, 32<<10))
	b := src.add(randomBytes(t, 32<<10))
	c := src.add(randomBytes(t, 32<<10))
	cs, _, _ := newClaimStore(t, src, ClaimOptions{Active: 1, Tail: 4 << 10})
	for _, d := range []digest.Digest{a, b, c} {
		if _, err := cs.Info(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	synctest.Wait()
	if got := src.startedList(); len(got) != 1 || got[0] != a {
		t.Fatalf("started %v, want only the first claim", got)
	}
	// Someone reads c: it goes before b.
	rc, err := cs.ReaderAt(ctx, ocispec.Descriptor{Digest: c})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	// a nears its end (28 of 32 KiB): the next one starts.
	for range 28 {
		src.step <- struct{}{}
	}
	synctest.Wait()
	if got := src.startedList(); len(got) != 2 || got[1] != c {
		t.Fatalf("downloads %v, want a then the one being read (%s)", got, c)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case src.step <- struct{}{}:
			case <-stop:
				return
			}
		}
	}()
	synctest.Wait()
	if len(cs.Claimed()) != 0 {
		t.Fatalf("claims left: %v", cs.Claimed())
	}
	for _, d := range []digest.Digest{a, b, c} {
		if _, err := cs.Store.Info(ctx, d); err != nil {
			t.Fatalf("%s not stored: %v", d, err)
		}
	}
}

func TestClaimLeftByEarlierRun(t *testing.T) {
	synctest.Test(t, testClaimLeftByEarlierRun)
}

func testClaimLeftByEarlierRun(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s, err := NewStore(ctx, root, NewInventory())
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromString("half a layer")
	dir := filepath.Join(root, "claims")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, d.Encoded()), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	cl := &fakeCleaner{}
	cs, err := NewClaimStore(ctx, s, ClaimOptions{Source: newFakeSource(), Cleaner: cl})
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	if _, err := os.Stat(filepath.Join(dir, d.Encoded())); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("unfinished claim left in place: %v", err)
	}
	synctest.Wait()
	if !cl.has(d) {
		t.Fatal("containerd not told to forget the unfinished claim")
	}
}

// A reader of a blob containerd records but the store lacks (a claim lost
// with a restart) has containerd forget it, so the retry fetches it.
func TestMissingBlobForgotten(t *testing.T) {
	ctx := context.Background()
	cs, _, cl := newClaimStore(t, newFakeSource(), ClaimOptions{})
	d := digest.FromString("lost")
	if _, err := cs.ReaderAt(ctx, ocispec.Descriptor{Digest: d, Size: 4}); !errdefs.IsNotFound(err) {
		t.Fatalf("ReaderAt of a missing blob: %v", err)
	}
	if !cl.has(d) {
		t.Fatal("missing blob not forgotten")
	}
}

// An unpack that fails before the end of a claimed blob (on its bytes, or
// on a broken layer) does not end the claim: the unpack settles it. When
// the claim then fails, containerd has forgotten it by the time settle
// returns, before the unpack's error reaches containerd and its retry
// starts.
func TestClaimUnpackStopsEarly(t *testing.T) {
	ctx := context.Background()
	src := newFakeSource()
	src.step, src.failAt = make(chan struct{}, 64), 2<<10
	blob := randomBytes(t, 64<<10)
	d := src.add(blob)
	cs, _, cl := newClaimStore(t, src, ClaimOptions{})
	if _, err := cs.Info(ctx, d); err != nil {
		t.Fatal(err)
	}
	st := &applyState{}
	ra, err := cs.ApplyProvider().ReaderAt(context.WithValue(ctx, applyStateKey{}, st), ocispec.Descriptor{Digest: d, Size: int64(len(blob))})
	if err != nil {
		t.Fatal(err)
	}
	src.step <- struct{}{}
	if _, err := ra.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	if err := ra.Close(); err != nil {
		t.Fatal(err)
	}
	if len(cs.Claimed()) != 1 || cl.has(d) {
		t.Fatalf("claimed %v, forgotten %v after the unpack stopped: want the claim kept until it settles", cs.Claimed(), cl.has(d))
	}
	src.step <- struct{}{} // the source fails after its second piece
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if st.settle(sctx) {
		t.Fatal("settle says rewound; the claim failed")
	}
	if !cl.has(d) {
		t.Fatal("containerd not told to forget the failed claim before settle returned")
	}
	if _, err := cs.Info(ctx, d); !errdefs.IsNotFound(err) {
		t.Fatalf("Info after the claim failed: %v, want not found", err)
	}
	// A plain reader (containerd's Read RPCs read ranges) closing early
	// changes nothing.
	e := src.add(randomBytes(t, 64<<10))
	if _, err := cs.Info(ctx, e); err != nil {
		t.Fatal(err)
	}
	rb, err := cs.ReaderAt(ctx, ocispec.Descriptor{Digest: e})
	if err != nil {
		t.Fatal(err)
	}
	src.step <- struct{}{}
	if _, err := rb.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	rb.Close()
	if len(cs.Claimed()) != 1 {
		t.Fatalf("claimed %v after a range read closed, want the claim kept", cs.Claimed())
	}
}

// blockingSource holds every download until it is cancelled, then until
// release is closed: Close must wait for it.
type blockingSource struct {
	blobs     map[digest.Digest]int64
	started   chan digest.Digest // one per download
	cancelled chan struct{}      // closed when a download saw its cancellation
	release   chan struct{}
	returned  atomic.Bool
}

func (s *blockingSource) Claimable(d digest.Digest) (int64, bool) {
	n, ok := s.blobs[d]
	return n, ok
}

func (s *blockingSource) FetchClaim(ctx context.Context, d digest.Digest, _ int64, _ io.Writer) error {
	s.started <- d
	<-ctx.Done()
	close(s.cancelled)
	<-s.release
	s.returned.Store(true)
	return ctx.Err()
}

// TestClaimStoreClose: Close cancels the downloads, fails the claims'
// readers, and returns only once its goroutines have ended; afterwards
// nothing is claimed, and the claim's file is left for the next run.
func TestClaimStoreClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		d := digest.FromString("held up")
		src := &blockingSource{
			blobs:   map[digest.Digest]int64{d: 10, digest.FromString("other"): 10},
			started: make(chan digest.Digest, 4), cancelled: make(chan struct{}), release: make(chan struct{}),
		}
		cs, _, _ := newClaimStore(t, src, ClaimOptions{})
		if _, err := cs.Info(ctx, d); err != nil {
			t.Fatal(err)
		}
		<-src.started
		ra, err := cs.ReaderAt(ctx, ocispec.Descriptor{Digest: d, Size: 10})
		if err != nil {
			t.Fatal(err)
		}
		defer ra.Close()
		readErr := make(chan error, 1)
		go func() { _, err := ra.ReadAt(make([]byte, 10), 0); readErr <- err }()

		closed := make(chan error, 1)
		go func() { closed <- cs.Close() }()
		synctest.Wait()
		select {
		case <-src.cancelled:
		default:
			t.Fatal("Close did not cancel the download")
		}
		select {
		case err := <-closed:
			t.Fatalf("Close returned (%v) while its download still ran", err)
		default:
		}
		if err := <-readErr; !errdefs.IsUnavailable(err) {
			t.Fatalf("read of a claim when the store closed: %v, want unavailable", err)
		}
		close(src.release)
		if err := <-closed; err != nil {
			t.Fatalf("Close: %v", err)
		}
		if !src.returned.Load() {
			t.Fatal("Close returned before the download did")
		}

		if _, err := cs.Info(ctx, digest.FromString("other")); !errdefs.IsNotFound(err) {
			t.Fatalf("Info of a claimable blob after Close: %v, want not found", err)
		}
		if len(src.started) != 0 || len(cs.Claimed()) != 0 {
			t.Fatalf("after Close: downloads started %d, claimed %v", len(src.started), cs.Claimed())
		}
		if _, err := os.Stat(filepath.Join(cs.dir, d.Encoded())); err != nil {
			t.Fatalf("the claim's file is not left for the next run: %v", err)
		}
		if err := cs.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	})
}

// failingCleaner fails every Forget, as while containerd is not up.
type failingCleaner struct{ calls atomic.Int32 }

func (c *failingCleaner) Forget(context.Context, digest.Digest) error {
	c.calls.Add(1)
	return fmt.Errorf("containerd: %w", errdefs.ErrUnavailable)
}

// TestClaimStoreCloseStopsRecovery: the retries that have containerd
// forget an earlier run's claims stop at Close, without waiting them out.
func TestClaimStoreCloseStopsRecovery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		root := t.TempDir()
		s, err := NewStore(ctx, root, NewInventory())
		if err != nil {
			t.Fatal(err)
		}
		d := digest.FromString("half a layer")
		if err := os.MkdirAll(filepath.Join(root, "claims"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "claims", d.Encoded()), []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
		cl := &failingCleaner{}
		start := time.Now()
		cs, err := NewClaimStore(ctx, s, ClaimOptions{Source: newFakeSource(), Cleaner: cl})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second) // two tries
		if err := cs.Close(); err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el != 3*time.Second {
			t.Fatalf("Close returned %v after the start, want at once after 3s", el)
		}
		if n := cl.calls.Load(); n != 2 {
			t.Fatalf("Forget tried %d times, want 2 (at 0s and 2s)", n)
		}
	})
}

// A claim needs room in the budget; a Writer opened with another size (the
// manifest's) ends the claim.
func TestClaimSizeChecks(t *testing.T) {
	for _, tc := range []struct {
		name       string
		budget     int64
		writerSize int64 // a Writer opened after Info, with this size (the blob's is 32 KiB)
		wantClaim  bool
	}{
		{name: "room", budget: 1 << 20, wantClaim: true},
		{name: "writer agrees", budget: 1 << 20, writerSize: 32 << 10, wantClaim: true},
		{name: "budget too small", budget: 32<<10 - 1},
		{name: "writer disagrees", budget: 1 << 20, writerSize: 32<<10 + 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx := context.Background()
				src := newFakeSource()
				src.step = make(chan struct{}) // the download waits
				blob := randomBytes(t, 32<<10)
				d := src.add(blob)
				s, err := NewStore(ctx, t.TempDir(), NewInventory())
				if err != nil {
					t.Fatal(err)
				}
				budget, err := NewBudget(BudgetOptions{Max: tc.budget})
				if err != nil {
					t.Fatal(err)
				}
				cl := &fakeCleaner{}
				cs, err := NewClaimStore(ctx, s, ClaimOptions{Source: src, Cleaner: cl, Budget: budget})
				if err != nil {
					t.Fatal(err)
				}
				defer cs.Close()
				_, err = cs.Info(ctx, d)
				if tc.writerSize != 0 {
					if err != nil {
						t.Fatalf("Info before the writer: %v", err)
					}
					w, werr := cs.Writer(ctx, ctdcontent.WithRef("pull"), ctdcontent.WithDescriptor(ocispec.Descriptor{Digest: d, Size: tc.writerSize}))
					if werr != nil {
						t.Fatal(werr)
					}
					w.Close()
					synctest.Wait()
					if cl.has(d) == tc.wantClaim {
						t.Fatalf("containerd forgot the claim: %v; want %v (the writer's size denies it)", cl.has(d), !tc.wantClaim)
					}
					_, err = cs.Info(ctx, d)
				}
				if got := err == nil; got != tc.wantClaim {
					t.Fatalf("Info: %v; want claimed=%v", err, tc.wantClaim)
				}
				if !tc.wantClaim {
					if !errdefs.IsNotFound(err) {
						t.Fatalf("Info: %v; want not found (the registry serves)", err)
					}
					if budget.Used() != 0 {
						t.Fatalf("budget holds %d bytes with no claim", budget.Used())
					}
					return
				}
				if budget.Used() != int64(len(blob)) {
					t.Fatalf("budget holds %d bytes during the claim, want %d", budget.Used(), len(blob))
				}
				close(src.step) // let the download through
				ra, err := cs.ReaderAt(ctx, ocispec.Descriptor{Digest: d, Size: int64(len(blob))})
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(ctdcontent.NewReader(ra))
				ra.Close()
				if err != nil || !bytes.Equal(got, blob) {
					t.Fatalf("read the claim: %d bytes, %v", len(got), err)
				}
				synctest.Wait()
				if budget.Used() != 0 {
					t.Fatalf("budget holds %d bytes once the claim is stored", budget.Used())
				}
			})
		})
	}
}

// A blob under MinSize is not claimed: Info says not found.
func TestClaimMinSize(t *testing.T) {
	src := newFakeSource()
	small, big := src.add(randomBytes(t, 1<<10)), src.add(randomBytes(t, 4<<10))
	cs, _, _ := newClaimStore(t, src, ClaimOptions{MinSize: 2 << 10})
	if _, err := cs.Info(context.Background(), small); !errdefs.IsNotFound(err) {
		t.Fatalf("Info of a blob under the minimum: %v, want not found", err)
	}
	if info, err := cs.Info(context.Background(), big); err != nil || info.Size != 4<<10 {
		t.Fatalf("Info of a blob above the minimum: %+v, %v; want claimed", info, err)
	}
}

// TestClaimRewind: the source finds the claimed bytes bad and rewinds the
// claim: a reader opened before fails with ErrRewound (and the unpack that
// opened it learns the claim was rewound), a new reader gets the right
// bytes, and the claim is stored verified.
func TestClaimRewind(t *testing.T) {
	src := newFakeSource()
	src.step, src.corrupt, src.rewind = make(chan struct{}), true, true
	cs, _, _ := newClaimStore(t, src, ClaimOptions{})
	blob := make([]byte, 4<<10)
	if _, err := rand.Read(blob); err != nil {
		t.Fatal(err)
	}
	d := src.add(blob)
	desc := ocispec.Descriptor{Digest: d, Size: int64(len(blob))}
	ctx := context.Background()
	if _, err := cs.Info(ctx, d); err != nil {
		t.Fatalf("not claimed: %v", err)
	}
	st := &applyState{}
	r1, err := cs.ApplyProvider().ReaderAt(context.WithValue(ctx, applyStateKey{}, st), desc)
	if err != nil {
		t.Fatal(err)
	}
	src.step <- struct{}{}
	p := make([]byte, 1<<10)
	if _, err := r1.ReadAt(p, 0); err != nil {
		t.Fatalf("read the first piece: %v", err)
	}
	for range 3 {
		src.step <- struct{}{} // the rest, its last byte wrong; then the rewind
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if !st.settle(sctx) {
		t.Fatal("the unpack was not told the claim was rewound")
	}
	if _, err := r1.ReadAt(p, 0); !errors.Is(err, ErrRewound) {
		t.Fatalf("a reader opened before the rewind read: %v; want ErrRewound", err)
	}
	r1.Close()
	r2, err := cs.ApplyProvider().ReaderAt(ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	go func() {
		for range 4 {
			src.step <- struct{}{}
		}
	}()
	got := make([]byte, len(blob))
	if _, err := r2.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("read after the rewind: %v", err)
	}
	if !bytes.Equal(got, blob) {
		t.Fatal("the bytes read after the rewind are not the blob's")
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := cs.Store.Info(ctx, d); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the rewound claim is not stored: %v", err)
		}
	}
}

func TestEmptyTarget(t *testing.T) {
	empty, full := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(full, "f"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		mounts []mount.Mount
		want   string
	}{
		{"bind, empty", []mount.Mount{{Type: "bind", Source: empty, Options: []string{"rbind", "rw"}}}, empty},
		{"bind, not empty", []mount.Mount{{Type: "bind", Source: full}}, ""},
		{"overlay, empty upper", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=" + full, "upperdir=" + empty, "workdir=/w"}}}, empty},
		{"overlay, upper not empty", []mount.Mount{{Type: "overlay", Options: []string{"upperdir=" + full}}}, ""},
		{"two mounts", []mount.Mount{{Type: "bind", Source: empty}, {Type: "bind", Source: empty}}, ""},
		{"relative", []mount.Mount{{Type: "bind", Source: "rel"}}, ""},
		{"missing", []mount.Mount{{Type: "bind", Source: filepath.Join(empty, "no")}}, ""},
		{"other type", []mount.Mount{{Type: "erofs", Source: empty}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := emptyTarget(tc.mounts); got != tc.want {
				t.Fatalf("emptyTarget = %q; want %q", got, tc.want)
			}
		})
	}
	if err := os.MkdirAll(filepath.Join(empty, "a", "b"), 0o500); err != nil {
		t.Fatal(err)
	}
	if err := emptyDir(empty); err != nil {
		t.Fatal(err)
	}
	if emptyTarget([]mount.Mount{{Type: "bind", Source: empty}}) != empty {
		t.Fatal("emptyDir left something")
	}
}
