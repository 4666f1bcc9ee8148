package peers

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log/logtest"
	digest "github.com/opencontainers/go-digest"
)

// fakePeer serves a blob at a simulated rate, or misbehaves.
type fakePeer struct {
	rate     float64 // bytes/s; 0: unlimited
	mode     string  // "", "dead", "busy", "stall", "short", "failafter"
	after    int64   // failafter: bytes served before failing
	served   atomic.Int64
	requests atomic.Int32
}

type fakeFetcher struct {
	data  []byte
	peers map[string]*fakePeer
}

func (f *fakeFetcher) FetchRange(ctx context.Context, url string, _ digest.Digest, off, n, _ int64) (io.ReadCloser, error) {
	p := f.peers[url]
	p.requests.Add(1)
	switch p.mode {
	case "dead":
		return nil, errdefs.ErrUnavailable
	case "busy":
		return nil, &BusyError{Peer: url, RetryAfter: time.Second}
	}
	return &pacedReader{ctx: ctx, p: p, b: f.data[off : off+n]}, nil
}

// pacedReader sends at the peer's rate, in 64 KiB steps.
type pacedReader struct {
	ctx  context.Context
	p    *fakePeer
	b    []byte
	sent int
}

func (r *pacedReader) Read(buf []byte) (int, error) {
	if r.sent == len(r.b) {
		return 0, io.EOF
	}
	switch r.p.mode {
	case "stall":
		if r.sent >= len(r.b)/2 {
			<-r.ctx.Done()
			return 0, r.ctx.Err()
		}
	case "short":
		if r.sent >= len(r.b)/2 {
			return 0, io.EOF
		}
	case "failafter":
		if r.p.served.Load() >= r.p.after {
			return 0, errors.New("connection reset")
		}
	}
	n := min(len(buf), len(r.b)-r.sent, 64<<10)
	if r.p.rate > 0 {
		select {
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		case <-time.After(time.Duration(float64(n) / r.p.rate * float64(time.Second))):
		}
	}
	copy(buf, r.b[r.sent:r.sent+n])
	r.sent += n
	r.p.served.Add(int64(n))
	return n, nil
}

func (r *pacedReader) Close() error { return nil }

func TestDownload(t *testing.T) {
	const size = 8<<20 + 12345
	data := make([]byte, size)
	_, _ = rand.Read(data)
	d := digest.FromBytes(data)
	mb := float64(1 << 20)
	for _, tc := range []struct {
		name   string
		policy string
		peers  map[string]*fakePeer
		ok     bool
		check  func(t *testing.T, st DownloadStats, peers map[string]*fakePeer)
	}{
		{"stripe follows bandwidth", PolicyStripe, map[string]*fakePeer{"fast": {rate: 32 * mb}, "slow": {rate: 4 * mb}}, true,
			func(t *testing.T, st DownloadStats, _ map[string]*fakePeer) {
				if st.BytesByNode["fast"] <= 2*st.BytesByNode["slow"] || st.BytesByNode["slow"] == 0 {
					t.Fatalf("bytes by node %v: want both used, fast well ahead", st.BytesByNode)
				}
			}},
		{"stripe uses every peer", PolicyStripe, map[string]*fakePeer{"a": {rate: 32 * mb}, "b": {rate: 32 * mb}, "c": {rate: 32 * mb}}, true,
			func(t *testing.T, st DownloadStats, _ map[string]*fakePeer) {
				for _, n := range []string{"a", "b", "c"} {
					if st.BytesByNode[n] < size/6 {
						t.Fatalf("bytes by node %v: %s barely used", st.BytesByNode, n)
					}
				}
			}},
		{"dead peer dropped, busy one asked again", PolicyStripe, map[string]*fakePeer{"dead": {mode: "dead"}, "busy": {mode: "busy"}, "ok": {rate: 64 * mb}}, true,
			func(t *testing.T, st DownloadStats, _ map[string]*fakePeer) {
				if st.BytesByNode["ok"] != size || st.Failed["dead"] == nil || st.Busy == 0 {
					t.Fatalf("stats %+v", st)
				}
			}},
		{"a peer busy for ever is dropped", PolicyStripe, map[string]*fakePeer{"busy": {mode: "busy"}}, false, nil},
		{"peer dying mid-blob", PolicyStripe, map[string]*fakePeer{"dies": {rate: 64 * mb, mode: "failafter", after: 3 << 20}, "ok": {rate: 16 * mb}}, true,
			func(t *testing.T, st DownloadStats, _ map[string]*fakePeer) {
				if st.Failed["dies"] == nil || st.BytesByNode["ok"] == 0 {
					t.Fatalf("stats %+v", st)
				}
			}},
		{"stalled and short peers dropped", PolicyStripe, map[string]*fakePeer{"stall": {rate: 64 * mb, mode: "stall"}, "short": {rate: 64 * mb, mode: "short"}, "ok": {rate: 32 * mb}}, true,
			func(t *testing.T, st DownloadStats, _ map[string]*fakePeer) {
				// The stalled peer is either cut off or beaten by a hedge.
				if st.BytesByNode["stall"] != 0 || st.Failed["short"] == nil || st.BytesByNode["ok"] != size {
					t.Fatalf("stats %+v", st)
				}
			}},
		{"straggler hedged", PolicyStripe, map[string]*fakePeer{"fast": {rate: 64 * mb}, "crawl": {rate: 0.5 * mb}}, true,
			func(t *testing.T, st DownloadStats, _ map[string]*fakePeer) {
				if st.Hedged == 0 {
					t.Fatalf("no hedge with a 128x slower peer: %+v", st)
				}
			}},
		{"first takes the first only", PolicyFirst, map[string]*fakePeer{"a": {rate: 64 * mb}, "b": {rate: 64 * mb}}, true,
			func(t *testing.T, st DownloadStats, ps map[string]*fakePeer) {
				if st.BytesByNode["a"] != size || ps["b"].requests.Load() != 0 {
					t.Fatalf("stats %+v, b asked %d times", st, ps["b"].requests.Load())
				}
			}},
		{"first fails over", PolicyFirst, map[string]*fakePeer{"a": {mode: "dead"}, "b": {rate: 64 * mb}}, true,
			func(t *testing.T, st DownloadStats, _ map[string]*fakePeer) {
				if st.BytesByNode["b"] != size {
					t.Fatalf("stats %+v", st)
				}
			}},
		{"all fail", PolicyStripe, map[string]*fakePeer{"a": {mode: "dead"}, "b": {mode: "busy"}, "c": {rate: 64 * mb, mode: "short"}}, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := &fakeFetcher{data: data, peers: tc.peers}
				var cands []Candidate
				for _, name := range []string{"a", "b", "c", "fast", "slow", "dead", "busy", "ok", "dies", "stall", "short", "crawl"} {
					if _, ok := tc.peers[name]; ok {
						cands = append(cands, Candidate{Node: name, URL: name, Size: size})
					}
				}
				dl, err := NewDownloader(f, DownloadOptions{Policy: tc.policy, ChunkSize: 1 << 20, Buffer: 4 << 20, Stall: time.Second})
				if err != nil {
					t.Fatal(err)
				}
				var out bytes.Buffer
				st, err := dl.Download(context.Background(), d, size, cands, &out)
				if !tc.ok {
					if !errors.Is(err, ErrAllPeersFailed) {
						t.Fatalf("err %v, want every candidate failed", err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(out.Bytes(), data) {
					t.Fatal("downloaded bytes differ")
				}
				var total int64
				for _, n := range st.BytesByNode {
					total += n
				}
				if total != size {
					t.Fatalf("bytes by node sum to %d, want %d", total, size)
				}
				tc.check(t, st, tc.peers)
			})
		})
	}
}

// aheadWriter checks that the downloader never holds more than the buffer
// fetched ahead of the writer.
type aheadWriter struct {
	mu      sync.Mutex
	written int64
	fetched *atomic.Int64
	limit   int64
	over    int64
	slow    time.Duration
}

func (w *aheadWriter) Write(p []byte) (int, error) {
	time.Sleep(w.slow)
	w.mu.Lock()
	defer w.mu.Unlock()
	if ahead := w.fetched.Load() - w.written; ahead > w.limit {
		w.over = max(w.over, ahead)
	}
	w.written += int64(len(p))
	return len(p), nil
}

func TestDownloadBufferBound(t *testing.T) {
	synctest.Test(t, testDownloadBufferBound)
}

func testDownloadBufferBound(t *testing.T) {
	const size = 16 << 20
	data := make([]byte, size)
	_, _ = rand.Read(data)
	peers := map[string]*fakePeer{"a": {rate: 256 << 20}, "b": {rate: 256 << 20}}
	f := &fakeFetcher{data: data, peers: peers}
	dl, err := NewDownloader(f, DownloadOptions{ChunkSize: 1 << 20, Buffer: 3 << 20})
	if err != nil {
		t.Fatal(err)
	}
	var fetched atomic.Int64
	dl.opts.OnBytes = func(_ digest.Digest, _ string, n int) { fetched.Add(int64(n)) }
	// The writer is slow: the fetchers would run ahead without the bound.
	w := &aheadWriter{fetched: &fetched, limit: 3<<20 + 2<<20, slow: 20 * time.Millisecond}
	if _, err := dl.Download(context.Background(), digest.FromBytes(data), size, []Candidate{{Node: "a", URL: "a", Size: size}, {Node: "b", URL: "b", Size: size}}, w); err != nil {
		t.Fatal(err)
	}
	if w.over > 0 {
		t.Fatalf("%d bytes fetched ahead of the writer, bound %d", w.over, w.limit)
	}
}

func TestDownloaderRejects(t *testing.T) {
	if _, err := NewDownloader(nil, DownloadOptions{}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("nil fetcher: %v", err)
	}
	if _, err := NewDownloader(&fakeFetcher{}, DownloadOptions{Policy: "magic"}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("bad policy: %v", err)
	}
	dl, _ := NewDownloader(&fakeFetcher{}, DownloadOptions{})
	if _, err := dl.Download(context.Background(), digest.FromString("x"), 10, []Candidate{{Node: "a", URL: "a", Size: 11}}, io.Discard); !errdefs.IsNotFound(err) {
		t.Fatalf("no candidate of the right size: %v", err)
	}
}

// hedgeFetcher answers the first attempt at every chunk but the first only
// when it is cancelled, and every other attempt at once: idle peers keep
// hedging the chunks held up.
type hedgeFetcher struct {
	data []byte

	mu       sync.Mutex
	attempts map[int64]int
}

func (f *hedgeFetcher) FetchRange(ctx context.Context, _ string, _ digest.Digest, off, n, _ int64) (io.ReadCloser, error) {
	f.mu.Lock()
	f.attempts[off]++
	first := f.attempts[off] == 1
	f.mu.Unlock()
	if off > 0 && first {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return io.NopCloser(bytes.NewReader(f.data[off : off+n])), nil
}

// failingWriter fails its first Write, after a while.
type failingWriter struct{ after time.Duration }

var errLocalDisk = errors.New("local disk full")

func (w failingWriter) Write([]byte) (int, error) {
	time.Sleep(w.after) // in a bubble: peers hedge meanwhile
	return 0, errLocalDisk
}

// TestDownloadWriteFailureStats: the stats of a download whose writer fails
// are read while the peers' workers still count hedges. Under -race this
// catches a read of the stats without the lock the workers hold.
func TestDownloadWriteFailureStats(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const chunk = 64 << 10
		data := make([]byte, 6*chunk)
		f := &hedgeFetcher{data: data, attempts: map[int64]int{}}
		// Stall only bounds body reads: the held-up attempts block in
		// FetchRange, so hedging alone gets their chunks.
		dl, err := NewDownloader(f, DownloadOptions{ChunkSize: chunk, Buffer: 3 * chunk, Stall: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		cands := []Candidate{{Node: "a", URL: "a", Size: int64(len(data))}, {Node: "b", URL: "b", Size: int64(len(data))}, {Node: "c", URL: "c", Size: int64(len(data))}}
		st, err := dl.Download(t.Context(), digest.FromBytes(data), int64(len(data)), cands, failingWriter{after: time.Second})
		if !errors.Is(err, errLocalDisk) {
			t.Fatalf("err %v, want the writer's", err)
		}
		if st.Hedged == 0 {
			t.Fatalf("stats %+v: no hedge while the writer waited", st)
		}
	})
}

// TestDownloadSizeBounds: a size above MaxSize, which only a broken or
// hostile peer reports, is refused before anything is planned; one at the
// bound is downloaded.
func TestDownloadSizeBounds(t *testing.T) {
	data := []byte("a blob of thirty-one bytes, ok.")
	d := digest.FromBytes(data)
	f := &fakeFetcher{data: data, peers: map[string]*fakePeer{"a": {}}}
	cand := func(size int64) []Candidate { return []Candidate{{Node: "a", URL: "a", Size: size}} }
	for _, tc := range []struct {
		name    string
		maxSize int64
		size    int64
		ok      bool
	}{
		{"2^62 with the default bound", 0, 1 << 62, false},
		{"max int64", 0, 1<<63 - 1, false},
		{"one byte above the default bound", 0, DefaultMaxBlobSize + 1, false},
		{"above a configured bound", int64(len(data)) - 1, int64(len(data)), false},
		{"at a configured bound", int64(len(data)), int64(len(data)), true},
		{"below the default bound", 0, int64(len(data)), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dl, err := NewDownloader(f, DownloadOptions{MaxSize: tc.maxSize})
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			_, err = dl.Download(t.Context(), d, tc.size, cand(tc.size), &out)
			if tc.ok {
				if err != nil || !bytes.Equal(out.Bytes(), data) {
					t.Fatalf("Download: %v, %d bytes", err, out.Len())
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), strconv.FormatInt(tc.size, 10)) {
				t.Fatalf("Download of %d bytes: %v, want invalid argument naming the size", tc.size, err)
			}
			// Refused before any planning: a few allocations for the
			// error, none that grow with the size.
			allocs := testing.AllocsPerRun(10, func() {
				_, _ = dl.Download(t.Context(), d, tc.size, cand(tc.size), io.Discard)
			})
			if allocs > 16 {
				t.Fatalf("a refused size made %v allocations", allocs)
			}
		})
	}
	if _, err := NewDownloader(f, DownloadOptions{MaxSize: -1}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("negative max size: %v", err)
	}
}

// zeroFetcher serves zeros for the first limit bytes of any blob and fails
// every range beyond.
type zeroFetcher struct{ limit int64 }

func (f zeroFetcher) FetchRange(_ context.Context, _ string, _ digest.Digest, off, n, _ int64) (io.ReadCloser, error) {
	if off+n > f.limit {
		return nil, errdefs.ErrUnavailable
	}
	return io.NopCloser(io.LimitReader(zeroReader{}, n)), nil
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestDownloadPlansLazily: chunks are planned as the writer moves, so a
// blob of 2^50 bytes (2^30 chunks) costs the buffer's memory, not the
// size's: its peers serve 16 MiB and fail after.
func TestDownloadPlansLazily(t *testing.T) {
	const size, served = 1 << 50, 16 << 20
	dl, err := NewDownloader(zeroFetcher{limit: served}, DownloadOptions{MaxSize: size, ChunkSize: 1 << 20, Buffer: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cands := []Candidate{{Node: "a", URL: "a", Size: size}, {Node: "b", URL: "b", Size: size}}
	var cw countWriter
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err = dl.Download(logtest.WithT(t.Context(), t), digest.FromString("x"), size, cands, &cw)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, ErrAllPeersFailed) {
		t.Fatalf("err %v, want every candidate failed", err)
	}
	// The first chunks are small: the last whole chunk served ends within
	// a chunk of the limit.
	if cw.n > served || cw.n < served-(1<<20) {
		t.Fatalf("%d bytes written, want about the %d served", cw.n, served)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Fatalf("%d bytes allocated for a download buffered in 4 MiB", grew)
	}
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return len(p), nil
}
