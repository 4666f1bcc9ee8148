package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/resolver/clusterkb"
	dto "github.com/prometheus/client_model/go"
)

// StatusPath is the node's status on the mirror listener (loopback only,
// read-only, like the downloads): what `coop status` shows.
const StatusPath = "/coop/v1/status"

// Status says whether coop works on this node. Problems is empty when it
// does.
type Status struct {
	Node        string    `json:"node"`
	Started     time.Time `json:"started"`
	ContentMode string    `json:"content_mode"`
	Claim       bool      `json:"claim"`
	// ClaimRegistry: claims fall back to the pull's registry.
	ClaimRegistry bool   `json:"claim_registry,omitempty"`
	Advertise     string `json:"advertise"`
	// TLSNotAfter is when the node's certificate expires (zero without
	// TLS).
	TLSNotAfter time.Time        `json:"tls_not_after,omitzero"`
	Index       IndexStatus      `json:"index"`
	Neighbors   []NeighborStatus `json:"neighbors"`
	Blobs       BlobStatus       `json:"blobs"`
	Bytes       ByteStatus       `json:"bytes"`
	// Claims counts claims by result (made, done, failed, cancelled).
	Claims map[string]int64 `json:"claims,omitempty"`
	// Members is ClusterKB's view of every node (asked with ?all=1).
	Members []clusterkb.NodeInfo `json:"members,omitempty"`
	// Errors are the last warnings and errors the node logged.
	Errors   []LogEntry `json:"errors,omitempty"`
	Problems []string   `json:"problems,omitempty"`
}

// IndexStatus is the neighbour index's state.
type IndexStatus struct {
	Mode string `json:"mode"`
	// Broker: "" without one, else "connected" or "disconnected".
	Broker string `json:"broker,omitempty"`
	// KB: "" without ClusterKB, else "ok" or why it failed.
	KB string `json:"kb,omitempty"`
	// Entries is how many (blob, node) pairs a local index holds
	// (periodic, push).
	Entries int `json:"entries,omitempty"`
	// Updates counts inventory updates by result (ok, gap, stale, error).
	Updates map[string]int64 `json:"updates,omitempty"`
}

// NeighborStatus is one neighbour, asked when the status is made.
type NeighborStatus struct {
	Name string `json:"name"`
	URL  string `json:"url"`
	Up   bool   `json:"up"`
	// Error is why it did not answer.
	Error string `json:"error,omitempty"`
	// RTT is how long its answer took.
	RTT time.Duration `json:"rtt_ns,omitempty"`
	// ActiveUploads and MaxUploads are the load it reported.
	ActiveUploads int `json:"active_uploads"`
	MaxUploads    int `json:"max_uploads"`
	// Bandwidth is the rate measured from it, bytes/s (0: no transfer yet).
	Bandwidth float64 `json:"bandwidth_bytes_per_second"`
	// LastSeen is when the local index last heard of it (periodic, push).
	LastSeen time.Time `json:"last_seen,omitzero"`
	// Blobs is how many blobs the local index holds for it.
	Blobs int `json:"blobs,omitempty"`
}

// BlobStatus counts the node's blobs.
type BlobStatus struct {
	Held            int   `json:"held"`
	InFlight        int   `json:"in_flight"`
	UnverifiedBytes int64 `json:"unverified_bytes"`
	// Shared are the blobs in flight whose chunks are served to peers as
	// they arrive (the swarm); -1: the swarm is off.
	Shared int `json:"shared"`
}

// ByteStatus counts bytes since the node started.
type ByteStatus struct {
	ServedToPeers int64            `json:"served_to_peers"`
	FromPeers     map[string]int64 `json:"from_peers"`
	// FromRegistries are the blobs containerd committed that did not come
	// through coop from peers.
	FromRegistries int64 `json:"from_registries"`
}

// statusProbeTimeout bounds each neighbour's and ClusterKB's answer.
const statusProbeTimeout = 2 * time.Second

// certWarning is how close to its expiry a certificate becomes a problem.
const certWarning = 24 * time.Hour

// Status asks the neighbours and ClusterKB and reads the node's counters.
// With all, it adds ClusterKB's members.
func (n *Node) Status(ctx context.Context, all bool) Status {
	o := n.opts
	s := Status{Node: o.Name, Started: n.started, ContentMode: o.ContentMode, Claim: o.Claim, ClaimRegistry: n.upstream != nil, Advertise: o.Advertise,
		Index: IndexStatus{Mode: n.index.Mode()}}
	if o.TLS != nil {
		s.TLSNotAfter = o.TLS.NotAfter()
		switch left := time.Until(s.TLSNotAfter); {
		case left <= 0:
			s.Problems = append(s.Problems, fmt.Sprintf("the node's certificate expired at %s", s.TLSNotAfter.Format(time.RFC3339)))
		case left < certWarning:
			s.Problems = append(s.Problems, fmt.Sprintf("the node's certificate expires in %s", left.Round(time.Minute)))
		}
		if err := o.TLS.Check(); err != nil {
			s.Problems = append(s.Problems, "certificates on disk are not usable (the last good ones stay in use): "+err.Error())
		}
	}
	metrics := n.gather(ctx)
	s.Blobs = BlobStatus{Held: n.inv.Len(), InFlight: n.mirror.InFlight(), UnverifiedBytes: n.budget.Used(), Shared: -1}
	if n.partials != nil {
		s.Blobs.Shared = len(n.partials.Blobs())
	}
	s.Bytes = ByteStatus{
		ServedToPeers:  int64(metrics.sum("coop_peer_served_bytes_total")),
		FromPeers:      metrics.byLabel("coop_mirror_peer_bytes_total", "node"),
		FromRegistries: n.registryBytes.Load(),
	}
	if o.Claim {
		s.Claims = metrics.byLabel("coop_claims_total", "result")
	}
	if u := metrics.byLabel("coop_index_updates_total", "result"); len(u) > 0 {
		s.Index.Updates = u
	}
	if used, connected := n.index.Broker(); used {
		s.Index.Broker = "disconnected"
		if connected {
			s.Index.Broker = "connected"
		} else {
			s.Problems = append(s.Problems, "not connected to the broker (--nats-url)")
		}
	}
	if local := n.index.LocalIndex(); local != nil {
		s.Index.Entries = local.Entries()
	}
	var wg sync.WaitGroup
	if kb := n.index.KB(); kb != nil {
		wg.Go(func() {
			kctx, cancel := context.WithTimeout(ctx, statusProbeTimeout)
			defer cancel()
			members, err := kb.Nodes(kctx)
			if err != nil {
				s.Index.KB = err.Error()
				return
			}
			s.Index.KB = "ok"
			if all {
				s.Members = members
			}
		})
	}
	s.Neighbors = n.probeNeighbors(ctx)
	wg.Wait()
	if s.Index.KB != "" && s.Index.KB != "ok" {
		s.Problems = append(s.Problems, "ClusterKB does not answer: "+s.Index.KB)
	}
	up := 0
	for _, nb := range s.Neighbors {
		if nb.Up {
			up++
		}
	}
	if len(s.Neighbors) > 0 && up == 0 && s.Index.Mode != "none" {
		s.Problems = append(s.Problems, fmt.Sprintf("none of the %d neighbours answers", len(s.Neighbors)))
	}
	if n.containers != nil {
		cctx, cancel := context.WithTimeout(ctx, statusProbeTimeout)
		if err := n.containers.Ping(cctx); err != nil {
			s.Problems = append(s.Problems, "containerd does not answer: "+err.Error())
		} else if p := n.contentProblem(cctx); p != "" {
			s.Problems = append(s.Problems, p)
		}
		cancel()
	}
	if n.errors != nil {
		s.Errors = n.errors.Recent()
	}
	return s
}

// contentProblem says what is wrong when containerd, in proxy mode, keeps
// its own content store: it then never uses coop's (no claims, and blobs
// coop lands stay beside containerd's copies).
func (n *Node) contentProblem(ctx context.Context) string {
	if n.opts.ContentMode != ContentProxy {
		return ""
	}
	builtin, err := n.containers.BuiltinContent(ctx)
	if err != nil || !builtin {
		return ""
	}
	return "containerd runs its own content store, not coop's: set it up for proxy mode (coop containerd-config, coop install) or run coop with --content-mode observer"
}

// probeNeighbors asks every neighbour an empty have at once: up or why not,
// its load and how long it took, with what the estimates and the local index
// know of it.
func (n *Node) probeNeighbors(ctx context.Context) []NeighborStatus {
	nbs := n.index.Neighbors()
	out := make([]NeighborStatus, len(nbs))
	seen := map[string]time.Time{}
	blobs := map[string]int{}
	if local := n.index.LocalIndex(); local != nil {
		for _, ns := range local.Nodes() {
			seen[ns.Name], blobs[ns.Name] = ns.LastSeen, ns.Blobs
		}
	}
	var wg sync.WaitGroup
	for i, nb := range nbs {
		est := n.mirror.Estimates().Get(nb.Name)
		out[i] = NeighborStatus{Name: nb.Name, URL: nb.URL, Bandwidth: est.Bandwidth, LastSeen: seen[nb.Name], Blobs: blobs[nb.Name]}
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, statusProbeTimeout)
			defer cancel()
			start := time.Now()
			hr, err := n.client.Have(pctx, nb.URL, nil)
			out[i].RTT = time.Since(start)
			if err != nil {
				out[i].Error = err.Error()
				return
			}
			out[i].Up = true
			if hr.Load != nil {
				out[i].ActiveUploads, out[i].MaxUploads = hr.Load.ActiveUploads, hr.Load.MaxUploads
			}
		})
	}
	wg.Wait()
	slices.SortFunc(out, func(a, b NeighborStatus) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return out
}

// serveStatus answers StatusPath; ?all=1 adds ClusterKB's members.
func (n *Node) serveStatus(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		http.Error(w, "GET only", http.StatusMethodNotAllowed)
		return
	}
	s, err := n.status.get(r.Context(), r.URL.Query().Get("all") == "1", n.Status)
	if err != nil {
		return // the client went away
	}
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(s); err != nil {
		log.G(r.Context()).WithError(err).Debug("status answer not sent")
	}
}

// statusFlight makes one status at a time: any local user may ask, and
// each status asks every neighbour and ClusterKB, so requests that arrive
// while one is being made share it. A status made is never served again:
// the next request after it sees the node as it is then.
type statusFlight struct {
	mu   sync.Mutex
	call *statusCall
}

type statusCall struct {
	all  bool
	done chan struct{}
	s    Status
}

func (f *statusFlight) get(ctx context.Context, all bool, build func(context.Context, bool) Status) (Status, error) {
	for {
		f.mu.Lock()
		c := f.call
		if c == nil {
			c = &statusCall{all: all, done: make(chan struct{})}
			f.call = c
			f.mu.Unlock()
			// Not the caller's cancellation: others may share it.
			c.s = build(context.WithoutCancel(ctx), all)
			f.mu.Lock()
			f.call = nil
			f.mu.Unlock()
			close(c.done)
			return c.s, nil
		}
		f.mu.Unlock()
		select {
		case <-c.done:
			if c.all || !all {
				return c.s, nil
			}
			// It lacked the members: make one that has them.
		case <-ctx.Done():
			return Status{}, ctx.Err()
		}
	}
}

// gathered are the node's metrics at one moment.
type gathered []*dto.MetricFamily

func (n *Node) gather(ctx context.Context) gathered {
	mfs, err := n.reg.Gather()
	if err != nil {
		log.G(ctx).WithError(err).Debug("status: some metrics could not be gathered")
	}
	return mfs
}

func (g gathered) family(name string) *dto.MetricFamily {
	for _, mf := range g {
		if mf.GetName() == name {
			return mf
		}
	}
	return nil
}

func value(m *dto.Metric) float64 {
	switch {
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	}
	return 0
}

// sum adds every sample of the counter or gauge name.
func (g gathered) sum(name string) float64 {
	var t float64
	if mf := g.family(name); mf != nil {
		for _, m := range mf.GetMetric() {
			t += value(m)
		}
	}
	return t
}

// byLabel sums the samples of name by the value of label.
func (g gathered) byLabel(name, label string) map[string]int64 {
	out := map[string]int64{}
	if mf := g.family(name); mf != nil {
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label {
					out[lp.GetValue()] += int64(value(m))
				}
			}
		}
	}
	return out
}
