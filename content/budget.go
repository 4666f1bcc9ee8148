package content

import (
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// DefaultMaxUnverified is the default Budget maximum: the bytes of blobs
// being fetched from peers, not verified yet, a node holds on disk at once.
const DefaultMaxUnverified = 64 << 30

// Budget bounds the disk taken by blobs fetched from peers before their
// digest is checked: their sizes summed never exceed Max, nor the free space
// of the filesystem they land on. A fetch the budget refuses is left to the
// registry. It is safe for concurrent use.
type Budget struct {
	max  int64
	free func() (int64, error)

	mu   sync.Mutex
	used int64
}

// BudgetOptions configure a Budget.
type BudgetOptions struct {
	// Max bounds the unverified bytes. Default DefaultMaxUnverified.
	Max int64
	// Dir is a directory on the filesystem the blobs land on; when set, a
	// reservation also needs that much free space there (beyond the other
	// reservations).
	Dir string
}

// NewBudget returns a Budget.
func NewBudget(o BudgetOptions) (*Budget, error) {
	if o.Max < 0 {
		return nil, fmt.Errorf("unverified bytes maximum %d: %w", o.Max, errdefs.ErrInvalidArgument)
	}
	if o.Max == 0 {
		o.Max = DefaultMaxUnverified
	}
	b := &Budget{max: o.Max}
	if o.Dir != "" {
		dir := o.Dir
		b.free = func() (int64, error) { return freeBytes(dir) }
	}
	return b, nil
}

// Reserve takes size bytes of the budget; release gives them back (once).
// It fails with ErrResourceExhausted, saying which bound it hit.
func (b *Budget) Reserve(size int64) (release func(), err error) {
	if b == nil {
		return func() {}, nil
	}
	if size < 0 {
		return nil, fmt.Errorf("reserve %d bytes: %w", size, errdefs.ErrInvalidArgument)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+size > b.max {
		return nil, fmt.Errorf("%d unverified bytes would exceed the maximum of %d (%d in flight): %w",
			size, b.max, b.used, errdefs.ErrResourceExhausted)
	}
	if b.free != nil {
		free, err := b.free()
		if err != nil {
			return nil, fmt.Errorf("free space for %d unverified bytes: %w", size, err)
		}
		if b.used+size > free {
			return nil, fmt.Errorf("%d unverified bytes (%d more in flight) do not fit the %d bytes free: %w",
				size, b.used, free, errdefs.ErrResourceExhausted)
		}
	}
	b.used += size
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			b.used -= size
			b.mu.Unlock()
		})
	}, nil
}

// Used returns the bytes reserved now.
func (b *Budget) Used() int64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// freeBytes returns the bytes an unprivileged writer may still use on dir's
// filesystem.
func freeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}
