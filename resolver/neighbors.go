package resolver

import "sync"

// NeighborSource lists the nodes this node may fetch from, now.
type NeighborSource interface {
	Neighbors() []Neighbor
}

// Static is a fixed neighbour list.
type Static []Neighbor

// Neighbors returns the list.
func (s Static) Neighbors() []Neighbor { return s }

// DynamicNeighbors is a neighbour list that changes (fed from ClusterKB's
// member list). It is safe for concurrent use.
type DynamicNeighbors struct {
	mu sync.RWMutex
	ns []Neighbor
}

// Set replaces the list.
func (d *DynamicNeighbors) Set(ns []Neighbor) {
	d.mu.Lock()
	d.ns = append([]Neighbor(nil), ns...)
	d.mu.Unlock()
}

// Neighbors returns the current list.
func (d *DynamicNeighbors) Neighbors() []Neighbor {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.ns
}

// names returns the set of names of ns.
func names(ns []Neighbor) map[string]bool {
	m := make(map[string]bool, len(ns))
	for _, n := range ns {
		m[n.Name] = true
	}
	return m
}
