package peers

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

// PartialPath is the coop API path of a blob this node is still downloading:
// GET PartialPath/<digest> answers a PartialStatus.
const PartialPath = "/coop/v1/partial"

// Bounds of a partial download: a chunk map is at most MaxPartialChunks
// bits, so a PartialStatus stays small whatever a peer claims.
const (
	MinPartialChunk  = 64 << 10
	MaxPartialChunks = 1 << 16
)

// PartialStatus is the body of GET PartialPath/<digest>: which chunks of
// the blob the node has (Have) and is fetching now (Fetching), as bitmaps
// of Chunks bits (chunk i is bytes [i*ChunkSize, (i+1)*ChunkSize), the last
// one shorter), bit i of byte i/8 from the lowest.
type PartialStatus struct {
	Node      string        `json:"node"`
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
	ChunkSize int64         `json:"chunk_size"`
	// Whole: the node holds the whole verified blob (no bitmaps).
	Whole    bool   `json:"whole,omitempty"`
	Have     []byte `json:"have,omitempty"`
	Fetching []byte `json:"fetching,omitempty"`
}

// Chunks is the number of chunks of a blob of size in chunks of chunk.
func Chunks(size, chunk int64) int {
	return int((size + chunk - 1) / chunk)
}

// Validate checks a status against the blob asked for: its digest, a size
// and chunk size within the bounds, and bitmaps of the right length.
func (s *PartialStatus) Validate(dgst digest.Digest, size int64) error {
	switch {
	case s.Digest != dgst:
		return fmt.Errorf("partial status of %q, asked %s: %w", s.Digest, dgst, errdefs.ErrDataLoss)
	case size > 0 && s.Size != size:
		return fmt.Errorf("partial status: size %d, want %d: %w", s.Size, size, errdefs.ErrDataLoss)
	case s.Whole && s.Size > 0 && len(s.Have) == 0 && len(s.Fetching) == 0:
		return nil
	case s.Size <= 0 || s.ChunkSize < MinPartialChunk || s.Size > s.ChunkSize*MaxPartialChunks:
		return fmt.Errorf("partial status: size %d in chunks of %d: %w", s.Size, s.ChunkSize, errdefs.ErrDataLoss)
	}
	n := (Chunks(s.Size, s.ChunkSize) + 7) / 8
	if len(s.Have) != n || (len(s.Fetching) != 0 && len(s.Fetching) != n) {
		return fmt.Errorf("partial status: bitmaps of %d and %d bytes, want %d: %w", len(s.Have), len(s.Fetching), n, errdefs.ErrDataLoss)
	}
	return nil
}

// bitmap is a set of chunk indexes.
type bitmap []uint64

func newBitmap(n int) bitmap    { return make(bitmap, (n+63)/64) }
func (b bitmap) has(i int) bool { return i >= 0 && i/64 < len(b) && b[i/64]&(1<<(i%64)) != 0 }
func (b bitmap) set(i int)      { b[i/64] |= 1 << (i % 64) }
func (b bitmap) clear(i int)    { b[i/64] &^= 1 << (i % 64) }

// bytes encodes the first n bits as PartialStatus does.
func (b bitmap) bytes(n int) []byte {
	out := make([]byte, (n+7)/8)
	for i := range n {
		if b.has(i) {
			out[i/8] |= 1 << (i % 8)
		}
	}
	return out
}

// bitmapFromBytes decodes n bits of a PartialStatus bitmap.
func bitmapFromBytes(p []byte, n int) bitmap {
	b := newBitmap(n)
	for i := range n {
		if i/8 < len(p) && p[i/8]&(1<<(i%8)) != 0 {
			b.set(i)
		}
	}
	return b
}

// Partials are the blobs this node is downloading chunk by chunk into spool
// files, so that peers can take the chunks already here while the rest
// arrives (a swarm: in a rollout, a blob leaves its source about once). A
// partial blob is not verified yet: the node that assembles it checks the
// digest, as for any download. It is safe for concurrent use.
type Partials struct {
	dir      string
	mu       sync.Mutex
	m        map[digest.Digest]*Partial
	watchers map[int]func()
	nextW    int
}

// Watch calls fn (in its own goroutine) whenever a partial download starts
// or ends, until cancel.
func (ps *Partials) Watch(fn func()) (cancel func()) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.watchers == nil {
		ps.watchers = map[int]func(){}
	}
	id := ps.nextW
	ps.nextW++
	ps.watchers[id] = fn
	return func() {
		ps.mu.Lock()
		defer ps.mu.Unlock()
		delete(ps.watchers, id)
	}
}

// notifyLocked tells the watchers the list changed.
func (ps *Partials) notifyLocked() {
	for _, fn := range ps.watchers {
		go fn()
	}
}

// Blobs returns the blobs being downloaded, with their sizes, by digest.
func (ps *Partials) Blobs() []content.Blob {
	if ps == nil {
		return nil
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make([]content.Blob, 0, len(ps.m))
	for d, p := range ps.m {
		out = append(out, content.Blob{Digest: d, Size: p.size})
	}
	slices.SortFunc(out, func(a, b content.Blob) int { return strings.Compare(string(a.Digest), string(b.Digest)) })
	return out
}

// NewPartials keeps the spool files in dir, emptied first (a partial does
// not outlive the process that downloads it).
func NewPartials(dir string) (*Partials, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("partials %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("partials %s: %w", dir, err)
	}
	return &Partials{dir: dir, m: map[digest.Digest]*Partial{}}, nil
}

// Start begins a partial download of dgst in chunks of chunk bytes. It
// returns false when dgst is being downloaded here already (the caller
// downloads without sharing it).
func (ps *Partials) Start(dgst digest.Digest, size, chunk int64) (*Partial, bool, error) {
	if err := dgst.Validate(); err != nil {
		return nil, false, fmt.Errorf("partial %q: %v: %w", dgst, err, errdefs.ErrInvalidArgument)
	}
	if size <= 0 || chunk < MinPartialChunk || size > chunk*MaxPartialChunks {
		return nil, false, fmt.Errorf("partial %s: size %d in chunks of %d: %w", dgst, size, chunk, errdefs.ErrInvalidArgument)
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if _, ok := ps.m[dgst]; ok {
		return nil, false, nil
	}
	f, err := os.CreateTemp(ps.dir, dgst.Encoded()+"-*")
	if err != nil {
		return nil, false, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, false, err
	}
	n := Chunks(size, chunk)
	p := &Partial{ps: ps, dgst: dgst, size: size, chunk: chunk, n: n, f: f,
		have: newBitmap(n), fetching: newBitmap(n), changed: make(chan struct{})}
	ps.m[dgst] = p
	ps.notifyLocked()
	return p, true, nil
}

// Get returns the partial download of dgst, nil when there is none.
func (ps *Partials) Get(dgst digest.Digest) *Partial {
	if ps == nil {
		return nil
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.m[dgst]
}

// Partial is one blob being downloaded into a spool file.
type Partial struct {
	ps          *Partials
	dgst        digest.Digest
	size, chunk int64
	n           int
	f           *os.File

	mu       sync.Mutex
	have     bitmap
	fetching bitmap
	changed  chan struct{} // closed and replaced at every change
	ended    bool
}

// Digest, Size, ChunkSize and Chunks describe the blob.
func (p *Partial) Digest() digest.Digest { return p.dgst }
func (p *Partial) Size() int64           { return p.size }
func (p *Partial) ChunkSize() int64      { return p.chunk }
func (p *Partial) Chunks() int           { return p.n }

// Span returns chunk i's offset and length.
func (p *Partial) Span(i int) (off, n int64) {
	off = int64(i) * p.chunk
	return off, min(p.chunk, p.size-off)
}

func (p *Partial) changedLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// Fetching marks chunk i as being fetched (on) or no longer (off).
func (p *Partial) Fetching(i int, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if i < 0 || i >= p.n || p.ended {
		return
	}
	if on {
		p.fetching.set(i)
	} else {
		p.fetching.clear(i)
	}
	p.changedLocked()
}

// Put writes chunk i, which must have its full length.
func (p *Partial) Put(i int, data []byte) error {
	if i < 0 || i >= p.n {
		return fmt.Errorf("chunk %d of %d: %w", i, p.n, errdefs.ErrInvalidArgument)
	}
	off, n := p.Span(i)
	if int64(len(data)) != n {
		return fmt.Errorf("chunk %d: %d bytes, want %d: %w", i, len(data), n, errdefs.ErrInvalidArgument)
	}
	if _, err := p.f.WriteAt(data, off); err != nil {
		return fmt.Errorf("spool %s chunk %d: %w", p.dgst, i, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ended {
		return fmt.Errorf("partial %s ended: %w", p.dgst, errdefs.ErrAborted)
	}
	p.have.set(i)
	p.fetching.clear(i)
	p.changedLocked()
	return nil
}

// Has says whether chunk i is here.
func (p *Partial) Has(i int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.have.has(i)
}

// Wait waits until chunk i is here, or fails with ErrUnavailable when it
// is neither here nor being fetched, or the partial ended, or ctx is done.
func (p *Partial) Wait(ctx context.Context, i int) error {
	for {
		p.mu.Lock()
		switch {
		case p.have.has(i):
			p.mu.Unlock()
			return nil
		case p.ended:
			p.mu.Unlock()
			return fmt.Errorf("partial %s ended: %w", p.dgst, errdefs.ErrUnavailable)
		case !p.fetching.has(i):
			p.mu.Unlock()
			return fmt.Errorf("chunk %d of %s is not being fetched: %w", i, p.dgst, errdefs.ErrUnavailable)
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			return fmt.Errorf("chunk %d of %s: %w: %w", i, p.dgst, errdefs.ErrUnavailable, ctx.Err())
		case <-ch:
		}
	}
}

// Open returns a reader of the spool file for chunks that are here; it
// stays readable after End. Close it.
func (p *Partial) Open() (*os.File, error) {
	return os.Open(p.f.Name())
}

// ReadAt reads from the spool; the caller reads only chunks here.
func (p *Partial) ReadAt(b []byte, off int64) (int, error) {
	return p.f.ReadAt(b, off)
}

// Status is the partial's PartialStatus.
func (p *Partial) Status(node string) PartialStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PartialStatus{Node: node, Digest: p.dgst, Size: p.size, ChunkSize: p.chunk,
		Have: p.have.bytes(p.n), Fetching: p.fetching.bytes(p.n)}
}

// End removes the partial: peers no longer see it, and its spool file goes
// once the readers that opened it close it.
func (p *Partial) End() {
	p.ps.mu.Lock()
	if p.ps.m[p.dgst] == p {
		delete(p.ps.m, p.dgst)
		p.ps.notifyLocked()
	}
	p.ps.mu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ended {
		return
	}
	p.ended = true
	p.changedLocked()
	os.Remove(p.f.Name())
	p.f.Close()
}
