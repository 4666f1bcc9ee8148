package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/plugin/node"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/coopnet/coop/resolver/modes"
	"github.com/pelletier/go-toml/v2"
)

const (
	defaultContentSocket = "/run/coop/content.sock"
	// defaultContainerdAddress is containerd's own default socket.
	defaultContainerdAddress = "/run/containerd/containerd.sock"
	defaultMirrorListen      = "127.0.0.1:5051"
	// defaultHostsDir is where containerd's CRI reads hosts.toml when
	// coop containerd-config sets it up.
	defaultHostsDir = "/etc/containerd/certs.d"
	defaultPeerPort = "5050"
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
	MaxBlobSize   string  `toml:"max_blob_size"`
	MaxUnverified string  `toml:"max_unverified"`
	PeerTimeout   string  `toml:"peer_timeout"`
	StallTimeout  string  `toml:"stall_timeout"`
	LogLevel      string  `toml:"log_level"`
	DebugListen   string  `toml:"debug_listen"`
	Containerd    string  `toml:"containerd_address"`
	ContentMode   string  `toml:"content_mode"`
	AllowStop     bool    `toml:"allow_remote_stop"`
	ServeCtrs     string  `toml:"serve_containers"`
	ShareNSs      string  `toml:"share_namespaces"`
	Claim         bool    `toml:"claim"`
	ClaimParallel int     `toml:"claim_parallel"`
	ClaimRegistry bool    `toml:"claim_registry"`
	HostsDir      string  `toml:"hosts_dir"`
	RegistryCreds string  `toml:"registry_credentials"`
	Swarm         bool    `toml:"swarm"`
	TLSDir        string  `toml:"tls_dir"`
	Insecure      bool    `toml:"insecure"`
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
		Claim:         true,
		ClaimParallel: 3,
		ClaimRegistry: true,
		HostsDir:      defaultHostsDir,
		Swarm:         true,
		Policy:        peers.PolicyStripe,
		ContentMode:   node.ContentProxy,
		Containerd:    defaultContainerdAddress,
		DownloadBuf:   "64MiB",
		MaxBlobSize:   "64GiB",
		MaxUnverified: "64GiB",
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
	fs.StringVar(&c.MaxBlobSize, "max-blob-size", c.MaxBlobSize, "largest blob fetched from peers when no manifest committed here gives its size (a larger size only a broken or hostile peer reports)")
	fs.StringVar(&c.MaxUnverified, "max-unverified", c.MaxUnverified, "disk for blobs fetched from peers and not verified yet, all together (also bounded by the free space of --root); beyond it the registry serves")
	fs.StringVar(&c.PeerTimeout, "peer-timeout", c.PeerTimeout, "how long the online index waits for a neighbour's answer")
	fs.StringVar(&c.StallTimeout, "stall-timeout", c.StallTimeout, "a peer that sends nothing for this long is cut off mid-blob")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "trace, debug, info, warn or error")
	fs.StringVar(&c.Containerd, "containerd-address", c.Containerd, "containerd's socket: observer mode watches it; claims need it; container records for migration destinations (coop migrate) come from it (empty: none)")
	fs.StringVar(&c.ContentMode, "content-mode", c.ContentMode, "proxy: be containerd's content store (content + diff proxy plugins; needed by --claim; containerd set up by coop containerd-config or coop install); observer: leave containerd's built-in store alone, learn its blobs from its events (needs --containerd-address; no claims)")
	fs.BoolVar(&c.Claim, "claim", c.Claim, "proxy mode: answer containerd's Info for a missing blob that known peers (or, with --claim-registry, its registry) can serve as found, fetch it at once and unpack it as it streams in (needs --containerd-address); off by default in observer mode and without --containerd-address")
	fs.IntVar(&c.ClaimParallel, "claim-parallel", c.ClaimParallel, "claimed blobs downloaded at once, each from all its peers; the one being unpacked goes first, a blob in its last 8 MiB frees its slot (P2 measured best at 3)")
	fs.BoolVar(&c.ClaimRegistry, "claim-registry", c.ClaimRegistry, "claims fall back to the pull's registry (learned from the mirror's manifest requests, endpoints from --hosts-dir), and blobs no peer holds are claimed from it, so a claim never fails its pull; a registry coop cannot pull from gets claims only with two peers (--claim-registry=false: a claim whose peers fail fails its pull once)")
	fs.StringVar(&c.HostsDir, "hosts-dir", c.HostsDir, "containerd's registry config_path (hosts.toml tree): where coop finds the registries' endpoints and TLS settings, its own mirror left out")
	fs.StringVar(&c.RegistryCreds, "registry-credentials", c.RegistryCreds, "registry credentials for claims, a Docker config.json ({\"auths\": {\"HOST\": {\"auth\": base64(user:password)}}}, mode 0600); empty: anonymous token flow only")
	fs.BoolVar(&c.Swarm, "swarm", c.Swarm, "share the blobs being downloaded: serve their chunks to peers as they arrive, take chunks from peers still downloading them (stripe policy; --swarm=false: only whole blobs)")
	fs.StringVar(&c.ServeCtrs, "serve-containers", c.ServeCtrs, "NS[,NS...]: containerd namespaces whose container records (image and OCI spec, environment included) cluster nodes may read for coop migrate; others are refused (empty: records off)")
	fs.BoolVar(&c.AllowStop, "allow-remote-stop", c.AllowStop, "let a migration destination stop a container of --serve-containers here (coop migrate --stop-source)")
	fs.StringVar(&c.ShareNSs, "share-namespaces", c.ShareNSs, "NS[,NS...]: serve and advertise only the blobs containerd holds in these namespaces (observer mode; empty: every blob)")
	fs.StringVar(&c.DebugListen, "debug-listen", c.DebugListen, "serve Go's /debug/pprof here (loopback only; empty: off)")
	fs.StringVar(&c.TLSDir, "tls-dir", c.TLSDir, "this node's credentials (ca.crt, tls.crt, tls.key from coop ca issue): mutual TLS with every coop process; re-read when rotated")
	fs.BoolVar(&c.Insecure, "insecure", c.Insecure, "without --tls-dir, serve plain HTTP on a non-loopback --peer-listen (anyone who reaches it can read every blob)")
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
	// Claims are on by default, in proxy mode with containerd's socket:
	// observer mode, or no --containerd-address, turns the default off,
	// and refuses only a claim asked for.
	claimSet := false
	fs.Visit(func(f *flag.Flag) { claimSet = claimSet || f.Name == "claim" })
	if *configPath != "" {
		b, err := os.ReadFile(*configPath)
		if err != nil {
			return cfg, fmt.Errorf("--config: %w", err)
		}
		fileCfg := defaultNodeConfig()
		var keys map[string]any
		if err := toml.Unmarshal(b, &keys); err == nil {
			_, inFile := keys["claim"]
			claimSet = claimSet || inFile
		}
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
	if !claimSet && (cfg.ContentMode == node.ContentObserver || cfg.Containerd == "") {
		cfg.Claim = false
	}
	if cfg.Advertise == "" {
		_, port, err := net.SplitHostPort(cfg.PeerListen)
		if err != nil {
			return cfg, fmt.Errorf("--peer-listen %q: %w", cfg.PeerListen, err)
		}
		host, _ := os.Hostname()
		scheme := "http://"
		if cfg.TLSDir != "" {
			scheme = "https://"
		}
		cfg.Advertise = scheme + net.JoinHostPort(host, port)
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
	o, err := cfg.options()
	if err != nil {
		return err
	}
	// The last warnings and errors, for coop status.
	o.Errors = node.NewErrorLog(0)
	log.L.Logger.AddHook(o.Errors)
	n, err := node.New(ctx, o)
	if err != nil {
		return err
	}
	defer n.Close()
	return n.Run(ctx)
}

// options turns the flags' strings into the node's options; node.New checks
// the rest.
func (c nodeConfig) options() (node.Options, error) {
	o := node.Options{
		Name: c.Name, Root: c.Root, ContentMode: c.ContentMode, ContentSocket: c.ContentSocket,
		Containerd: c.Containerd, PeerListen: c.PeerListen, Advertise: c.Advertise,
		MirrorListen: c.MirrorListen, DebugListen: c.DebugListen,
		UploadLimit: c.UploadLimit, MaxUploads: c.MaxUploads, Policy: c.Policy,
		Claim: c.Claim, ClaimParallel: c.ClaimParallel, AllowRemoteStop: c.AllowStop, Swarm: c.Swarm,
		ClaimRegistry: c.ClaimRegistry, HostsDir: c.HostsDir, RegistryCredentials: c.RegistryCreds,
		Insecure: c.Insecure,
		Index: modes.Options{
			Mode: c.Index, NeighborsFromKB: c.NeighborsKB, NATSURL: c.NATSURL,
			KBURLs: clusterkb.ParseURLs(c.KB), DropEvents: c.DropEvents,
		},
	}
	var err error
	if o.Index.PeerTimeout, err = time.ParseDuration(c.PeerTimeout); err != nil || o.Index.PeerTimeout <= 0 {
		return o, fmt.Errorf("--peer-timeout %q: want a positive duration: %w", c.PeerTimeout, errUsage)
	}
	if o.Index.Period, err = time.ParseDuration(c.Period); err != nil || o.Index.Period <= 0 {
		return o, fmt.Errorf("--period %q: want a positive duration: %w", c.Period, errUsage)
	}
	if o.StallTimeout, err = time.ParseDuration(c.StallTimeout); err != nil || o.StallTimeout <= 0 {
		return o, fmt.Errorf("--stall-timeout %q: want a positive duration: %w", c.StallTimeout, errUsage)
	}
	if o.DownloadBuffer, err = parseBytes(c.DownloadBuf); err != nil {
		return o, fmt.Errorf("--download-buffer %q: want a size such as 64MiB: %w", c.DownloadBuf, errUsage)
	}
	if o.MaxBlobSize, err = parseBytes(c.MaxBlobSize); err != nil || o.MaxBlobSize <= 0 {
		return o, fmt.Errorf("--max-blob-size %q: want a size such as 64GiB: %w", c.MaxBlobSize, errUsage)
	}
	if o.MaxUnverified, err = parseBytes(c.MaxUnverified); err != nil || o.MaxUnverified <= 0 {
		return o, fmt.Errorf("--max-unverified %q: want a size such as 64GiB: %w", c.MaxUnverified, errUsage)
	}
	if o.Index.Neighbors, err = resolver.ParseNeighbors(c.Neighbors); err != nil {
		return o, fmt.Errorf("--neighbors: %w", err)
	}
	if o.ServeContainers, err = parseNamespaces(c.ServeCtrs); err != nil {
		return o, fmt.Errorf("--serve-containers: %w", err)
	}
	if o.ShareNamespaces, err = parseNamespaces(c.ShareNSs); err != nil {
		return o, fmt.Errorf("--share-namespaces: %w", err)
	}
	if c.TLSDir != "" {
		if o.TLS, err = trust.Load(c.TLSDir); err != nil {
			return o, fmt.Errorf("--tls-dir: %w", err)
		}
	}
	return o, nil
}

// parseNamespaces parses a NS[,NS...] list; empty gives none. node.Options
// checks the names.
func parseNamespaces(s string) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var nss []string
	for _, ns := range strings.Split(s, ",") {
		ns = strings.TrimSpace(ns)
		if ns == "" {
			return nil, fmt.Errorf("%q: an empty namespace: %w", s, errUsage)
		}
		if !slices.Contains(nss, ns) {
			nss = append(nss, ns)
		}
	}
	return nss, nil
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
