package content

// Bounded is a map that keeps the last max keys put: a new key beyond max
// evicts the oldest one (insertion order; putting a key again does not
// renew it). It is not safe for concurrent use.
type Bounded[K comparable, V any] struct {
	max  int
	m    map[K]V
	ring []K // insertion order, for eviction
	next int // ring slot the next new key takes
}

// NewBounded returns a Bounded keeping at most max keys (max > 0).
func NewBounded[K comparable, V any](max int) *Bounded[K, V] {
	return &Bounded[K, V]{max: max, m: map[K]V{}}
}

// Put sets k to v.
func (b *Bounded[K, V]) Put(k K, v V) {
	if _, ok := b.m[k]; ok {
		b.m[k] = v
		return
	}
	if len(b.ring) < b.max {
		b.ring = append(b.ring, k)
	} else {
		delete(b.m, b.ring[b.next])
		b.ring[b.next] = k
		b.next = (b.next + 1) % b.max
	}
	b.m[k] = v
}

// Get returns k's value.
func (b *Bounded[K, V]) Get(k K) (V, bool) {
	v, ok := b.m[k]
	return v, ok
}

// Len returns how many keys are kept.
func (b *Bounded[K, V]) Len() int { return len(b.m) }
