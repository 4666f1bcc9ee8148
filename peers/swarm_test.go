package peers

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

// countingHandler counts the bytes h writes in answers.
type countingHandler struct {
	h http.Handler
	n atomic.Int64
}

func (c *countingHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.h.ServeHTTP(&countedRW{ResponseWriter: w, n: &c.n}, r)
}

type countedRW struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c *countedRW) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (c *countedRW) Flush() {
	if f, ok := c.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// swarmNode is a node with no blob but its partial downloads, served.
type swarmNode struct {
	name     string
	partials *Partials
	srv      *countingHandler
	url      string
}

func newSwarmNode(ctx context.Context, t *testing.T, name string) *swarmNode {
	t.Helper()
	ps, err := NewPartials(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	inv := content.NewInventory()
	store, err := content.NewStore(ctx, t.TempDir(), inv)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(ServerOptions{Node: name, Store: store, Inventory: inv, Partials: ps, PartialWait: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	n := &swarmNode{name: name, partials: ps, srv: &countingHandler{h: s}}
	ts := httptest.NewServer(n.srv)
	t.Cleanup(ts.Close)
	n.url = ts.URL
	return n
}

// TestPartialServed: a node serves the chunks of a blob it is still
// downloading, waits for those being fetched, says "not yet" for the
// others, and tells which it has.
func TestPartialServed(t *testing.T) {
	ctx := context.Background()
	n := newSwarmNode(ctx, t, "a")
	data := bytes.Repeat([]byte("0123456789abcdef"), 4*MinPartialChunk/16+100) // 5 chunks
	dgst := digest.FromBytes(data)
	size := int64(len(data))
	p, ok, err := n.partials.Start(dgst, size, MinPartialChunk)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	if _, again, _ := n.partials.Start(dgst, size, MinPartialChunk); again {
		t.Fatal("a second partial of one blob")
	}
	chunk := func(i int) []byte {
		off, k := p.Span(i)
		return data[off : off+k]
	}
	if err := p.Put(0, chunk(0)); err != nil {
		t.Fatal(err)
	}
	if err := p.Put(4, chunk(4)); err != nil {
		t.Fatal(err)
	}
	c := &Client{HTTP: &http.Client{}, Node: "b"}
	read := func(off, length int64) ([]byte, error) {
		body, err := c.FetchRange(ctx, n.url, dgst, off, length, size)
		if err != nil {
			return nil, err
		}
		defer body.Close()
		var b bytes.Buffer
		_, err = b.ReadFrom(body)
		return b.Bytes(), err
	}
	// Here.
	for _, i := range []int{0, 4} {
		off, k := p.Span(i)
		if got, err := read(off, k); err != nil || !bytes.Equal(got, chunk(i)) {
			t.Fatalf("chunk %d: %d bytes, %v", i, len(got), err)
		}
	}
	// Neither here nor being fetched: not yet, at once.
	off, k := p.Span(2)
	start := time.Now()
	if _, err := read(off, k); !IsNotYet(err) || !errdefs.IsUnavailable(err) {
		t.Fatalf("chunk 2: %v, want not yet", err)
	}
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Errorf("not yet took %v", el)
	}
	// Being fetched: answered when it arrives.
	p.Fetching(1, true)
	go func() {
		time.Sleep(100 * time.Millisecond)
		_ = p.Put(1, chunk(1))
	}()
	off, k = p.Span(1)
	if got, err := read(off, k); err != nil || !bytes.Equal(got, chunk(1)) {
		t.Fatalf("chunk 1 once it came: %v", err)
	}
	// A range into a missing chunk: not yet.
	if _, err := read(off, k+10); !IsNotYet(err) {
		t.Fatalf("chunk 1 and some of 2: %v, want not yet", err)
	}
	// The whole blob and HEAD: not here.
	if _, err := read(0, size); !errdefs.IsNotFound(err) {
		t.Errorf("whole blob: %v, want not found", err)
	}
	st, err := c.PartialStatus(ctx, n.url, dgst, size)
	if err != nil {
		t.Fatal(err)
	}
	if have := bitmapFromBytes(st.Have, 5); !have.has(0) || !have.has(1) || have.has(2) || !have.has(4) || st.Whole {
		t.Errorf("status %+v", st)
	}
	p.End()
	if _, err := c.PartialStatus(ctx, n.url, dgst, size); !errdefs.IsNotFound(err) {
		t.Errorf("status after the end: %v", err)
	}
	if _, err := c.PartialStatus(ctx, n.url, dgst, size+1); err == nil {
		t.Error("status of another size accepted")
	}
}

// TestSwarmDownload: three nodes download one blob at once from a slow
// source and from each other. Each gets the blob; the source sends fewer
// bytes than three copies, and the nodes upload to each other.
func TestSwarmDownload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := newFixture(ctx, t, 4<<20)
	srcH := &countingHandler{h: LimitUpload(src.srv, 4<<20)}
	srcTS := httptest.NewServer(srcH)
	defer srcTS.Close()
	size := int64(len(src.big))
	nodes := []*swarmNode{newSwarmNode(ctx, t, "n1"), newSwarmNode(ctx, t, "n2"), newSwarmNode(ctx, t, "n3")}
	cands := func(self string) []Candidate {
		cs := []Candidate{{Node: "src", URL: srcTS.URL, Size: size}}
		for _, n := range nodes {
			if n.name != self && n.partials.Get(src.bigD) != nil {
				cs = append(cs, Candidate{Node: n.name, URL: n.url, Size: size, Partial: true})
			}
		}
		return cs
	}
	var wg sync.WaitGroup
	outs := make([]bytes.Buffer, len(nodes))
	errs := make([]error, len(nodes))
	stats := make([]DownloadStats, len(nodes))
	for i, n := range nodes {
		dl, err := NewDownloader(&Client{HTTP: &http.Client{}, Node: n.name}, DownloadOptions{
			ChunkSize: MinPartialChunk, Partials: n.partials, PartialPoll: 20 * time.Millisecond,
			Refresh: func(context.Context, digest.Digest) []Candidate { return cands(n.name) },
		})
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			stats[i], errs[i] = dl.Download(ctx, src.bigD, size, cands(n.name), &outs[i])
		})
	}
	wg.Wait()
	var uploaded int64
	for i, n := range nodes {
		if errs[i] != nil {
			t.Fatalf("%s: %v", n.name, errs[i])
		}
		if !bytes.Equal(outs[i].Bytes(), src.big) {
			t.Fatalf("%s: wrong bytes", n.name)
		}
		if n.partials.Get(src.bigD) != nil {
			t.Errorf("%s: partial left after the download", n.name)
		}
		uploaded += n.srv.n.Load()
		t.Logf("%s: bytes by node %v, uploaded %d", n.name, stats[i].BytesByNode, n.srv.n.Load())
	}
	t.Logf("source sent %d bytes (%.2f blobs)", srcH.n.Load(), float64(srcH.n.Load())/float64(size))
	if got := srcH.n.Load(); got >= 3*size {
		t.Errorf("the source sent %d bytes, 3 blobs are %d", got, 3*size)
	}
	if uploaded == 0 {
		t.Error("no node uploaded to another")
	}
}

// TestSwarmFallsBack: with a peer that says it is downloading the blob but
// never has a chunk, and another that fails, the download completes from
// the source; without a source it fails.
func TestSwarmFallsBack(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := newFixture(ctx, t, 1<<20)
	srcTS := httptest.NewServer(src.srv)
	defer srcTS.Close()
	size := int64(len(src.big))
	idle := newSwarmNode(ctx, t, "idle")
	p, _, err := idle.partials.Start(src.bigD, size, MinPartialChunk)
	if err != nil {
		t.Fatal(err)
	}
	defer p.End()
	for i := range p.Chunks() {
		p.Fetching(i, true) // forever
	}
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	me := newSwarmNode(ctx, t, "me")
	dl, err := NewDownloader(&Client{HTTP: &http.Client{}, Node: "me"}, DownloadOptions{
		ChunkSize: MinPartialChunk, Partials: me.partials, PartialPoll: 20 * time.Millisecond, Stall: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cands := []Candidate{
		{Node: "src", URL: srcTS.URL, Size: size},
		{Node: "idle", URL: idle.url, Size: size, Partial: true},
		{Node: "dead", URL: dead.URL, Size: size, Partial: true},
	}
	st, err := dl.Download(ctx, src.bigD, size, cands, &out)
	if err != nil || !bytes.Equal(out.Bytes(), src.big) {
		t.Fatalf("download: %v (%d bytes)", err, out.Len())
	}
	if st.BytesByNode["src"] != size {
		t.Errorf("stats %+v", st)
	}
	// Partial peers alone that never deliver: the download ends with an error.
	out.Reset()
	_, err = dl.Download(ctx, src.bigD, size, cands[1:], &out)
	if !errors.Is(err, ErrAllPeersFailed) {
		t.Fatalf("partial peers only: %v", err)
	}
}

// hangFetcher serves data from every peer but "hang", whose bodies never
// send a byte.
type hangFetcher struct{ data []byte }

func (f hangFetcher) FetchRange(ctx context.Context, url string, _ digest.Digest, off, n, _ int64) (io.ReadCloser, error) {
	if url == "hang" {
		return io.NopCloser(&blockingReader{ctx: ctx}), nil
	}
	return io.NopCloser(bytes.NewReader(f.data[off : off+n])), nil
}

type blockingReader struct{ ctx context.Context }

func (r *blockingReader) Read([]byte) (int, error) {
	<-r.ctx.Done()
	return 0, r.ctx.Err()
}

// TestSwarmHedges: a whole holder that never sends a byte does not hold the
// blob up to the stall timeout: its chunks are hedged on the other holder.
func TestSwarmHedges(t *testing.T) {
	data := bytes.Repeat([]byte("swarm hedge "), 200_000)
	dgst := digest.FromBytes(data)
	ps, err := NewPartials(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dl, err := NewDownloader(hangFetcher{data}, DownloadOptions{ChunkSize: MinPartialChunk, Partials: ps, Stall: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out bytes.Buffer
	size := int64(len(data))
	st, err := dl.Download(ctx, dgst, size, []Candidate{{Node: "hang", URL: "hang", Size: size}, {Node: "ok", URL: "ok", Size: size}}, &out)
	if err != nil || !bytes.Equal(out.Bytes(), data) {
		t.Fatalf("download: %v", err)
	}
	if st.Hedged == 0 || st.BytesByNode["hang"] != 0 {
		t.Errorf("stats %+v: want hedged chunks, nothing from the hanging peer", st)
	}
}

// busyFetcher answers 429 from "busy" the first times, then serves.
type busyFetcher struct {
	data []byte
	left atomic.Int64
}

func (f *busyFetcher) FetchRange(_ context.Context, url string, _ digest.Digest, off, n, _ int64) (io.ReadCloser, error) {
	if f.left.Add(-1) >= 0 {
		return nil, &BusyError{Peer: url, RetryAfter: 10 * time.Millisecond}
	}
	return io.NopCloser(bytes.NewReader(f.data[off : off+n])), nil
}

// TestSwarmWaitsOutBusy: a source that answers 429 (a burst) is asked
// again, not dropped: the download completes from it alone.
func TestSwarmWaitsOutBusy(t *testing.T) {
	data := bytes.Repeat([]byte("busy "), 100_000)
	dgst := digest.FromBytes(data)
	ps, err := NewPartials(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	f := &busyFetcher{data: data}
	f.left.Store(5)
	dl, err := NewDownloader(f, DownloadOptions{ChunkSize: MinPartialChunk, Partials: ps})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	size := int64(len(data))
	st, err := dl.Download(context.Background(), dgst, size, []Candidate{{Node: "src", URL: "src", Size: size}}, &out)
	if err != nil || !bytes.Equal(out.Bytes(), data) {
		t.Fatalf("download: %v", err)
	}
	if st.Busy != 5 || st.BytesByNode["src"] != size {
		t.Errorf("stats %+v: want 5 busy answers waited out, every byte from src", st)
	}
}
