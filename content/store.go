package content

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Store is a content store on disk that tells a Recorder about every blob it
// gains (Commit) and loses (Delete).
type Store struct {
	ctdcontent.Store
	root   string
	rec    Recorder
	sizes  *ExpectedSizes
	labels *labels
	// locks orders a commit and a delete of the same digest, so the
	// recorder sees them in the order the files changed.
	locks *digestLocks
}

var _ ctdcontent.Store = (*Store)(nil)

// StoreOpt configures a Store.
type StoreOpt func(*Store)

// WithExpectedSizes has the store teach sizes the children of every manifest
// and index committed to it.
func WithExpectedSizes(e *ExpectedSizes) StoreOpt {
	return func(s *Store) { s.sizes = e }
}

// NewStore opens (creating if needed) the local store under root and feeds rec
// with every blob already there, then with every later commit and delete.
func NewStore(ctx context.Context, root string, rec Recorder, opts ...StoreOpt) (*Store, error) {
	if rec == nil {
		return nil, fmt.Errorf("content store needs a recorder: %w", errdefs.ErrInvalidArgument)
	}
	if err := os.MkdirAll(filepath.Join(root, "blobs"), 0o755); err != nil {
		return nil, fmt.Errorf("create content store %s: %w", root, err)
	}
	lbl := newLabels()
	ls, err := local.NewLabeledStore(root, lbl)
	if err != nil {
		return nil, fmt.Errorf("open content store %s: %w", root, err)
	}
	s := &Store{Store: ls, root: root, rec: rec, labels: lbl, locks: newDigestLocks()}
	for _, o := range opts {
		o(s)
	}
	n := 0
	if err := ls.Walk(ctx, func(info ctdcontent.Info) error {
		rec.Add(info.Digest, info.Size)
		n++
		return nil
	}); err != nil {
		return nil, fmt.Errorf("walk content store %s: %w", root, err)
	}
	log.G(ctx).WithField("root", root).WithField("blobs", n).Debug("content store opened")
	return s, nil
}

// Writer returns a writer whose successful Commit is recorded.
func (s *Store) Writer(ctx context.Context, opts ...ctdcontent.WriterOpt) (ctdcontent.Writer, error) {
	w, err := s.Store.Writer(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return &writer{Writer: w, s: s}, nil
}

// Delete removes the blob and records it.
// If the content is not present, ErrNotFound is returned.
func (s *Store) Delete(ctx context.Context, dgst digest.Digest) error {
	unlock := s.locks.lock(dgst)
	defer unlock()
	if _, err := s.Info(ctx, dgst); err != nil {
		return err
	}
	if err := s.Store.Delete(ctx, dgst); err != nil {
		return err
	}
	_ = s.labels.Set(dgst, nil)
	s.rec.Remove(dgst)
	return nil
}

// adopt moves the file at path, whose bytes were verified to be dgst of
// size bytes, into the store as that blob, and records it. A blob already
// there wins: path is then removed.
func (s *Store) adopt(ctx context.Context, path string, dgst digest.Digest, size int64) error {
	unlock := s.locks.lock(dgst)
	defer unlock()
	if _, err := s.Info(ctx, dgst); err == nil {
		return os.Remove(path)
	}
	target := filepath.Join(s.root, "blobs", dgst.Algorithm().String(), dgst.Encoded())
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return err
	}
	// Read-only, as the local store leaves committed blobs.
	if err := os.Chmod(path, 0o444); err != nil {
		return err
	}
	if err := os.Rename(path, target); err != nil {
		return fmt.Errorf("adopt %s: %w", dgst, err)
	}
	s.rec.Add(dgst, size)
	return nil
}

type writer struct {
	ctdcontent.Writer
	s *Store
}

// Commit commits the blob and records it, also when no digest is expected:
// the digest is then the writer's own.
func (w *writer) Commit(ctx context.Context, size int64, expected digest.Digest, opts ...ctdcontent.Opt) error {
	dgst := expected
	if dgst == "" {
		dgst = w.Digest() // of the bytes written so far: what commit lands
	}
	unlock := w.s.locks.lock(dgst)
	defer unlock()
	err := w.Writer.Commit(ctx, size, expected, opts...)
	if err != nil && !errdefs.IsAlreadyExists(err) {
		return err
	}
	info, ierr := w.s.Info(ctx, dgst)
	if ierr != nil {
		log.G(ctx).WithError(ierr).WithField("digest", dgst).Warn("committed blob has no info")
		return err
	}
	w.s.rec.Add(info.Digest, info.Size)
	if w.s.sizes != nil {
		w.s.learn(ctx, info)
	}
	return err
}

// learn teaches the store's sizes the children of the blob, when it is a
// manifest or an index.
func (s *Store) learn(ctx context.Context, info ctdcontent.Info) {
	if info.Size <= 0 || info.Size > MaxManifestSize {
		return
	}
	ra, err := s.ReaderAt(ctx, ocispec.Descriptor{Digest: info.Digest, Size: info.Size})
	if err != nil {
		return
	}
	defer ra.Close()
	if n := s.sizes.LearnBlob(info.Digest, ra, info.Size); n > 0 {
		log.G(ctx).WithField("digest", info.Digest).WithField("blobs", n).Debug("sizes learned from a manifest")
	}
}

// digestLocks is a mutex per digest, created on demand.
type digestLocks struct {
	mu sync.Mutex
	m  map[digest.Digest]*digestLock
}

type digestLock struct {
	sync.Mutex
	users int
}

func newDigestLocks() *digestLocks {
	return &digestLocks{m: map[digest.Digest]*digestLock{}}
}

// lock locks dgst and returns its unlock.
func (l *digestLocks) lock(dgst digest.Digest) (unlock func()) {
	l.mu.Lock()
	dl, ok := l.m[dgst]
	if !ok {
		dl = &digestLock{}
		l.m[dgst] = dl
	}
	dl.users++
	l.mu.Unlock()
	dl.Lock()
	return func() {
		dl.Unlock()
		l.mu.Lock()
		if dl.users--; dl.users == 0 {
			delete(l.m, dgst)
		}
		l.mu.Unlock()
	}
}

// labels is an in-memory label store. containerd keeps labels in its own
// metadata and never sends them to a proxy store, so they need not persist.
type labels struct {
	mu sync.Mutex
	m  map[digest.Digest]map[string]string
}

var _ local.LabelStore = (*labels)(nil)

func newLabels() *labels {
	return &labels{m: map[digest.Digest]map[string]string{}}
}

func (l *labels) Get(d digest.Digest) (map[string]string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return copyLabels(l.m[d]), nil
}

func (l *labels) Set(d digest.Digest, m map[string]string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(m) == 0 {
		delete(l.m, d)
		return nil
	}
	l.m[d] = copyLabels(m)
	return nil
}

func (l *labels) Update(d digest.Digest, update map[string]string) (map[string]string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	m := copyLabels(l.m[d])
	if m == nil {
		m = map[string]string{}
	}
	for k, v := range update {
		if v == "" {
			delete(m, k)
		} else {
			m[k] = v
		}
	}
	l.m[d] = m
	return copyLabels(m), nil
}

func copyLabels(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	c := make(map[string]string, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}
