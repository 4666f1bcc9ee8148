package resolver

import (
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// ErrGap is returned by Index.Delta when a change does not follow the
// position the index holds for that node (a lost event, a new epoch): the
// caller repairs with the node's full inventory.
var ErrGap = errors.New("inventory gap")

// ErrStale is returned when an update is older than what the index holds.
var ErrStale = errors.New("stale inventory update")

// NodeStatus is what an index knows of one node.
type NodeStatus struct {
	Name     string    `json:"name"`
	URL      string    `json:"url"`
	Epoch    string    `json:"epoch"`
	Seq      uint64    `json:"seq"`
	Blobs    int       `json:"blobs"`
	LastSeen time.Time `json:"last_seen"`
}

// Index is an in-memory inverted index digest → nodes holding it, with each
// node's inventory position (epoch, seq). It is fed with full inventories
// and deltas and answers Locate. Digests are interned, so a blob held by many
// nodes costs 4 bytes per extra holder plus the node's own entry. It is safe
// for concurrent use.
type Index struct {
	mu      sync.RWMutex
	ids     map[digest.Digest]uint32
	digests []digest.Digest
	holders [][]uint32 // digest id → node ids
	free    []uint32   // digest ids no node holds
	nodes   map[string]*indexNode
	byID    []*indexNode // node id → node; nil when free
	freeN   []uint32
	changed chan struct{} // closed at the next change; nil until asked for
	// partial: digest → node id → size, the blobs nodes are downloading
	// (a swarm: they serve the chunks they have).
	partial map[digest.Digest]map[uint32]int64
}

// MaxPartials bounds the blobs one node may say it is downloading.
const MaxPartials = 4096

type indexNode struct {
	id    uint32
	name  string
	url   string
	epoch string
	seq   uint64
	seen  time.Time
	load  *peers.Load
	blobs map[uint32]int64 // digest id → size
	// partial are the blobs the node is downloading.
	partial []digest.Digest
}

// NewIndex returns an empty index.
func NewIndex() *Index {
	return &Index{ids: map[digest.Digest]uint32{}, nodes: map[string]*indexNode{}, partial: map[digest.Digest]map[uint32]int64{}}
}

// Full replaces what the index holds for node with a whole inventory. An
// update older than the one held (same epoch, lower seq) is refused with
// ErrStale.
func (x *Index) Full(name, url, epoch string, seq uint64, blobs []content.Blob, seen time.Time) error {
	if name == "" || epoch == "" {
		return fmt.Errorf("full inventory without node or epoch: %w", errdefs.ErrInvalidArgument)
	}
	// Validate before locking: a regexp per digest must not hold readers.
	blobs = validBlobs(blobs)
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.nodes[name]
	if n != nil && n.epoch == epoch {
		if seq < n.seq {
			return fmt.Errorf("node %s: full at seq %d, index at %d: %w", name, seq, n.seq, ErrStale)
		}
		if seq == n.seq && x.sameLocked(n, blobs) {
			// Nothing changed: a heartbeat.
			if n.url != url {
				n.url = url
				x.changedLocked()
			}
			n.seen = maxTime(n.seen, seen)
			return nil
		}
	}
	if n == nil {
		n = x.addNodeLocked(name)
	}
	next := make(map[uint32]int64, len(blobs))
	for _, b := range blobs {
		id := x.internLocked(b.Digest)
		next[id] = b.Size
	}
	for id := range n.blobs {
		if _, ok := next[id]; !ok {
			x.unholdLocked(id, n.id)
		}
	}
	for id := range next {
		if _, ok := n.blobs[id]; !ok {
			x.holders[id] = append(x.holders[id], n.id)
		}
	}
	n.blobs = next
	n.url, n.epoch, n.seq = url, epoch, seq
	n.seen = maxTime(n.seen, seen)
	x.changedLocked()
	return nil
}

// sameLocked reports whether n holds exactly blobs.
func (x *Index) sameLocked(n *indexNode, blobs []content.Blob) bool {
	if len(blobs) != len(n.blobs) {
		return false
	}
	for _, b := range blobs {
		id, ok := x.ids[b.Digest]
		if !ok {
			return false
		}
		if size, held := n.blobs[id]; !held || size != b.Size {
			return false
		}
	}
	return true
}

// validBlobs returns the blobs with a valid digest and size (a new slice
// only when some are not).
func validBlobs(blobs []content.Blob) []content.Blob {
	for i, b := range blobs {
		if b.Size < 0 || b.Digest.Validate() != nil {
			out := append([]content.Blob(nil), blobs[:i]...)
			for _, b := range blobs[i+1:] {
				if b.Size >= 0 && b.Digest.Validate() == nil {
					out = append(out, b)
				}
			}
			return out
		}
	}
	return blobs
}

// Delta applies the changes that take node from seq from to seq to. It
// returns ErrGap when the index does not hold node at (epoch, from), and
// ErrStale when it already holds a later position; neither changes the index.
func (x *Index) Delta(name, epoch string, from, to uint64, added []content.Blob, removed []digest.Digest, seen time.Time) error {
	added = validBlobs(added)
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.nodes[name]
	switch {
	case n == nil || n.epoch != epoch:
		return fmt.Errorf("node %s: delta for epoch %s: %w", name, epoch, ErrGap)
	case to <= n.seq:
		return fmt.Errorf("node %s: delta to seq %d, index at %d: %w", name, to, n.seq, ErrStale)
	case from != n.seq:
		return fmt.Errorf("node %s: delta from seq %d, index at %d: %w", name, from, n.seq, ErrGap)
	}
	for _, d := range removed {
		if id, ok := x.ids[d]; ok {
			if _, held := n.blobs[id]; held {
				delete(n.blobs, id)
				x.unholdLocked(id, n.id)
			}
		}
	}
	for _, b := range added {
		id := x.internLocked(b.Digest)
		if _, held := n.blobs[id]; !held {
			x.holders[id] = append(x.holders[id], n.id)
		}
		n.blobs[id] = b.Size
	}
	n.seq = to
	n.seen = maxTime(n.seen, seen)
	x.changedLocked()
	return nil
}

// Touch records that node was heard from.
func (x *Index) Touch(name string, seen time.Time) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if n := x.nodes[name]; n != nil {
		n.seen = maxTime(n.seen, seen)
	}
}

// SetLoad records the load node last reported; Locate passes it on.
func (x *Index) SetLoad(name string, l *peers.Load) {
	if l == nil {
		return
	}
	cp := *l
	x.mu.Lock()
	defer x.mu.Unlock()
	if n := x.nodes[name]; n != nil {
		n.load = &cp
		x.changedLocked()
	}
}

// SetPartial replaces the blobs node says it is downloading (a node the
// index does not know is ignored: its inventory comes first). Invalid
// entries are dropped, and beyond MaxPartials the rest.
func (x *Index) SetPartial(name string, blobs []content.Blob) {
	blobs = validBlobs(blobs)
	if len(blobs) > MaxPartials {
		blobs = blobs[:MaxPartials]
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.nodes[name]
	if n == nil || (len(n.partial) == 0 && len(blobs) == 0) {
		return
	}
	x.clearPartialLocked(n)
	for _, b := range blobs {
		if b.Size <= 0 {
			continue
		}
		m := x.partial[b.Digest]
		if m == nil {
			m = map[uint32]int64{}
			x.partial[b.Digest] = m
		}
		m[n.id] = b.Size
		n.partial = append(n.partial, b.Digest)
	}
	x.changedLocked()
}

func (x *Index) clearPartialLocked(n *indexNode) {
	for _, d := range n.partial {
		if m := x.partial[d]; m != nil {
			delete(m, n.id)
			if len(m) == 0 {
				delete(x.partial, d)
			}
		}
	}
	n.partial = nil
}

// Position returns the (epoch, seq) the index holds for node.
func (x *Index) Position(name string) (epoch string, seq uint64, ok bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	if n := x.nodes[name]; n != nil {
		return n.epoch, n.seq, true
	}
	return "", 0, false
}

// Drop forgets node.
func (x *Index) Drop(name string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.nodes[name]
	if n == nil {
		return
	}
	for id := range n.blobs {
		x.unholdLocked(id, n.id)
	}
	x.clearPartialLocked(n)
	delete(x.nodes, name)
	x.byID[n.id] = nil
	x.freeN = append(x.freeN, n.id)
	x.changedLocked()
}

// Changed returns a channel closed at the next change of what Locate
// answers: a node's blobs, URL or load, a node dropped. Take it before
// looking at the index, then wait on it, and no change is missed:
//
//	for {
//		changed := x.Changed()
//		if done(x) {
//			break
//		}
//		<-changed
//	}
func (x *Index) Changed() <-chan struct{} {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.changed == nil {
		x.changed = make(chan struct{})
	}
	return x.changed
}

// changedLocked wakes those waiting on Changed.
func (x *Index) changedLocked() {
	if x.changed != nil {
		close(x.changed)
		x.changed = nil
	}
}

// Expire drops the nodes last heard from before cutoff and returns their
// names.
func (x *Index) Expire(cutoff time.Time) []string {
	x.mu.RLock()
	var old []string
	for name, n := range x.nodes {
		if n.seen.Before(cutoff) {
			old = append(old, name)
		}
	}
	x.mu.RUnlock()
	for _, name := range old {
		x.Drop(name)
	}
	return old
}

// LocateOptions restrict a Locate.
type LocateOptions struct {
	// Only, when not nil, keeps only these nodes.
	Only map[string]bool
	// Exclude drops this node (the asking node itself).
	Exclude string
}

// Locate returns the holders of each digest, in the order they became
// holders, then the nodes downloading it (Partial). Digests nobody holds
// nor downloads are absent.
func (x *Index) Locate(dgsts []digest.Digest, opts LocateOptions) map[digest.Digest][]peers.Candidate {
	out := make(map[digest.Digest][]peers.Candidate, len(dgsts))
	x.mu.RLock()
	defer x.mu.RUnlock()
	skip := func(n *indexNode) bool {
		return n.name == opts.Exclude || (opts.Only != nil && !opts.Only[n.name])
	}
	for _, d := range dgsts {
		var cs []peers.Candidate
		id, ok := x.ids[d]
		if ok {
			for _, nid := range x.holders[id] {
				n := x.byID[nid]
				if skip(n) {
					continue
				}
				cs = append(cs, peers.Candidate{Node: n.name, URL: n.url, Size: n.blobs[id], Load: n.load})
			}
		}
		for nid, size := range x.partial[d] {
			n := x.byID[nid]
			if n == nil || skip(n) {
				continue
			}
			if _, whole := n.blobs[id]; ok && whole {
				continue
			}
			cs = append(cs, peers.Candidate{Node: n.name, URL: n.url, Size: size, Load: n.load, Partial: true})
		}
		if len(cs) > 0 {
			out[d] = cs
		}
	}
	return out
}

// Nodes returns what the index knows of each node, by name.
func (x *Index) Nodes() []NodeStatus {
	x.mu.RLock()
	out := make([]NodeStatus, 0, len(x.nodes))
	for _, n := range x.nodes {
		out = append(out, NodeStatus{Name: n.name, URL: n.url, Epoch: n.epoch, Seq: n.seq, Blobs: len(n.blobs), LastSeen: n.seen})
	}
	x.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Entries returns the number of (node, blob) pairs held.
func (x *Index) Entries() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n := 0
	for _, nd := range x.nodes {
		n += len(nd.blobs)
	}
	return n
}

func (x *Index) addNodeLocked(name string) *indexNode {
	n := &indexNode{name: name, blobs: map[uint32]int64{}}
	if k := len(x.freeN); k > 0 {
		n.id = x.freeN[k-1]
		x.freeN = x.freeN[:k-1]
		x.byID[n.id] = n
	} else {
		n.id = uint32(len(x.byID))
		x.byID = append(x.byID, n)
	}
	x.nodes[name] = n
	return n
}

func (x *Index) internLocked(d digest.Digest) uint32 {
	if id, ok := x.ids[d]; ok {
		return id
	}
	var id uint32
	if k := len(x.free); k > 0 {
		id = x.free[k-1]
		x.free = x.free[:k-1]
		x.digests[id] = d
	} else {
		id = uint32(len(x.digests))
		x.digests = append(x.digests, d)
		x.holders = append(x.holders, nil)
	}
	x.ids[d] = id
	return id
}

// unholdLocked removes node nid from digest id's holders, and frees the
// digest when nobody holds it any more.
func (x *Index) unholdLocked(id, nid uint32) {
	hs := x.holders[id]
	for i, h := range hs {
		if h == nid {
			hs = append(hs[:i], hs[i+1:]...)
			break
		}
	}
	if len(hs) == 0 {
		delete(x.ids, x.digests[id])
		x.digests[id] = ""
		x.holders[id] = nil
		x.free = append(x.free, id)
		return
	}
	x.holders[id] = hs
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
