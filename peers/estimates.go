package peers

import (
	"sync"
	"time"
)

// Estimates keeps what a node has measured of each peer: an EWMA of its
// transfer rate, of its time to first byte, and its last reported load. One
// value is shared by every download of a node. It is safe for concurrent
// use.
type Estimates struct {
	mu sync.Mutex
	m  map[string]*estimate
}

type estimate struct {
	bw      float64 // bytes/s, EWMA
	rtt     float64 // seconds to first byte, EWMA
	samples int
	active  int // uploads the peer reported
	slots   int // upload slots the peer reported; 0: unknown
	inUse   int // transfers this node runs from the peer now
}

// ewmaWeight is the weight of a new sample.
const ewmaWeight = 0.3

// NewEstimates returns an empty set of estimates.
func NewEstimates() *Estimates { return &Estimates{m: map[string]*estimate{}} }

func (e *Estimates) get(node string) *estimate {
	x := e.m[node]
	if x == nil {
		x = &estimate{}
		e.m[node] = x
	}
	return x
}

// Observe records a transfer of n bytes from node that took d in all, of
// which ttfb to the first byte. The first sample seeds the estimates.
func (e *Estimates) Observe(node string, n int64, d, ttfb time.Duration) {
	if n <= 0 || d <= 0 {
		return
	}
	rate := float64(n) / d.Seconds()
	e.mu.Lock()
	defer e.mu.Unlock()
	x := e.get(node)
	if x.samples == 0 {
		x.bw, x.rtt = rate, ttfb.Seconds()
	} else {
		x.bw = ewmaWeight*rate + (1-ewmaWeight)*x.bw
		x.rtt = ewmaWeight*ttfb.Seconds() + (1-ewmaWeight)*x.rtt
	}
	x.samples++
}

// SetLoad records the load node reported: active uploads out of slots.
func (e *Estimates) SetLoad(node string, active, slots int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	x := e.get(node)
	x.active, x.slots = active, slots
}

// begin and end count this node's own transfers from a peer.
func (e *Estimates) begin(node string) {
	e.mu.Lock()
	e.get(node).inUse++
	e.mu.Unlock()
}

func (e *Estimates) end(node string) {
	e.mu.Lock()
	if x := e.get(node); x.inUse > 0 {
		x.inUse--
	}
	e.mu.Unlock()
}

// Estimate is a snapshot of what is known of one peer.
type Estimate struct {
	// Bandwidth is the EWMA transfer rate in bytes/s; 0 when unmeasured.
	Bandwidth float64
	// RTT is the EWMA time to first byte.
	RTT time.Duration
	// Samples is how many transfers were measured.
	Samples int
	// Active and Slots are the peer's reported uploads and upload slots.
	Active, Slots int
	// InUse is how many transfers this node runs from the peer now.
	InUse int
}

// Get returns what is known of node.
func (e *Estimates) Get(node string) Estimate {
	e.mu.Lock()
	defer e.mu.Unlock()
	x := e.m[node]
	if x == nil {
		return Estimate{}
	}
	return Estimate{Bandwidth: x.bw, RTT: time.Duration(x.rtt * float64(time.Second)), Samples: x.samples, Active: x.active, Slots: x.slots, InUse: x.inUse}
}

// Completion estimates how long n more bytes take from the peer:
// rtt + n / bandwidth, the bandwidth shared with the peer's other uploads
// (DESIGN.md §5). unknown is the bandwidth assumed for an unmeasured peer.
func (x Estimate) Completion(n int64, unknown float64) time.Duration {
	bw := x.Bandwidth
	if bw <= 0 {
		bw = unknown
	}
	if x.Slots > 0 && x.Active > 0 {
		// Each of the peer's uploads gets a share of its uplink.
		bw = bw * float64(x.Slots) / float64(x.Slots+x.Active)
	}
	if x.InUse > 1 {
		bw /= float64(x.InUse)
	}
	if bw <= 0 {
		return time.Duration(1<<62 - 1)
	}
	return x.RTT + time.Duration(float64(n)/bw*float64(time.Second))
}
