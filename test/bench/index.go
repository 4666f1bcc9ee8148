package main

// The "index" section measures the neighbour index of every mode on
// in-process nodes that run coop's own code: content.Inventory and
// content.Store, peers.Server on a loopback listener, the resolver of each
// mode, clusterkb.KB behind a real HTTP server, and an embedded NATS broker
// (clusterkb.StartBroker). It needs neither root nor containerd.

import (
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/coopnet/coop/resolver/modes"
	"github.com/nats-io/nats.go"
	digest "github.com/opencontainers/go-digest"
)

// Index modes as the table names them; kb-pull and kb-push are the kb mode
// with ClusterKB fed by polling or by the broker. Every node and the
// destination build their index with modes.New, as coop node does.
const (
	modeOnline   = modes.Online
	modePeriodic = modes.Periodic
	modePush     = modes.Push
	modeKBPull   = "kb-pull"
	modeKBPush   = "kb-push"
)

// IndexResults is the "index" section of the results file.
type IndexResults struct {
	Date   string            `json:"date"`
	Quick  bool              `json:"quick"`
	Setup  string            `json:"setup"`
	Method map[string]string `json:"method"`
	Params indexParams       `json:"params"`
	Modes  []IndexMode       `json:"modes"`
	KB     KBScale           `json:"kb_scale"`
}

// IndexMode is one mode at one cluster size. Times are in milliseconds,
// bytes per node per minute unless named otherwise.
type IndexMode struct {
	Mode         string  `json:"mode"`
	Nodes        int     `json:"nodes"`
	Neighbors    int     `json:"neighbors"`
	Feed         string  `json:"feed"`
	SetupSeconds float64 `json:"setup_seconds"`
	Locates      int     `json:"locates"`
	LocateP50Ms  float64 `json:"locate_p50_ms"`
	LocateP99Ms  float64 `json:"locate_p99_ms"`
	LocateMaxMs  float64 `json:"locate_max_ms"`
	// LocateIndexP99Ms is, in kb modes, the p99 of KB.Locate in-process
	// for the same batches: the index's share of the locate.
	LocateIndexP99Ms float64 `json:"locate_index_p99_ms,omitempty"`
	LocateBytes      float64 `json:"locate_bytes"`    // on the wire, per locate
	Complete         float64 `json:"locate_complete"` // candidates returned / held
	Probes           int     `json:"probes"`
	ProbesMissed     int     `json:"probes_missed"`
	StaleP50Ms       float64 `json:"staleness_p50_ms"`
	StaleP99Ms       float64 `json:"staleness_p99_ms"`
	StaleMaxMs       float64 `json:"staleness_max_ms"`
	WindowSeconds    float64 `json:"window_seconds"`
	// CommitsPerNodeMin is the commit rate measured in the window.
	CommitsPerNodeMin float64 `json:"commits_per_node_per_min"`
	ControlBytes      float64 `json:"control_bytes_per_node_per_min"`
	// ControlByChannel splits ControlBytes: peer (HTTP to the nodes' peer
	// servers: polls, repairs), kb (HTTP to ClusterKB: registrations),
	// nats-node (the nodes' broker connections: events, fulls, retained
	// fulls) and nats-index (the subscriber's: the destination's or
	// ClusterKB's).
	ControlByChannel map[string]float64 `json:"control_bytes_by_channel,omitempty"`
	TargetLocateMs   float64            `json:"target_locate_p99_ms,omitempty"`
	TargetStaleMs    float64            `json:"target_staleness_p99_ms,omitempty"`
	Met              *bool              `json:"met,omitempty"` // nil: no target applies
}

// KBScale is ClusterKB's memory and locate latency at a large cluster.
type KBScale struct {
	Nodes           int        `json:"nodes"`
	BlobsPerNode    int        `json:"blobs_per_node"`
	Pool            int        `json:"pool"`
	Distribution    string     `json:"distribution"`
	Entries         int        `json:"entries"`
	LoadSeconds     float64    `json:"load_seconds"`
	HeapInuseBytes  int64      `json:"heap_inuse_bytes"`
	HeapAllocBytes  int64      `json:"heap_alloc_bytes"`
	TargetHeapBytes int64      `json:"target_heap_bytes"`
	Locates         []KBLocate `json:"locates"`
	Met             bool       `json:"met"`
}

// KBLocate is one way of asking ClusterKB.
type KBLocate struct {
	Name          string  `json:"name"`
	Via           string  `json:"via"`
	Locates       int     `json:"locates"`
	P50Ms         float64 `json:"p50_ms"`
	P99Ms         float64 `json:"p99_ms"`
	MaxMs         float64 `json:"max_ms"`
	Candidates    float64 `json:"candidates"`     // per locate, mean
	ResponseBytes float64 `json:"response_bytes"` // per locate, mean, HTTP only
	TargetP99Ms   float64 `json:"target_p99_ms,omitempty"`
	Met           *bool   `json:"met,omitempty"`
}

// indexParams size the section.
type indexParams struct {
	Real         int     `json:"real_nodes"`
	Simulated    int     `json:"simulated_nodes"`
	Online16     int     `json:"online_neighbors"`
	BlobsPerNode int     `json:"blobs_per_node"`
	Pool         int     `json:"pool"`
	Batch        int     `json:"digests_per_locate"`
	Locates      int     `json:"locates"`
	Probes       int     `json:"probes"`
	ProbeEveryMs float64 `json:"probe_poll_ms"`
	Window       float64 `json:"window_seconds"`
	CommitEvery  float64 `json:"commit_every_seconds_per_node"`
	PollPeriod   float64 `json:"poll_period_seconds"`
	PushPeriod   float64 `json:"push_full_period_seconds"`
	KBNodes      int     `json:"kb_nodes"`
	KBBlobs      int     `json:"kb_blobs_per_node"`
	KBPool       int     `json:"kb_pool"`
}

func indexParamsFor(quick bool) indexParams {
	p := indexParams{
		Real: 10, Simulated: 1000, Online16: 16, BlobsPerNode: 200, Pool: 50000, Batch: 8,
		Locates: 500, Probes: 60, ProbeEveryMs: 1, Window: 10, CommitEvery: 10,
		PollPeriod: 1, PushPeriod: 10,
		KBNodes: 5000, KBBlobs: 1000, KBPool: 50000,
	}
	if quick {
		p.Simulated, p.Locates, p.Probes, p.Window, p.PushPeriod = 200, 200, 50, 2, 2
		p.KBNodes = 1000
	}
	return p
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// runIndex runs the section.
func runIndex(ctx context.Context, o options) (*IndexResults, error) {
	// Thousands of in-process nodes log every registration at info, and
	// every content store warns that the file system lacks fs-verity.
	prev := log.GetLevel()
	if err := log.SetLevel("error"); err != nil {
		return nil, err
	}
	defer func() { _ = log.SetLevel(prev.String()) }()

	p := indexParamsFor(o.quick)
	limit := raiseFileLimit()
	// A simulated node costs about 6 descriptors in the busiest mode: its
	// listener, a poll or have connection at both ends, a broker
	// connection at both ends, a ClusterKB connection.
	if fit := (int(limit) - 500) / 6; fit < p.Simulated {
		fmt.Fprintf(os.Stderr, "index: open-file limit %d allows %d simulated nodes, not %d\n", limit, fit, p.Simulated)
		p.Simulated = fit
	}
	res := &IndexResults{
		Date:  time.Now().UTC().Format(time.RFC3339),
		Quick: o.quick,
		Setup: fmt.Sprintf("In-process: every node is a content.Inventory+content.Store with a peers.Server on its own 127.0.0.1 HTTP listener; "+
			"push modes use an embedded NATS broker (clusterkb.StartBroker), kb modes a clusterkb.KB behind its own HTTP listener; "+
			"the destination runs the mode's resolver in the same process. %d CPUs, open-file limit %d. "+
			"Inventories: %d blobs per node drawn uniformly from a pool of %d digests.",
			runtime.NumCPU(), limit, p.BlobsPerNode, p.Pool),
		Method: map[string]string{
			"locate": fmt.Sprintf("after convergence, %d locates of %d digests held by at least one neighbour (an image's layers), one every 2 ms or back to back when slower; "+
				"kb modes through clusterkb.Client over HTTP, others through the mode's resolver", p.Locates, p.Batch),
			"staleness": fmt.Sprintf("content.Inventory.Add of a new digest at a random node, then a locate every %.0f ms until it names that node; "+
				"kb modes ask the KB in-process (KB.Locate, no HTTP), so the destination's round trip (see locate) is not included", p.ProbeEveryMs),
			"control_bytes": fmt.Sprintf("TCP payload bytes (HTTP headers and bodies, NATS protocol and payloads; no TCP/IP headers) counted once per connection: "+
				"at the listener for HTTP, at the client's dialer for NATS; over a %.0f s steady window with each node committing once per %.0f s on average; "+
				"locate traffic excluded (it is the locate-bytes column); the online mode has no traffic without locates", p.Window, p.CommitEvery),
		},
		Params: p,
	}
	pool := makePool("pool", p.Pool)
	type run struct {
		mode string
		n    int
	}
	runs := []run{
		{modeOnline, p.Real}, {modeOnline, p.Online16}, {modeOnline, p.Simulated},
		{modePeriodic, p.Real}, {modePeriodic, p.Simulated},
		{modePush, p.Real}, {modePush, p.Simulated},
		{modeKBPull, p.Real}, {modeKBPull, p.Simulated},
		{modeKBPush, p.Real}, {modeKBPush, p.Simulated},
	}
	for i, r := range runs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		start := time.Now()
		m, err := measureMode(ctx, r.mode, r.n, p, pool, uint64(i))
		if err != nil {
			return nil, fmt.Errorf("%s at %d nodes: %w", r.mode, r.n, err)
		}
		fmt.Fprintf(os.Stderr, "  index %-8s %4d nodes: locate p99 %.3f ms, staleness p99 %.1f ms, control %s/node/min (%.0f s)\n",
			m.Mode, m.Nodes, m.LocateP99Ms, m.StaleP99Ms, human(m.ControlBytes), time.Since(start).Seconds())
		res.Modes = append(res.Modes, m)
	}
	kb, err := measureKBScale(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("ClusterKB at %d nodes: %w", p.KBNodes, err)
	}
	res.KB = kb
	return res, nil
}

// raiseFileLimit raises the soft open-file limit to the hard one and
// returns it.
func raiseFileLimit() uint64 {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 1024
	}
	if r.Cur < r.Max {
		r.Cur = r.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
			_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r)
		}
	}
	return r.Cur
}

// makePool returns n distinct sha256 digests.
func makePool(tag string, n int) []digest.Digest {
	out := make([]digest.Digest, n)
	var b [8]byte
	for i := range out {
		binary.BigEndian.PutUint64(b[:], uint64(i))
		out[i] = digest.FromBytes(append([]byte(tag), b[:]...))
	}
	return out
}

// sample returns k distinct elements of pool, uniformly.
func sample(rng *rand.Rand, pool []digest.Digest, k int) []digest.Digest {
	seen := make(map[int]bool, k)
	out := make([]digest.Digest, 0, k)
	for len(out) < k && len(seen) < len(pool) {
		i := rng.IntN(len(pool))
		if !seen[i] {
			seen[i] = true
			out = append(out, pool[i])
		}
	}
	return out
}

// counted counts the bytes read and written on connections.
type counted struct{ n atomic.Int64 }

type countedConn struct {
	net.Conn
	c *counted
}

func (c countedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.c.n.Add(int64(n))
	return n, err
}

func (c countedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.c.n.Add(int64(n))
	return n, err
}

type countedListener struct {
	net.Listener
	c *counted
}

func (l countedListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countedConn{Conn: conn, c: l.c}, nil
}

// Dial makes counted a nats.CustomDialer.
func (c *counted) Dial(network, address string) (net.Conn, error) {
	conn, err := (&net.Dialer{Timeout: 2 * time.Second}).Dial(network, address)
	if err != nil {
		return nil, err
	}
	return countedConn{Conn: conn, c: c}, nil
}

// benchNode is one in-process node.
type benchNode struct {
	name string
	url  string
	inv  *content.Inventory
	ps   *peers.Server
}

// indexCluster is one mode's destination, its nodes and what feeds the
// index.
type indexCluster struct {
	mode  string
	p     indexParams
	nodes []*benchNode
	res   resolver.Resolver
	idx   *resolver.Index // what converges: the destination's or ClusterKB's
	kb    *clusterkb.KB
	feed  time.Duration // the feed's period

	peerBytes, kbBytes, kbLocateBytes counted
	nodeNATS, indexNATS               counted

	truth map[digest.Digest]int // digest → holders
	held  []digest.Digest
	next  atomic.Int64 // fresh digests

	cancel  context.CancelFunc
	runners sync.WaitGroup // loops that end with the context
	servers sync.WaitGroup // HTTP servers, ended by closers
	closers []func()
	dir     string
}

func (c *indexCluster) close() {
	c.cancel()
	c.runners.Wait()
	for i := len(c.closers) - 1; i >= 0; i-- {
		c.closers[i]()
	}
	c.servers.Wait()
	_ = os.RemoveAll(c.dir)
}

// serve serves h on a new loopback listener counted into cnt and returns
// its URL.
func (c *indexCluster) serve(h http.Handler, cnt *counted) (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	c.servers.Go(func() { _ = srv.Serve(countedListener{Listener: l, c: cnt}) })
	c.closers = append(c.closers, func() { _ = srv.Close() })
	return "http://" + l.Addr().String(), nil
}

// peerClient is a node's peer client, as cmd/coop builds it.
func (c *indexCluster) peerClient(node string) *peers.Client {
	tr := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ResponseHeaderTimeout: 5 * time.Second,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
	}
	c.closers = append(c.closers, tr.CloseIdleConnections)
	return &peers.Client{Node: node, HTTP: &http.Client{Transport: tr}}
}

// connect connects to the broker as coop does, through a dialer that
// counts the connection's bytes into cnt.
func (c *indexCluster) connect(ctx context.Context, url, name string, cnt *counted) (*nats.Conn, error) {
	nc, err := resolver.ConnectBroker(ctx, url, name, nats.SetCustomDialer(cnt))
	if err != nil {
		return nil, err
	}
	c.closers = append(c.closers, nc.Close)
	return nc, nil
}

// index builds a node's index as coop node does, and closes it with the
// cluster.
func (c *indexCluster) index(ctx context.Context, o modes.Options) (*modes.Index, error) {
	ix, err := modes.New(ctx, o)
	if err != nil {
		return nil, err
	}
	c.closers = append(c.closers, func() { _ = ix.Close() })
	return ix, nil
}

// startCluster starts mode's destination and n nodes and waits until the
// index holds every node's inventory.
func startCluster(ctx context.Context, mode string, n int, p indexParams, pool []digest.Digest, seed uint64) (_ *indexCluster, err error) {
	rng := rand.New(rand.NewPCG(seed, 0x636f6f70))
	dir, err := os.MkdirTemp("", "coop-bench-index-")
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithCancel(ctx)
	c := &indexCluster{mode: mode, p: p, truth: map[digest.Digest]int{}, cancel: cancel, dir: dir}
	defer func() {
		if err != nil {
			c.close()
		}
	}()
	pushFed := mode == modePush || mode == modeKBPush
	switch mode {
	case modePeriodic, modeKBPull:
		c.feed = seconds(p.PollPeriod)
	case modePush, modeKBPush:
		c.feed = seconds(p.PushPeriod)
	}
	var brokerURL, kbURL, kbLocateURL string
	if pushFed {
		ns, err := clusterkb.StartBroker(clusterkb.BrokerOptions{Listen: "127.0.0.1:0", StoreDir: filepath.Join(dir, "broker")})
		if err != nil {
			return nil, err
		}
		c.closers = append(c.closers, func() { ns.Shutdown(); ns.WaitForShutdown() })
		brokerURL = ns.ClientURL()
	}
	if mode == modeKBPull || mode == modeKBPush {
		opts := clusterkb.Options{Feed: clusterkb.FeedPull, Period: c.feed, Reader: c.peerClient("kb")}
		if mode == modeKBPush {
			if opts.Conn, err = c.connect(cctx, brokerURL, "kb", &c.indexNATS); err != nil {
				return nil, err
			}
			opts.Feed = clusterkb.FeedPush
		}
		if c.kb, err = clusterkb.New(opts); err != nil {
			return nil, err
		}
		c.idx = c.kb.Index()
		c.runners.Go(func() { _ = c.kb.Run(cctx) })
		// Registrations and locates on two listeners, to count them apart.
		if kbURL, err = c.serve(c.kb, &c.kbBytes); err != nil {
			return nil, err
		}
		if kbLocateURL, err = c.serve(c.kb, &c.kbLocateBytes); err != nil {
			return nil, err
		}
	}

	// The nodes, with their inventories, serving.
	for i := range n {
		name := fmt.Sprintf("node-%04d", i)
		inv := content.NewInventory()
		for _, d := range sample(rng, pool, p.BlobsPerNode) {
			inv.Add(d, 1+rng.Int64N(64<<20))
			if c.truth[d] == 0 {
				c.held = append(c.held, d)
			}
			c.truth[d]++
		}
		store, err := content.NewStore(cctx, filepath.Join(dir, name), inv)
		if err != nil {
			return nil, err
		}
		ps, err := peers.NewServer(peers.ServerOptions{Node: name, Store: store, Inventory: inv})
		if err != nil {
			return nil, err
		}
		url, err := c.serve(ps, &c.peerBytes)
		if err != nil {
			return nil, err
		}
		c.nodes = append(c.nodes, &benchNode{name: name, url: url, inv: inv, ps: ps})
	}
	var neighbors resolver.Static
	for _, nd := range c.nodes {
		neighbors = append(neighbors, resolver.Neighbor{Name: nd.name, URL: nd.url})
	}

	// The destination: it locates, and announces nothing (it serves
	// nothing, and its traffic would count as the nodes').
	dest := modes.Options{Mode: mode, Node: "dest", Period: c.feed, Neighbors: neighbors, Client: c.peerClient("dest"), NoAnnounce: true}
	switch mode {
	case modePush:
		dest.NATSURL, dest.NATSOptions = brokerURL, []nats.Option{nats.SetCustomDialer(&c.indexNATS)}
	case modeKBPull, modeKBPush:
		dest = modes.Options{Mode: modes.KB, Node: "dest", KBURLs: []string{kbLocateURL}, NoAnnounce: true}
	}
	ix, err := c.index(cctx, dest)
	if err != nil {
		return nil, err
	}
	c.res = ix.Resolver()
	if ix.Local() {
		c.idx = ix.LocalIndex()
	}
	c.runners.Go(func() { _ = ix.Run(cctx) })

	// The nodes: they locate nothing (mode none) and announce themselves,
	// publishing and registering. Real nodes do not start in step: beyond
	// a handful, starts spread over one period so that periodic work does
	// not come in one burst.
	var ramp time.Duration
	for i, nd := range c.nodes {
		var offset time.Duration
		if n > 16 {
			offset = c.feed * time.Duration(i) / time.Duration(n)
			ramp = offset
		}
		o := modes.Options{Mode: modes.None, Node: nd.name, URL: nd.url, Period: c.feed, Inventory: nd.inv, Load: nd.ps.Load}
		if pushFed {
			o.NATSURL, o.NATSOptions = brokerURL, []nats.Option{nats.SetCustomDialer(&c.nodeNATS)}
		}
		if kbURL != "" {
			o.KBURLs = []string{kbURL}
		}
		ix, err := c.index(cctx, o)
		if err != nil {
			return nil, err
		}
		c.runners.Go(func() {
			select {
			case <-cctx.Done():
				return
			case <-time.After(offset):
			}
			_ = ix.Run(cctx)
		})
	}
	// Every node's loops must have started: an index can be complete
	// before (a subscriber repairs from the nodes themselves) and a commit
	// at a node not yet publishing would not be seen until it does.
	rampEnd := time.Now().Add(ramp + 200*time.Millisecond)
	if c.idx != nil {
		want := n * p.BlobsPerNode
		deadline := time.Now().Add(3*c.feed + 60*time.Second)
		for c.idx.Entries() != want || len(c.idx.Nodes()) != n || time.Now().Before(rampEnd) {
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("index holds %d entries of %d nodes, want %d of %d", c.idx.Entries(), len(c.idx.Nodes()), want, n)
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return c, nil
}

// measureMode measures mode at n nodes.
func measureMode(ctx context.Context, mode string, n int, p indexParams, pool []digest.Digest, seed uint64) (IndexMode, error) {
	start := time.Now()
	c, err := startCluster(ctx, mode, n, p, pool, seed)
	if err != nil {
		return IndexMode{}, err
	}
	defer c.close()
	m := IndexMode{Mode: mode, Nodes: n, Neighbors: n, SetupSeconds: time.Since(start).Seconds()}
	switch mode {
	case modeOnline:
		m.Feed = "none: asks every neighbour per locate (timeout 500ms)"
	case modePeriodic, modeKBPull:
		m.Feed = fmt.Sprintf("polls every %v", c.feed)
	case modePush, modeKBPush:
		m.Feed = fmt.Sprintf("events; full every %v", c.feed)
	}
	rng := rand.New(rand.NewPCG(seed, 0x6c6f63))

	// Locate latency, at rest.
	locates := p.Locates
	if mode == modeOnline && n > 100 {
		locates = min(locates, 200) // each asks every neighbour: slow
	}
	lat, inIndex, complete, err := c.measureLocates(ctx, rng, locates)
	if err != nil {
		return m, err
	}
	if len(inIndex) > 0 {
		m.LocateIndexP99Ms = percentile(inIndex, 99)
	}
	m.Locates, m.Complete = len(lat), complete
	m.LocateP50Ms, m.LocateP99Ms, m.LocateMaxMs = percentile(lat, 50), percentile(lat, 99), percentile(lat, 100)
	switch mode {
	case modeOnline:
		m.LocateBytes = float64(c.peerBytes.n.Load()) / float64(len(lat))
	case modeKBPull, modeKBPush:
		m.LocateBytes = float64(c.kbLocateBytes.n.Load()) / float64(len(lat))
	}

	// Staleness.
	stale, missed, err := c.measureStaleness(ctx, rng)
	if err != nil {
		return m, err
	}
	m.Probes, m.ProbesMissed = len(stale)+missed, missed
	m.StaleP50Ms, m.StaleP99Ms, m.StaleMaxMs = percentile(stale, 50), percentile(stale, 99), percentile(stale, 100)

	// Control bytes in a steady window.
	if mode != modeOnline {
		commits, by, err := c.steadyWindow(ctx, rng)
		if err != nil {
			return m, err
		}
		perNodeMin := float64(n) * p.Window / 60
		m.WindowSeconds = p.Window
		m.CommitsPerNodeMin = float64(commits) / perNodeMin
		m.ControlByChannel = map[string]float64{}
		for k, v := range by {
			if v > 0 {
				m.ControlByChannel[k] = float64(v) / perNodeMin
				m.ControlBytes += float64(v) / perNodeMin
			}
		}
	}

	met := true
	switch {
	case mode == modeOnline && n == p.Online16:
		m.TargetLocateMs = 10
	case mode != modeOnline:
		m.TargetLocateMs = 1
	}
	if mode == modePush {
		m.TargetStaleMs = 250
	}
	if m.TargetLocateMs > 0 || m.TargetStaleMs > 0 {
		if m.TargetLocateMs > 0 && m.LocateP99Ms > m.TargetLocateMs {
			met = false
		}
		if m.TargetStaleMs > 0 && (m.StaleP99Ms > m.TargetStaleMs || m.ProbesMissed > 0) {
			met = false
		}
		m.Met = &met
	}
	return m, nil
}

// batch picks p.Batch digests some node holds and returns how many
// candidates they have.
func (c *indexCluster) batch(rng *rand.Rand) ([]digest.Digest, int) {
	ds := sample(rng, c.held, c.p.Batch)
	want := 0
	for _, d := range ds {
		want += c.truth[d]
	}
	return ds, want
}

// measureLocates times locates, one every 2ms or back to back when slower,
// and returns their latencies in ms (sorted), in kb modes the latencies of
// the same questions asked of the KB in-process, and the fraction of the
// expected candidates the locates returned.
func (c *indexCluster) measureLocates(ctx context.Context, rng *rand.Rand, count int) (lat, inIndex []float64, complete float64, err error) {
	c.peerBytes.n.Store(0)
	c.kbLocateBytes.n.Store(0)
	const pace = 2 * time.Millisecond
	var got, want int
	next := time.Now()
	for range count {
		if d := time.Until(next); d > 0 {
			time.Sleep(d)
		}
		next = next.Add(pace)
		ds, w := c.batch(rng)
		start := time.Now()
		res, err := c.res.Locate(ctx, ds)
		el := time.Since(start)
		if err != nil {
			return nil, nil, 0, err
		}
		lat = append(lat, float64(el.Nanoseconds())/1e6)
		if c.kb != nil {
			start = time.Now()
			if _, err := c.kb.Locate(resolver.LocateRequest{Node: "dest", Digests: ds}); err != nil {
				return nil, nil, 0, err
			}
			inIndex = append(inIndex, float64(time.Since(start).Nanoseconds())/1e6)
		}
		want += w
		for _, cs := range res {
			got += len(cs)
		}
	}
	slices.Sort(lat)
	slices.Sort(inIndex)
	return lat, inIndex, float64(got) / float64(max(want, 1)), nil
}

// visible reports whether the index names node as a holder of d.
func (c *indexCluster) visible(ctx context.Context, d digest.Digest, node string) (bool, error) {
	var cands map[digest.Digest][]peers.Candidate
	if c.kb != nil {
		r, err := c.kb.Locate(resolver.LocateRequest{Node: "dest", Digests: []digest.Digest{d}})
		if err != nil {
			return false, err
		}
		cands = r.Candidates
	} else {
		var err error
		if cands, err = c.res.Locate(ctx, []digest.Digest{d}); err != nil {
			return false, err
		}
	}
	for _, cand := range cands[d] {
		if cand.Node == node {
			return true, nil
		}
	}
	return false, nil
}

// commit adds a new blob at node i.
func (c *indexCluster) commit(i int, rng *rand.Rand) digest.Digest {
	k := c.next.Add(1)
	d := digest.FromString(fmt.Sprintf("coop-bench-commit/%s/%d/%d", c.mode, len(c.nodes), k))
	c.nodes[i].inv.Add(d, 1+rng.Int64N(64<<20))
	return d
}

// measureStaleness commits at random nodes and times until the index
// names them, several probes at a time for the polling modes. It returns
// the sorted times in ms and how many probes never became visible.
func (c *indexCluster) measureStaleness(ctx context.Context, rng *rand.Rand) ([]float64, int, error) {
	workers := 1
	switch c.mode {
	case modePeriodic, modeKBPull:
		workers = 25 // each probe waits for a poll: run them side by side
	case modePush, modeKBPush:
		workers = 4
	}
	every := seconds(c.p.ProbeEveryMs / 1000)
	timeout := 3*c.feed + 5*time.Second
	var (
		mu     sync.Mutex
		out    []float64
		missed int
		firstE error
		left   atomic.Int64
		wg     sync.WaitGroup
	)
	left.Store(int64(c.p.Probes))
	for w := range workers {
		wrng := rand.New(rand.NewPCG(rng.Uint64(), uint64(w)))
		wg.Go(func() {
			// Spread the workers' phases.
			time.Sleep(time.Duration(wrng.Int64N(int64(100 * time.Millisecond))))
			for left.Add(-1) >= 0 && ctx.Err() == nil {
				i := wrng.IntN(len(c.nodes))
				mu.Lock()
				d := c.commit(i, wrng)
				mu.Unlock()
				start := time.Now()
				t := time.NewTicker(every)
				var seen bool
				for !seen && time.Since(start) < timeout {
					ok, err := c.visible(ctx, d, c.nodes[i].name)
					if err != nil {
						mu.Lock()
						firstE = cmpOr(firstE, err)
						mu.Unlock()
						break
					}
					if seen = ok; !seen {
						<-t.C
					}
				}
				el := time.Since(start)
				t.Stop()
				mu.Lock()
				if seen {
					out = append(out, float64(el.Nanoseconds())/1e6)
				} else {
					missed++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, 0, err
	}
	if firstE != nil {
		return nil, 0, firstE
	}
	slices.Sort(out)
	return out, missed, nil
}

func cmpOr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// steadyWindow commits at the stated rate for the window and returns the
// commits made and the bytes of each channel.
func (c *indexCluster) steadyWindow(ctx context.Context, rng *rand.Rand) (int, map[string]int64, error) {
	window := seconds(c.p.Window)
	every := seconds(c.p.CommitEvery) / time.Duration(len(c.nodes))
	chans := map[string]*counted{"peer": &c.peerBytes, "kb": &c.kbBytes, "nats-node": &c.nodeNATS, "nats-index": &c.indexNATS}
	before := map[string]int64{}
	for k, v := range chans {
		before[k] = v.n.Load()
	}
	t := time.NewTicker(every)
	defer t.Stop()
	end := time.After(window)
	commits := 0
	for done := false; !done; {
		select {
		case <-ctx.Done():
			return 0, nil, ctx.Err()
		case <-end:
			done = true
		case <-t.C:
			c.commit(rng.IntN(len(c.nodes)), rng)
			commits++
		}
	}
	by := map[string]int64{}
	for k, v := range chans {
		by[k] = v.n.Load() - before[k]
	}
	return commits, by, nil
}

// percentile returns the nearest-rank p-th percentile of sorted xs.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(xs)))) - 1
	return xs[min(max(i, 0), len(xs)-1)]
}

// printIndexTable prints the section as markdown.
func printIndexTable(r *IndexResults) {
	fmt.Println()
	fmt.Printf("Neighbour index. %s\n\n", r.Setup)
	for _, k := range slices.Sorted(maps.Keys(r.Method)) {
		fmt.Printf("- %s: %s\n", k, r.Method[k])
	}
	fmt.Println()
	fmt.Println("| mode | nodes | feed | locate p50 / p99 ms | complete | staleness p50 / p99 ms | control B/node/min | B/locate | target | met? |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|")
	for _, m := range r.Modes {
		target := "—"
		switch {
		case m.TargetLocateMs > 0 && m.TargetStaleMs > 0:
			target = fmt.Sprintf("locate p99 ≤ %g ms, staleness p99 ≤ %g ms", m.TargetLocateMs, m.TargetStaleMs)
		case m.TargetLocateMs > 0:
			target = fmt.Sprintf("locate p99 ≤ %g ms", m.TargetLocateMs)
		case m.Mode == modeOnline:
			target = "— (stated for 16)"
		}
		verdict := "—"
		if m.Met != nil {
			verdict = "missed"
			if *m.Met {
				verdict = "met"
			}
		}
		stale := fmt.Sprintf("%.1f / %.1f", m.StaleP50Ms, m.StaleP99Ms)
		if m.ProbesMissed > 0 {
			stale += fmt.Sprintf(" (%d of %d never seen)", m.ProbesMissed, m.Probes)
		}
		control := "0 (none at rest)"
		if m.Mode != modeOnline {
			var parts []string
			for _, k := range slices.Sorted(maps.Keys(m.ControlByChannel)) {
				parts = append(parts, fmt.Sprintf("%s %s", k, human(m.ControlByChannel[k])))
			}
			control = fmt.Sprintf("%s (%s)", human(m.ControlBytes), strings.Join(parts, ", "))
		}
		locate := fmt.Sprintf("%.3f / %.3f", m.LocateP50Ms, m.LocateP99Ms)
		if m.LocateIndexP99Ms > 0 {
			locate += fmt.Sprintf(" (in KB: p99 %.3f)", m.LocateIndexP99Ms)
		}
		fmt.Printf("| %s | %d | %s | %s | %.0f%% | %s | %s | %s | %s | %s |\n",
			m.Mode, m.Nodes, m.Feed, locate, 100*m.Complete, stale, control, human(m.LocateBytes), target, verdict)
	}
	k := r.KB
	verdict := "missed"
	if k.Met {
		verdict = "met"
	}
	fmt.Println()
	fmt.Printf("ClusterKB at %d nodes × %d blobs (%s over %d digests, %d entries, loaded in %.1f s): heap in use %s (alloc %s), target ≤ 1 GiB: %s\n\n",
		k.Nodes, k.BlobsPerNode, k.Distribution, k.Pool, k.Entries, k.LoadSeconds, human(float64(k.HeapInuseBytes)), human(float64(k.HeapAllocBytes)), verdict)
	fmt.Println("| ClusterKB locate | via | locates | p50 ms | p99 ms | candidates | B/answer | target | met? |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|")
	for _, l := range k.Locates {
		target, v := "—", "—"
		if l.Met != nil {
			target = fmt.Sprintf("p99 ≤ %g ms", l.TargetP99Ms)
			v = "missed"
			if *l.Met {
				v = "met"
			}
		}
		fmt.Printf("| %s | %s | %d | %.3f | %.3f | %.0f | %s | %s | %s |\n",
			l.Name, l.Via, l.Locates, l.P50Ms, l.P99Ms, l.Candidates, human(l.ResponseBytes), target, v)
	}
}

// human formats a byte count.
func human(b float64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", b/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	default:
		return fmt.Sprintf("%.0f B", b)
	}
}
