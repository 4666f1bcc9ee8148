package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
	"github.com/pelletier/go-toml/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
)

// claimRecent is how long, in online and kb modes, a locate's answer may
// decide a claim.
const claimRecent = time.Minute

const (
	defaultContentSocket = "/run/coop/content.sock"
	// defaultContainerdAddress is containerd's own default socket.
	defaultContainerdAddress = "/run/containerd/containerd.sock"
	defaultMirrorListen      = "127.0.0.1:5051"
	defaultPeerPort          = "5050"
)

// nodeConfig is coop node's configuration: flags, or the same keys in a TOML
// file given with --config (flags win).
type nodeConfig struct {
	Name          string  `toml:"name"`
	Root          string  `toml:"root"`
	ContentSocket string  `toml:"content_socket"`
	PeerListen    string  `toml:"peer_listen"`
	Advertise     string  `toml:"advertise"`
	MirrorListen  string  `toml:"mirror_listen"`
	Neighbors     string  `toml:"neighbors"`
	Index         string  `toml:"index"`
	Period        string  `toml:"period"`
	NATSURL       string  `toml:"nats_url"`
	KB            string  `toml:"kb"`
	NeighborsKB   bool    `toml:"neighbors_from_kb"`
	DropEvents    float64 `toml:"debug_drop_events"`
	UploadLimit   int64   `toml:"upload_limit"`
	MaxUploads    int     `toml:"max_uploads"`
	Policy        string  `toml:"policy"`
	DownloadBuf   string  `toml:"download_buffer"`
	PeerTimeout   string  `toml:"peer_timeout"`
	StallTimeout  string  `toml:"stall_timeout"`
	LogLevel      string  `toml:"log_level"`
	DebugListen   string  `toml:"debug_listen"`
	Containerd    string  `toml:"containerd_address"`
	ContentMode   string  `toml:"content_mode"`
	AllowStop     bool    `toml:"allow_remote_stop"`
	Claim         bool    `toml:"claim"`
	ClaimParallel int     `toml:"claim_parallel"`
}

func defaultNodeConfig() nodeConfig {
	host, _ := os.Hostname()
	return nodeConfig{
		Name:          host,
		Root:          "/var/lib/coop",
		ContentSocket: defaultContentSocket,
		PeerListen:    ":" + defaultPeerPort,
		MirrorListen:  defaultMirrorListen,
		Index:         "online",
		Period:        "10s",
		MaxUploads:    16,
		ClaimParallel: 3,
		Policy:        peers.PolicyStripe,
		ContentMode:   contentModeObserver,
		Containerd:    defaultContainerdAddress,
		DownloadBuf:   "64MiB",
		PeerTimeout:   "500ms",
		StallTimeout:  "5s",
		LogLevel:      "info",
	}
}

func (c *nodeConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.Name, "name", c.Name, "this node's name (default: the hostname)")
	fs.StringVar(&c.Root, "root", c.Root, "content store directory")
	fs.StringVar(&c.ContentSocket, "content-socket", c.ContentSocket, "unix socket for containerd's content and diff proxy plugins")
	fs.StringVar(&c.PeerListen, "peer-listen", c.PeerListen, "peer server address (blobs and the coop API for other nodes)")
	fs.StringVar(&c.Advertise, "advertise", c.Advertise, "URL other nodes use to reach the peer server (default http://<hostname>:<peer port>)")
	fs.StringVar(&c.MirrorListen, "mirror-listen", c.MirrorListen, "mirror address containerd tries first; loopback only")
	fs.StringVar(&c.Neighbors, "neighbors", c.Neighbors, "nodes this node may fetch from: NAME=URL,NAME=URL")
	fs.StringVar(&c.Index, "index", c.Index, "neighbour index: online (ask every neighbour per pull), periodic (poll every neighbour each --period), push (neighbours' events through the broker), kb (ask ClusterKB) or none (registry only)")
	fs.StringVar(&c.Period, "period", c.Period, "poll period (periodic), full-inventory period (publishing), ClusterKB heartbeat period")
	fs.StringVar(&c.NATSURL, "nats-url", c.NATSURL, "NATS broker URL: push mode subscribes there; when set, this node publishes its inventory in any mode")
	fs.StringVar(&c.KB, "kb", c.KB, "ClusterKB URLs, URL[,URL] (fail-over): register with them; kb mode locates through them")
	fs.BoolVar(&c.NeighborsKB, "neighbors-from-kb", c.NeighborsKB, "take the neighbour list from ClusterKB's members (every other node) instead of --neighbors")
	fs.Float64Var(&c.DropEvents, "debug-drop-events", c.DropEvents, "testing only: drop this fraction of published inventory change events")
	fs.Int64Var(&c.UploadLimit, "upload-limit", c.UploadLimit, "cap on the peer server's upload, bytes per second (0: none)")
	fs.IntVar(&c.MaxUploads, "max-uploads", c.MaxUploads, "blob uploads the peer server runs at once; more get 429 with Retry-After (0: no bound)")
	fs.StringVar(&c.Policy, "policy", c.Policy, "which peers a blob comes from: stripe (all useful ones at once), first, random, least-loaded or fastest")
	fs.StringVar(&c.DownloadBuf, "download-buffer", c.DownloadBuf, "memory for one blob's chunks fetched ahead of the local write (e.g. 64MiB)")
	fs.StringVar(&c.PeerTimeout, "peer-timeout", c.PeerTimeout, "how long the online index waits for a neighbour's answer")
	fs.StringVar(&c.StallTimeout, "stall-timeout", c.StallTimeout, "a peer that sends nothing for this long is cut off mid-blob")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "trace, debug, info, warn or error")
	fs.StringVar(&c.Containerd, "containerd-address", c.Containerd, "containerd's socket: observer mode watches it; claims need it; container records for migration destinations (coop migrate) come from it (empty: none)")
	fs.StringVar(&c.ContentMode, "content-mode", c.ContentMode, "observer (default): leave containerd's built-in store alone, learn its blobs from its events (needs --containerd-address); proxy: be containerd's content store (content + diff proxy plugins; needed by --claim)")
	fs.BoolVar(&c.Claim, "claim", c.Claim, "proxy mode: answer containerd's Info for a missing blob that known peers hold as found, fetch it from them at once and unpack it as it streams in (needs --containerd-address)")
	fs.IntVar(&c.ClaimParallel, "claim-parallel", c.ClaimParallel, "claimed blobs downloaded at once, each from all its peers; the one being unpacked goes first, a blob in its last 8 MiB frees its slot (P2 measured best at 3)")
	fs.BoolVar(&c.AllowStop, "allow-remote-stop", c.AllowStop, "let a migration destination stop a container here (coop migrate --stop-source)")
	fs.StringVar(&c.DebugListen, "debug-listen", c.DebugListen, "serve Go's /debug/pprof here (loopback only; empty: off)")
}

// parseNodeFlags applies defaults, then the config file, then the flags set
// on the command line.
func parseNodeFlags(args []string, stderr io.Writer) (nodeConfig, error) {
	cfg := defaultNodeConfig()
	fs := flag.NewFlagSet("node", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "TOML file with the same keys as the flags (name, root, content_socket, ...); flags win")
	cfg.flags(fs)
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	if *configPath != "" {
		b, err := os.ReadFile(*configPath)
		if err != nil {
			return cfg, fmt.Errorf("--config: %w", err)
		}
		fileCfg := defaultNodeConfig()
		dec := toml.NewDecoder(strings.NewReader(string(b)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&fileCfg); err != nil {
			return cfg, fmt.Errorf("--config %s: %w", *configPath, err)
		}
		// Flags given on the command line win over the file.
		given := map[string]string{}
		fs.Visit(func(f *flag.Flag) {
			if f.Name != "config" {
				given[f.Name] = f.Value.String()
			}
		})
		cfg = fileCfg
		onFile := flag.NewFlagSet("node", flag.ContinueOnError)
		cfg.flags(onFile)
		for name, v := range given {
			if err := onFile.Set(name, v); err != nil {
				return cfg, err
			}
		}
	}
	if cfg.Advertise == "" {
		_, port, err := net.SplitHostPort(cfg.PeerListen)
		if err != nil {
			return cfg, fmt.Errorf("--peer-listen %q: %w", cfg.PeerListen, err)
		}
		host, _ := os.Hostname()
		cfg.Advertise = "http://" + net.JoinHostPort(host, port)
	}
	return cfg, nil
}

func runNode(ctx context.Context, args []string, _, stderr io.Writer) error {
	cfg, err := parseNodeFlags(args, stderr)
	if err != nil {
		return err
	}
	if err := setLogLevel(cfg.LogLevel); err != nil {
		return err
	}
	if cfg.Name == "" {
		return errors.New("--name is required (no hostname)")
	}
	peerTimeout, err := time.ParseDuration(cfg.PeerTimeout)
	if err != nil || peerTimeout <= 0 {
		return fmt.Errorf("--peer-timeout %q: want a positive duration", cfg.PeerTimeout)
	}
	stallTimeout, err := time.ParseDuration(cfg.StallTimeout)
	if err != nil || stallTimeout <= 0 {
		return fmt.Errorf("--stall-timeout %q: want a positive duration", cfg.StallTimeout)
	}
	if _, err := plugin.MirrorURL(cfg.MirrorListen); err != nil {
		return fmt.Errorf("--mirror-listen: %w", err)
	}
	if cfg.DebugListen != "" {
		if _, err := plugin.MirrorURL(cfg.DebugListen); err != nil {
			return fmt.Errorf("--debug-listen: %w", err)
		}
	}
	if !slices.Contains(peers.Policies, cfg.Policy) {
		return fmt.Errorf("--policy %q: want one of %v", cfg.Policy, peers.Policies)
	}
	if cfg.MaxUploads < 0 {
		return fmt.Errorf("--max-uploads %d: want 0 or more", cfg.MaxUploads)
	}
	downloadBuf, err := parseBytes(cfg.DownloadBuf)
	if err != nil || downloadBuf < 1<<20 {
		return fmt.Errorf("--download-buffer %q: want a size of at least 1MiB (e.g. 64MiB)", cfg.DownloadBuf)
	}
	if cfg.UploadLimit < 0 {
		return fmt.Errorf("--upload-limit %d: want 0 or more bytes per second", cfg.UploadLimit)
	}
	neighbors, err := resolver.ParseNeighbors(cfg.Neighbors)
	if err != nil {
		return fmt.Errorf("--neighbors: %w", err)
	}
	setup, err := checkIndexSetup(cfg, neighbors, peerTimeout)
	if err != nil {
		return err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("node", cfg.Name))

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	inv := content.NewInventory()
	var (
		store    *content.Store
		observer *plugin.Observer
		served   peers.BlobStore
	)
	switch cfg.ContentMode {
	case contentModeProxy:
		if store, err = content.NewStore(ctx, cfg.Root, inv); err != nil {
			return err
		}
		served = store
	case contentModeObserver:
		if cfg.Containerd == "" {
			return fmt.Errorf("--content-mode observer needs --containerd-address: %w", errUsage)
		}
		// coop's own store only holds what the mirror lands for
		// containerd; the inventory is containerd's, from its events.
		if store, err = content.NewStore(ctx, cfg.Root, discard{}); err != nil {
			return err
		}
		if observer, err = plugin.NewObserver(cfg.Containerd, inv); err != nil {
			return fmt.Errorf("--containerd-address: %w", err)
		}
		defer observer.Close()
		served = plugin.NewUnionStore(store, observer)
	default:
		return fmt.Errorf("--content-mode %q: want proxy or observer: %w", cfg.ContentMode, errUsage)
	}
	invGauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "coop_inventory_blobs", Help: "Blobs in this node's inventory.",
	}, func() float64 { return float64(inv.Len()) })
	reg.MustRegister(invGauge)

	if cfg.Claim && cfg.ContentMode != contentModeProxy {
		return fmt.Errorf("--claim needs --content-mode proxy: %w", errUsage)
	}
	if cfg.ClaimParallel < 1 {
		return fmt.Errorf("--claim-parallel %d: want 1 or more: %w", cfg.ClaimParallel, errUsage)
	}
	if cfg.Claim && cfg.Containerd == "" {
		return fmt.Errorf("--claim needs --containerd-address (a failed claim must be removed from containerd's records): %w", errUsage)
	}
	var containers peers.ContainerRecords
	var records content.RecordCleaner
	if cfg.Containerd != "" {
		cs, err := plugin.NewContainers(cfg.Containerd)
		if err != nil {
			return fmt.Errorf("--containerd-address: %w", err)
		}
		defer cs.Close()
		containers, records = cs, cs
	} else if cfg.AllowStop {
		return fmt.Errorf("--allow-remote-stop needs --containerd-address: %w", errUsage)
	}
	peerSrv, err := peers.NewServer(peers.ServerOptions{
		Containers: containers, AllowStop: cfg.AllowStop,
		Node: cfg.Name, Store: served, Inventory: inv, Registerer: reg, Gatherer: reg, MaxUploads: cfg.MaxUploads,
	})
	if err != nil {
		return err
	}
	client := &peers.Client{Node: cfg.Name, HTTP: &http.Client{Transport: &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ResponseHeaderTimeout: 5 * time.Second,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
	}}}
	// Everything below stops when ctx ends or any server fails.
	g, gctx := errgroup.WithContext(ctx)
	index, err := buildIndex(gctx, setup, inv, client, peerSrv.Load, reg)
	if err != nil {
		return err
	}
	defer index.close()
	res := index.resolver
	if cfg.Claim && !index.local {
		// Claims are decided without a round trip: in online and kb
		// modes, from what a recent locate found.
		res = resolver.Remember(res, claimRecent)
	}
	mirror, err := plugin.NewMirror(gctx, plugin.MirrorOptions{Resolver: res, Peers: client, Store: store, StallTimeout: stallTimeout, Registerer: reg,
		Policy: cfg.Policy, DownloadBuffer: downloadBuf, Sources: resolver.NewSources()})
	if err != nil {
		return err
	}

	var sock net.Listener
	var grpcSrv *grpc.Server
	if observer == nil {
		if sock, err = content.ListenUnix(ctx, cfg.ContentSocket); err != nil {
			return err
		}
		defer os.Remove(cfg.ContentSocket)
		var cstore ctdcontent.Store = store
		if cfg.Claim {
			if cstore, err = content.NewClaimStore(gctx, store, content.ClaimOptions{Source: mirror, Cleaner: records, Registerer: reg, Active: cfg.ClaimParallel}); err != nil {
				sock.Close()
				return err
			}
		}
		grpcSrv = content.NewGRPCServer(cstore)
	}
	closeSock := func() {
		if sock != nil {
			sock.Close()
		}
	}
	peerL, err := net.Listen("tcp", cfg.PeerListen)
	if err != nil {
		closeSock()
		return fmt.Errorf("--peer-listen: %w", err)
	}
	mirrorL, err := net.Listen("tcp", cfg.MirrorListen)
	if err != nil {
		closeSock()
		peerL.Close()
		return fmt.Errorf("--mirror-listen: %w", err)
	}

	peerHTTP := &http.Server{Handler: peers.LimitUpload(peerSrv, cfg.UploadLimit), ReadHeaderTimeout: 10 * time.Second}
	mirrorHTTP := &http.Server{Handler: mirror, ReadHeaderTimeout: 10 * time.Second}

	if cfg.DebugListen != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		debugHTTP := &http.Server{Addr: cfg.DebugListen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		g.Go(func() error { return ignoreClosed(debugHTTP.ListenAndServe()) })
		g.Go(func() error { <-gctx.Done(); return debugHTTP.Close() })
	}
	for _, run := range index.runners {
		g.Go(func() error { run(gctx); return nil })
	}
	if grpcSrv != nil {
		g.Go(func() error { return grpcSrv.Serve(sock) })
	}
	if observer != nil {
		g.Go(func() error { return observer.Run(gctx) })
	}
	g.Go(func() error { return ignoreClosed(peerHTTP.Serve(peerL)) })
	g.Go(func() error { return ignoreClosed(mirrorHTTP.Serve(mirrorL)) })
	g.Go(func() error {
		<-gctx.Done()
		shutdown(context.WithoutCancel(ctx), grpcSrv, peerHTTP, mirrorHTTP)
		return nil
	})
	log.G(ctx).WithFields(log.Fields{
		"root": cfg.Root, "socket": cfg.ContentSocket, "content_mode": cfg.ContentMode, "peer": peerL.Addr().String(),
		"advertise": cfg.Advertise, "mirror": mirrorL.Addr().String(), "index": cfg.Index, "claim": cfg.Claim,
		"neighbors": len(neighbors), "blobs": inv.Len(), "epoch": inv.Epoch(),
	}).Info("coop node ready")
	err = g.Wait()
	if errors.Is(err, context.Canceled) || (err == nil && ctx.Err() != nil) {
		log.G(ctx).Info("coop node stopped")
		return nil
	}
	return err
}

// parseBytes parses a size such as 64MiB, 512KiB, 1GiB or a plain number
// of bytes.
func parseBytes(s string) (int64, error) {
	s = strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}} {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(v), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: want a number with an optional KiB, MiB or GiB", s)
	}
	return n * mult, nil
}

// Content modes (--content-mode).
const (
	contentModeProxy    = "proxy"
	contentModeObserver = "observer"
)

// discard is a recorder that records nothing.
type discard struct{}

func (discard) Add(digest.Digest, int64) {}
func (discard) Remove(digest.Digest)     {}

// shutdownGrace is how long each server may drain its requests at stop.
const shutdownGrace = 5 * time.Second

// shutdown stops the servers in parallel, each with its own grace period,
// after which its remaining connections are closed.
func shutdown(ctx context.Context, grpcSrv *grpc.Server, https ...*http.Server) {
	var wg sync.WaitGroup
	for _, s := range https {
		wg.Go(func() {
			sctx, cancel := context.WithTimeout(ctx, shutdownGrace)
			defer cancel()
			if err := s.Shutdown(sctx); err != nil {
				log.G(ctx).WithError(err).Warn("server did not drain in time; closing its connections")
				_ = s.Close()
			}
		})
	}
	if grpcSrv == nil {
		wg.Wait()
		return
	}
	wg.Go(func() {
		stopped := make(chan struct{})
		go func() { grpcSrv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(shutdownGrace):
			log.G(ctx).Warn("content service did not drain in time; closing its streams")
			grpcSrv.Stop()
		}
	})
	wg.Wait()
}

func ignoreClosed(err error) error {
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}
