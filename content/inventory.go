package content

import (
	"crypto/rand"
	"encoding/hex"
	"slices"
	"strings"
	"sync"

	digest "github.com/opencontainers/go-digest"
)

// Blob is one blob held by a node.
type Blob struct {
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
}

// Snapshot is a consistent view of an inventory.
type Snapshot struct {
	// Epoch is new each time the inventory is created (each node start).
	Epoch string `json:"epoch"`
	// Seq grows by one on every change within an epoch.
	Seq uint64 `json:"seq"`
	// Blobs are the blobs held, sorted by digest.
	Blobs []Blob `json:"blobs"`
}

// Recorder is fed with the blobs a node gains and loses. The proxy store feeds
// it on Commit and Delete; another source (containerd's events) can feed it
// the same way.
type Recorder interface {
	// Add records that the node holds dgst with the given size.
	Add(dgst digest.Digest, size int64)
	// Remove records that the node no longer holds dgst.
	Remove(dgst digest.Digest)
}

// Change is one inventory change, delivered to watchers.
type Change struct {
	Epoch   string
	Seq     uint64
	Added   []Blob
	Removed []digest.Digest
}

// DefaultLogSize is how many recent changes an inventory keeps for
// incremental readers (Since).
const DefaultLogSize = 4096

// Inventory is the set of (digest, size) a node holds, with an epoch and a
// sequence number. It keeps a bounded log of its recent changes, so a reader
// that knows (epoch, seq) can catch up with only what changed. It is safe for
// concurrent use.
type Inventory struct {
	mu       sync.RWMutex
	epoch    string
	seq      uint64
	blobs    map[digest.Digest]int64
	log      []Change // ring of the last len(log) changes, by seq
	logSize  int
	watchers map[int]func(Change)
	nextW    int
	// notify is held from the change until its watchers return, so
	// watchers see changes in seq order.
	notify sync.Mutex
}

var _ Recorder = (*Inventory)(nil)

// NewInventory returns an empty inventory with a new random epoch.
func NewInventory() *Inventory {
	return NewInventorySize(DefaultLogSize)
}

// NewInventorySize returns an empty inventory that remembers its last
// logSize changes (at least 1).
func NewInventorySize(logSize int) *Inventory {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &Inventory{
		epoch:    hex.EncodeToString(b[:]),
		blobs:    map[digest.Digest]int64{},
		logSize:  max(logSize, 1),
		watchers: map[int]func(Change){},
	}
}

// Epoch returns the inventory's epoch.
func (i *Inventory) Epoch() string {
	return i.epoch
}

// Add records dgst with size. Adding a blob already held with the same size is
// not a change.
func (i *Inventory) Add(dgst digest.Digest, size int64) {
	i.mu.Lock()
	if old, ok := i.blobs[dgst]; ok && old == size {
		i.mu.Unlock()
		return
	}
	i.blobs[dgst] = size
	i.changedLocked(Change{Added: []Blob{{Digest: dgst, Size: size}}})
}

// Remove forgets dgst. Removing a blob not held is not a change.
func (i *Inventory) Remove(dgst digest.Digest) {
	i.mu.Lock()
	if _, ok := i.blobs[dgst]; !ok {
		i.mu.Unlock()
		return
	}
	delete(i.blobs, dgst)
	i.changedLocked(Change{Removed: []digest.Digest{dgst}})
}

// changedLocked numbers c, logs it, unlocks i.mu and calls the watchers.
func (i *Inventory) changedLocked(c Change) {
	i.seq++
	c.Epoch, c.Seq = i.epoch, i.seq
	if len(i.log) < i.logSize {
		i.log = append(i.log, c)
	} else {
		i.log[int((c.Seq-1)%uint64(i.logSize))] = c
	}
	var ws []func(Change)
	for _, w := range i.watchers {
		ws = append(ws, w)
	}
	i.notify.Lock()
	i.mu.Unlock()
	defer i.notify.Unlock()
	for _, w := range ws {
		w(c)
	}
}

// Since returns the changes after seq in epoch, oldest first. ok is false
// when they are not all in the log (another epoch, a seq from the future, or
// older than the log): the reader then needs the whole inventory.
func (i *Inventory) Since(epoch string, seq uint64) (changes []Change, cur uint64, ok bool) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	if epoch != i.epoch || seq > i.seq {
		return nil, i.seq, false
	}
	n := i.seq - seq
	if n > uint64(len(i.log)) {
		return nil, i.seq, false
	}
	changes = make([]Change, 0, n)
	for s := seq + 1; s <= i.seq; s++ {
		changes = append(changes, i.log[int((s-1)%uint64(i.logSize))])
	}
	return changes, i.seq, true
}

// Watch calls fn after every change, in seq order; fn must not block, and
// may read the inventory but not change it. The returned function stops
// the watch.
func (i *Inventory) Watch(fn func(Change)) (cancel func()) {
	i.mu.Lock()
	defer i.mu.Unlock()
	id := i.nextW
	i.nextW++
	i.watchers[id] = fn
	return func() {
		i.mu.Lock()
		delete(i.watchers, id)
		i.mu.Unlock()
	}
}

// Version returns the epoch and the current seq.
func (i *Inventory) Version() (epoch string, seq uint64) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.epoch, i.seq
}

// HaveAt returns the blobs among dgsts that are held, with the epoch and seq
// of the moment they were read.
func (i *Inventory) HaveAt(dgsts []digest.Digest) (blobs []Blob, epoch string, seq uint64) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	blobs = make([]Blob, 0, len(dgsts))
	for _, d := range dgsts {
		if s, ok := i.blobs[d]; ok {
			blobs = append(blobs, Blob{Digest: d, Size: s})
		}
	}
	return blobs, i.epoch, i.seq
}

// Size returns the size of dgst and whether it is held.
func (i *Inventory) Size(dgst digest.Digest) (int64, bool) {
	i.mu.RLock()
	defer i.mu.RUnlock()
	s, ok := i.blobs[dgst]
	return s, ok
}

// Have returns the blobs among dgsts that are held, in the order asked.
func (i *Inventory) Have(dgsts []digest.Digest) []Blob {
	blobs, _, _ := i.HaveAt(dgsts)
	return blobs
}

// Snapshot returns the whole inventory.
func (i *Inventory) Snapshot() Snapshot {
	i.mu.RLock()
	s := Snapshot{Epoch: i.epoch, Seq: i.seq, Blobs: make([]Blob, 0, len(i.blobs))}
	for d, n := range i.blobs {
		s.Blobs = append(s.Blobs, Blob{Digest: d, Size: n})
	}
	i.mu.RUnlock()
	slices.SortFunc(s.Blobs, func(a, b Blob) int { return strings.Compare(string(a.Digest), string(b.Digest)) })
	return s
}

// Len returns the number of blobs held.
func (i *Inventory) Len() int {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return len(i.blobs)
}
