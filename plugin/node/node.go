// Package node assembles a coop node from its parts: the content store (as
// containerd's proxy store, or beside containerd's own in observer mode), the
// peer server, the neighbour index, the mirror and the claim store. It is
// what `coop node` runs, and what the tests and benchmarks start: Options →
// New → Run → Close.
package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/plugin"
	"github.com/coopnet/coop/plugin/mirror"
	"github.com/coopnet/coop/plugin/upstream"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/modes"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
)

// Content modes: how the node sits beside containerd's content store.
const (
	// ContentObserver leaves containerd's built-in store alone and learns
	// its blobs from its events.
	ContentObserver = "observer"
	// ContentProxy makes coop containerd's content store (content and diff
	// proxy plugins); claims need it.
	ContentProxy = "proxy"
)

// ContentModes lists the content modes.
var ContentModes = []string{ContentObserver, ContentProxy}

// claimRecent is how long, in online and kb modes, a locate's answer may
// decide a claim.
const claimRecent = time.Minute

// Options configure a Node. Index.Node, Index.URL, Index.Inventory,
// Index.Client, Index.Load and Index.Registerer are set by New.
type Options struct {
	// Name is the node's name, reported to peers. Required.
	Name string
	// Root is coop's content store directory. Required.
	Root string
	// ContentMode is ContentObserver or ContentProxy. Required.
	ContentMode string
	// ContentSocket is the unix socket of containerd's content and diff
	// proxy plugins (proxy mode). Required in proxy mode.
	ContentSocket string
	// Containerd is containerd's socket: observer mode follows it, claims
	// need it, container records come from it. Empty: none.
	Containerd string
	// PeerListen is the peer server's address. Required.
	PeerListen string
	// Advertise is the URL other nodes reach the peer server at. Required.
	Advertise string
	// MirrorListen is the mirror's address; loopback only. Required.
	MirrorListen string
	// DebugListen serves Go's /debug/pprof; loopback only; empty: off.
	DebugListen string
	// Index configures the neighbour index.
	Index modes.Options
	// UploadLimit caps the peer server's upload, bytes/s; 0: none.
	UploadLimit int64
	// MaxUploads bounds the blob uploads served at once; 0: no bound.
	MaxUploads int
	// Policy selects the peers of a blob (peers.Policies).
	Policy string
	// DownloadBuffer bounds one blob's bytes fetched ahead of the local
	// write; at least 1 MiB.
	DownloadBuffer int64
	// MaxBlobSize bounds a blob fetched from peers when no manifest
	// committed here gave its size. 0: peers.DefaultMaxBlobSize.
	MaxBlobSize int64
	// MaxUnverified bounds the bytes of blobs fetched from peers and not
	// verified yet, summed (the free space of Root bounds them too); a
	// fetch beyond it is left to the registry. 0:
	// content.DefaultMaxUnverified.
	MaxUnverified int64
	// StallTimeout cuts a peer that sends nothing this long. Required.
	StallTimeout time.Duration
	// Claim answers containerd's Info for blobs known peers hold as found
	// and fetches them at once (proxy mode, needs Containerd).
	Claim bool
	// ClaimParallel is how many claimed blobs download at once.
	ClaimParallel int
	// ClaimRegistry gives claims the pull's registry as their fallback,
	// and claims from the registry alone the blobs no peer holds, so that
	// no layer crosses containerd's content Write stream
	// (plugin/upstream). A blob whose registry coop cannot pull from is
	// then claimed only when two peers hold it. Off: a claim whose peers
	// fail fails its pull once.
	ClaimRegistry bool
	// HostsDir is containerd's registry config_path, the hosts.toml tree
	// the registries' endpoints come from (coop's mirror left out). Empty:
	// https://<registry>.
	HostsDir string
	// RegistryCredentials is a file of registry credentials in Docker's
	// config.json format (upstream.LoadCredentials); empty: the anonymous
	// token flow only.
	RegistryCredentials string
	// Swarm shares the blobs being downloaded: their chunks are served to
	// peers as they arrive, and peers still downloading a blob serve
	// theirs (peers.Partials, under Root/partials). Needs the stripe
	// policy.
	Swarm bool
	// ServeContainers are the containerd namespaces whose container records
	// the peer server gives to migration destinations (coop migrate): a
	// record holds the container's OCI spec, its environment included
	// (Kubernetes puts Secrets there). Other namespaces are refused 403.
	// Empty: records are off. Needs Containerd, and TLS unless PeerListen
	// is loopback.
	ServeContainers []string
	// AllowRemoteStop lets a migration destination stop a container of
	// ServeContainers here.
	AllowRemoteStop bool
	// ShareNamespaces, when set, limits the blobs served to peers (and
	// listed in the inventory) to those containerd holds in these
	// namespaces. Observer mode only: in proxy mode coop's store does not
	// know which namespace holds a blob. Empty: every blob.
	ShareNamespaces []string
	// TLS are the node's credentials: the peer server then speaks mutual
	// TLS and serves only cluster members (but /healthz and /metrics), and
	// the node presents them to peers, ClusterKB and the broker. Its name
	// must be Name. Nil: plain HTTP, which needs Insecure unless every
	// listener is on loopback.
	TLS *trust.Credentials
	// Insecure allows plain HTTP on a non-loopback peer listener.
	Insecure bool
	// Errors, when set, holds the last warnings and errors logged (the
	// caller hooks it into the logger); the status shows them.
	Errors *ErrorLog
}

// Validate checks o before anything is started: every contradiction and
// missing value is an errdefs.ErrInvalidArgument naming its flag.
func (o Options) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalidArgument)...))
	}
	if o.Name == "" {
		bad("--name is required")
	}
	if o.Root == "" {
		bad("--root is required")
	}
	switch o.ContentMode {
	case ContentObserver:
		if o.Containerd == "" {
			bad("--content-mode observer needs --containerd-address")
		}
	case ContentProxy:
		if o.ContentSocket == "" {
			bad("--content-mode proxy needs --content-socket")
		}
	default:
		bad("--content-mode %q: want %v", o.ContentMode, ContentModes)
	}
	if o.Claim && o.ContentMode != ContentProxy {
		bad("--claim needs --content-mode proxy")
	}
	if o.Claim && o.Containerd == "" {
		bad("--claim needs --containerd-address (a failed claim must be removed from containerd's records)")
	}
	if o.RegistryCredentials != "" && (!o.Claim || !o.ClaimRegistry) {
		bad("--registry-credentials: only claims use them (--claim, --claim-registry)")
	}
	if o.ClaimParallel < 1 {
		bad("--claim-parallel %d: want 1 or more", o.ClaimParallel)
	}
	if len(o.ServeContainers) > 0 && o.Containerd == "" {
		bad("--serve-containers needs --containerd-address")
	}
	if o.AllowRemoteStop && len(o.ServeContainers) == 0 {
		bad("--allow-remote-stop needs --serve-containers (the namespaces whose containers peers may read and stop)")
	}
	if len(o.ServeContainers) > 0 && o.TLS == nil && !Loopback(o.PeerListen) {
		bad("--serve-containers without --tls-dir would give containers' specs (environment and secrets included) to anyone who reaches --peer-listen %q: give --tls-dir (see coop ca) or a loopback --peer-listen", o.PeerListen)
	}
	if len(o.ShareNamespaces) > 0 && o.ContentMode != ContentObserver {
		bad("--share-namespaces needs --content-mode observer: in proxy mode coop's store does not know which namespace holds a blob")
	}
	for _, l := range []struct {
		flag string
		nss  []string
	}{{"--serve-containers", o.ServeContainers}, {"--share-namespaces", o.ShareNamespaces}} {
		for _, ns := range l.nss {
			if err := identifiers.Validate(ns); err != nil {
				bad("%s: namespace %q: %v", l.flag, ns, err)
			}
		}
	}
	if o.PeerListen == "" || o.Advertise == "" {
		bad("--peer-listen and --advertise are required")
	}
	if o.TLS != nil {
		if o.TLS.Name() != o.Name {
			bad("--name %q, but the certificate in --tls-dir %s names %q", o.Name, o.TLS.Dir(), o.TLS.Name())
		}
		if !strings.HasPrefix(o.Advertise, "https://") {
			bad("--advertise %q: with --tls-dir the peer server speaks https", o.Advertise)
		}
	} else if !o.Insecure && !Loopback(o.PeerListen) {
		bad("--peer-listen %q is reachable from the network and would serve blobs to anyone: give --tls-dir (see coop ca) or --insecure", o.PeerListen)
	}
	if _, err := plugin.MirrorURL(o.MirrorListen); err != nil {
		errs = append(errs, fmt.Errorf("--mirror-listen: %w", err))
	}
	if o.DebugListen != "" {
		if _, err := plugin.MirrorURL(o.DebugListen); err != nil {
			errs = append(errs, fmt.Errorf("--debug-listen: %w", err))
		}
	}
	if !slices.Contains(peers.Policies, o.Policy) {
		bad("--policy %q: want one of %v", o.Policy, peers.Policies)
	}
	if o.MaxUploads < 0 {
		bad("--max-uploads %d: want 0 or more", o.MaxUploads)
	}
	if o.UploadLimit < 0 {
		bad("--upload-limit %d: want 0 or more bytes per second", o.UploadLimit)
	}
	if o.DownloadBuffer < 1<<20 {
		bad("--download-buffer %d: want at least 1MiB", o.DownloadBuffer)
	}
	if o.MaxBlobSize < 0 {
		bad("--max-blob-size %d: want 0 (the default) or more bytes", o.MaxBlobSize)
	}
	if o.MaxUnverified < 0 {
		bad("--max-unverified %d: want 0 (the default) or more bytes", o.MaxUnverified)
	}
	if o.StallTimeout <= 0 {
		bad("--stall-timeout %v: want a positive duration", o.StallTimeout)
	}
	ix := o.indexOptions(nil, nil, nil, nil)
	if err := ix.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// indexOptions completes o.Index with what the node provides.
func (o Options) indexOptions(inv *content.Inventory, client *peers.Client, load func() peers.Load, reg prometheus.Registerer) modes.Options {
	ix := o.Index
	ix.Node, ix.URL = o.Name, o.Advertise
	ix.Inventory, ix.Client, ix.Load, ix.Registerer = inv, client, load, reg
	if o.TLS != nil {
		ix.TLS = o.TLS.ClientConfig()
	}
	return ix
}

// Node is one coop node. New builds it and opens its listeners, Run serves
// until its context ends, Close releases what New took.
type Node struct {
	opts Options
	reg  *prometheus.Registry
	inv  *content.Inventory
	// sizes are what the manifests committed here say their blobs weigh;
	// budget bounds the unverified bytes of peer fetches.
	sizes  *content.ExpectedSizes
	budget *content.Budget
	// partials are the swarm's downloads, nil when it is off.
	partials *peers.Partials
	// started is when New ran; registryBytes counts the bytes of blobs
	// containerd committed that did not come from peers.
	started       time.Time
	registryBytes atomic.Int64
	errors        *ErrorLog
	client        *peers.Client
	status        statusFlight

	store      *content.Store
	observer   *plugin.Observer
	containers *plugin.Containers
	index      *modes.Index
	mirror     *mirror.Mirror
	upstream   *upstream.Registries
	claims     *content.ClaimStore
	peerSrv    *peers.Server

	sock           net.Listener // proxy mode only
	peerL, mirrorL net.Listener
	debugL         net.Listener
	grpcSrv        *grpc.Server
	peerHTTP       *http.Server
	mirrorHTTP     *http.Server
	debugHTTP      *http.Server
	closeOnce      sync.Once
	closeErr       error
}

// New validates o, builds the node's parts and opens its listeners. Nothing
// is served until Run. On error everything it took is released.
func New(ctx context.Context, o Options) (_ *Node, retErr error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	n := &Node{opts: o, reg: prometheus.NewRegistry(), inv: content.NewInventory(), sizes: content.NewExpectedSizes(0),
		started: time.Now(), errors: o.Errors}
	defer func() {
		if retErr != nil {
			_ = n.Close()
		}
	}()
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("node", o.Name))
	n.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	n.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "coop_inventory_blobs", Help: "Blobs in this node's inventory.",
	}, func() float64 { return float64(n.inv.Len()) }))
	n.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "coop_manifest_sizes", Help: "Blob sizes known from the manifests and indexes committed on this node (peers reporting another size are not candidates).",
	}, func() float64 { return float64(n.sizes.Len()) }))
	n.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "coop_registry_bytes_total", Help: "Bytes of the blobs containerd committed that did not come from peers through coop (from registries).",
	}, func() float64 { return float64(n.registryBytes.Load()) }))
	n.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "coop_unverified_bytes", Help: "Bytes of the blobs being fetched from peers, not verified yet (bounded by --max-unverified and the free disk).",
	}, func() float64 { return float64(n.budget.Used()) }))

	served, err := n.openStores(ctx)
	if err != nil {
		return nil, err
	}
	var records peers.ContainerRecords
	if o.Containerd != "" {
		if n.containers, err = plugin.NewContainers(o.Containerd); err != nil {
			return nil, fmt.Errorf("--containerd-address: %w", err)
		}
		if len(o.ServeContainers) > 0 {
			records = n.containers
		}
	}
	var partials *peers.Partials
	if o.Swarm && o.Policy == peers.PolicyStripe {
		if partials, err = peers.NewPartials(filepath.Join(o.Root, "partials")); err != nil {
			return nil, err
		}
		n.partials = partials
	}
	if n.peerSrv, err = peers.NewServer(peers.ServerOptions{
		Containers: records, ContainerNamespaces: o.ServeContainers, AllowStop: o.AllowRemoteStop,
		Node: o.Name, Store: served, Inventory: n.inv, Registerer: n.reg, Gatherer: n.reg, MaxUploads: o.MaxUploads,
		ClientKey: clientKey, Partials: partials,
	}); err != nil {
		return nil, err
	}
	var clientTLS *tls.Config
	if o.TLS != nil {
		clientTLS = o.TLS.ClientConfig()
	}
	n.client = &peers.Client{Node: o.Name, HTTP: &http.Client{Transport: &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ResponseHeaderTimeout: 5 * time.Second,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
		TLSClientConfig:       clientTLS,
	}}}
	ixOpts := o.indexOptions(n.inv, n.client, n.peerSrv.Load, n.reg)
	if partials != nil {
		ixOpts.Partials = partials
	}
	if n.index, err = modes.New(ctx, ixOpts); err != nil {
		return nil, err
	}
	res := n.index.Resolver()
	if o.Claim && !n.index.Local() {
		// Claims are decided without a round trip: in online and kb
		// modes, from what a recent locate found.
		res = resolver.Remember(res, claimRecent)
	}
	// The mirror's write endpoints (a migration's sources) need this token,
	// readable only by this node's user (coop migrate runs as root too).
	token, err := mirror.LoadOrCreateToken(filepath.Join(o.Root, mirror.TokenFile))
	if err != nil {
		return nil, fmt.Errorf("mirror API token: %w", err)
	}
	if n.budget, err = content.NewBudget(content.BudgetOptions{Max: o.MaxUnverified, Dir: o.Root}); err != nil {
		return nil, err
	}
	mopts := mirror.Options{
		Resolver: res, Peers: n.client, Store: n.store, StallTimeout: o.StallTimeout, Registerer: n.reg,
		Policy: o.Policy, DownloadBuffer: o.DownloadBuffer, Sources: resolver.NewSources(), APIToken: token,
		Sizes: n.expectedSizes(), MaxBlobSize: o.MaxBlobSize, Budget: n.budget,
		LocateChildren: o.Claim && !n.index.Local(), Partials: partials,
	}
	if o.Claim && o.ClaimRegistry {
		if n.upstream, err = n.newUpstream(ctx); err != nil {
			return nil, err
		}
		mopts.Upstream = n.upstream
	}
	if n.mirror, err = mirror.New(mopts); err != nil {
		return nil, err
	}
	if err := n.listen(ctx); err != nil {
		return nil, err
	}
	return n, nil
}

var _ mirror.Upstream = (*upstream.Registries)(nil)

// newUpstream returns the registries claims fall back to.
func (n *Node) newUpstream(ctx context.Context) (*upstream.Registries, error) {
	o := n.opts
	mu, err := plugin.MirrorURL(o.MirrorListen)
	if err != nil {
		return nil, err
	}
	uo := upstream.Options{HostsDir: o.HostsDir, Skip: []string{strings.TrimPrefix(mu, "http://")}, Parents: n.sizes, Registerer: n.reg,
		OnBytes: func(k int) { n.registryBytes.Add(int64(k)) }}
	if o.RegistryCredentials != "" {
		if uo.Credentials, err = upstream.LoadCredentials(o.RegistryCredentials); err != nil {
			return nil, err
		}
	}
	return upstream.New(ctx, uo)
}

// openStores opens coop's content store and, in observer mode, the
// observer of containerd's; it returns the store the peer server reads.
func (n *Node) openStores(ctx context.Context) (peers.BlobStore, error) {
	o := n.opts
	var err error
	if o.ContentMode == ContentProxy {
		if n.store, err = content.NewStore(ctx, o.Root, n.inv, content.WithExpectedSizes(n.sizes)); err != nil {
			return nil, err
		}
		return n.store, nil
	}
	// Observer: coop's own store only holds what the mirror lands for
	// containerd, until containerd has committed it; the inventory is
	// containerd's, from its events.
	if n.store, err = content.NewStore(ctx, o.Root, discard{}); err != nil {
		return nil, err
	}
	if n.observer, err = plugin.NewObserver(plugin.ObserverOptions{
		Address: o.Containerd, Recorder: n.inv, OnHeld: n.dropLanded, Namespaces: o.ShareNamespaces,
		Sizes: n.sizes, OnCommitted: n.committed,
	}); err != nil {
		return nil, fmt.Errorf("--containerd-address: %w", err)
	}
	if len(o.ShareNamespaces) > 0 {
		// A blob the mirror landed belongs to no namespace until
		// containerd commits it: only the observer's shared view is served.
		return n.observer, nil
	}
	return plugin.NewUnionStore(n.store, n.observer), nil
}

// claimMinSize is the smallest blob claimed: manifests and configs go the
// mirror's way, which falls back to the registry when peers fail.
const claimMinSize = 1 << 20

// expectedSizes is where the mirror learns the size a manifest gives a
// blob: in observer mode the observer, which also asks containerd.
func (n *Node) expectedSizes() mirror.Sizes {
	if n.observer != nil {
		return n.observer
	}
	return n.sizes
}

// committed counts a blob containerd committed (observer mode) as from a
// registry unless coop landed it from peers (its copy is still there: OnHeld
// drops it next).
func (n *Node) committed(ctx context.Context, d digest.Digest, size int64) {
	if _, err := n.store.Info(ctx, d); err != nil {
		n.registryBytes.Add(size)
	}
}

// dropLanded removes coop's own copy of a blob containerd now holds (observer
// mode): peers are served from containerd's store from then on.
func (n *Node) dropLanded(ctx context.Context, d digest.Digest) {
	if _, err := n.store.Info(ctx, d); err != nil {
		return
	}
	if err := n.store.Delete(ctx, d); err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).WithField("digest", d).Warn("could not drop coop's copy of a blob containerd holds")
		return
	}
	log.G(ctx).WithField("digest", d).Debug("containerd holds the blob; coop's copy dropped")
}

// claimCopies is how many copies of a claimed blob are on disk until it
// is verified: its file, and the swarm's spool when the swarm is on.
func (n *Node) claimCopies() int64 {
	if n.partials != nil {
		return 2
	}
	return 1
}

// listen opens the content socket (proxy mode) and the TCP listeners.
func (n *Node) listen(ctx context.Context) error {
	o := n.opts
	var err error
	if o.ContentMode == ContentProxy {
		var cstore ctdcontent.Store = n.store
		if o.Claim {
			if n.claims, err = content.NewClaimStore(ctx, n.store, content.ClaimOptions{
				Source: n.mirror, Cleaner: n.containers, Registerer: n.reg, Active: o.ClaimParallel,
				Budget: n.budget, MinSize: claimMinSize, Copies: n.claimCopies(),
			}); err != nil {
				return err
			}
			cstore = n.claims
		}
		if n.sock, err = content.ListenUnix(ctx, o.ContentSocket); err != nil {
			return err
		}
		n.grpcSrv = content.NewGRPCServer(cstore, content.WithCommitted(func(_ digest.Digest, size int64) {
			n.registryBytes.Add(size) // what coop fetched was there before
		}))
	}
	if n.peerL, err = net.Listen("tcp", o.PeerListen); err != nil {
		return fmt.Errorf("--peer-listen: %w", err)
	}
	if n.mirrorL, err = net.Listen("tcp", o.MirrorListen); err != nil {
		return fmt.Errorf("--mirror-listen: %w", err)
	}
	peerHandler := peers.LimitUpload(n.peerSrv, o.UploadLimit)
	if o.TLS != nil {
		n.peerL = tls.NewListener(n.peerL, o.TLS.ServerConfig())
		peerHandler = peers.Authenticated(peerHandler, peers.OpenPaths...)
	}
	// Blob answers move their own write deadline while bytes flow; every
	// other answer is bounded as a whole.
	n.peerHTTP = peers.NewHTTPServer(peerHandler, peers.HTTPServerOptions{})
	// The mirror holds containerd's blob answers open while it fetches.
	mirrorHandler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == StatusPath {
			n.serveStatus(w, r)
			return
		}
		n.mirror.ServeHTTP(w, r)
	})
	n.mirrorHTTP = peers.NewHTTPServer(mirrorHandler, peers.HTTPServerOptions{WriteTimeout: -1})
	if o.DebugListen != "" {
		if n.debugL, err = net.Listen("tcp", o.DebugListen); err != nil {
			return fmt.Errorf("--debug-listen: %w", err)
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		n.debugHTTP = peers.NewHTTPServer(mux, peers.HTTPServerOptions{WriteTimeout: -1}) // profiles take their time
	}
	return nil
}

// PeerAddr is the peer server's listening address.
func (n *Node) PeerAddr() net.Addr { return n.peerL.Addr() }

// MirrorAddr is the mirror's listening address.
func (n *Node) MirrorAddr() net.Addr { return n.mirrorL.Addr() }

// Inventory is the node's inventory: the blobs it serves peers.
func (n *Node) Inventory() *content.Inventory { return n.inv }

// Run serves until ctx ends or a server fails, then stops the servers
// (each drains for up to 5 s) and waits for every loop. It returns nil when
// ctx ended. Close still has to be called.
func (n *Node) Run(ctx context.Context) error {
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("node", n.opts.Name))
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return n.index.Run(gctx) })
	if n.observer != nil {
		g.Go(func() error { return n.observer.Run(gctx) })
	}
	if n.grpcSrv != nil {
		g.Go(func() error { return n.grpcSrv.Serve(n.sock) })
		g.Go(func() error {
			<-gctx.Done()
			stopGRPC(context.WithoutCancel(ctx), n.grpcSrv)
			return nil
		})
	}
	g.Go(func() error { return peers.Serve(gctx, n.peerHTTP, n.peerL) })
	g.Go(func() error { return peers.Serve(gctx, n.mirrorHTTP, n.mirrorL) })
	if n.debugHTTP != nil {
		g.Go(func() error { return peers.Serve(gctx, n.debugHTTP, n.debugL) })
	}
	if n.containers != nil && n.opts.ContentMode == ContentProxy {
		g.Go(func() error { n.checkContainerdContent(gctx); return nil })
	}
	o := n.opts
	log.G(ctx).WithFields(log.Fields{
		"root": o.Root, "socket": o.ContentSocket, "content_mode": o.ContentMode, "peer": n.peerL.Addr().String(),
		"advertise": o.Advertise, "mirror": n.mirrorL.Addr().String(), "index": o.Index.Mode, "claim": o.Claim,
		"neighbors": len(o.Index.Neighbors), "blobs": n.inv.Len(), "epoch": n.inv.Epoch(),
	}).Info("coop node ready")
	err := g.Wait()
	if errors.Is(err, context.Canceled) || (err == nil && ctx.Err() != nil) {
		log.G(ctx).Info("coop node stopped")
		return nil
	}
	return err
}

// checkContainerdContent warns once containerd answers if it keeps its own
// content store (proxy mode needs containerd set up for coop). containerd
// usually starts after coop: it is asked every 2 s for 2 minutes.
func (n *Node) checkContainerdContent(ctx context.Context) {
	for range 60 {
		cctx, cancel := context.WithTimeout(ctx, statusProbeTimeout)
		err := n.containers.Ping(cctx)
		p := ""
		if err == nil {
			p = n.contentProblem(cctx)
		}
		cancel()
		if err == nil {
			if p != "" {
				log.G(ctx).Warn(p)
			}
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}

// Close releases everything New took: listeners, the claim store, the
// mirror's fetches, the index's connections, containerd's clients and the
// content socket. It is safe to call more than once.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		var errs []error
		for _, l := range []net.Listener{n.sock, n.peerL, n.mirrorL, n.debugL} {
			if l != nil {
				if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
					errs = append(errs, err)
				}
			}
		}
		if n.claims != nil {
			errs = append(errs, n.claims.Close())
		}
		if n.mirror != nil {
			errs = append(errs, n.mirror.Close())
		}
		if n.upstream != nil {
			errs = append(errs, n.upstream.Close())
		}
		if n.index != nil {
			errs = append(errs, n.index.Close())
		}
		if n.containers != nil {
			errs = append(errs, n.containers.Close())
		}
		if n.observer != nil {
			errs = append(errs, n.observer.Close())
		}
		if n.sock != nil {
			if err := os.Remove(n.opts.ContentSocket); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}

// clientKey names a peer server's client for its share of the upload
// slots: the node its certificate names, else its address.
func clientKey(r *http.Request) string {
	if name, ok := trust.Name(r); ok {
		return "node " + name
	}
	return peers.ClientIP(r)
}

// Loopback reports whether the listen address addr (host:port) only
// accepts connections from this host.
func Loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// discard is a recorder that records nothing.
type discard struct{}

func (discard) Add(digest.Digest, int64) {}
func (discard) Remove(digest.Digest)     {}

// stopGRPC stops the content service, letting its streams drain for up to
// peers.ShutdownGrace.
func stopGRPC(ctx context.Context, srv *grpc.Server) {
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(peers.ShutdownGrace):
		log.G(ctx).Warn("content service did not drain in time; closing its streams")
		srv.Stop()
		<-stopped
	}
}
