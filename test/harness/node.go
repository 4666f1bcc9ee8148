package harness

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	digest "github.com/opencontainers/go-digest"
)

// RunRoot holds each node's short paths (sockets, containerd state, runc
// root): unix socket paths are limited to 108 bytes and containerd's shim
// socket_dir to 38.
const RunRoot = "/run/coop-t"

// Upstream is a registry a node pulls from.
type Upstream struct {
	// Host is the registry's host:port as it appears in image references.
	Host string
	// URL is where the registry really is, such as http://127.0.0.1:5000.
	URL string
}

// UpstreamOf returns the Upstream for a harness registry.
func UpstreamOf(r *Registry) Upstream {
	return Upstream{Host: r.Host(), URL: r.URL()}
}

// Neighbor is a peer endpoint a coop node may fetch from.
type Neighbor struct {
	Name string
	URL  string
}

// NodeOptions configure StartNode.
type NodeOptions struct {
	// Name is the node's name (coop --name); required.
	Name string
	// Plain starts containerd with its built-in content store and no coop
	// node: the baseline. Pulls go straight to the registries.
	Plain bool
	// Registries are mirrored through coop (hosts.toml with the mirror first,
	// the registry next), or, for a plain node, reached directly over HTTP.
	Registries []Upstream
	// Neighbors are the peer endpoints coop may fetch from.
	Neighbors []Neighbor
	// Index is coop's --index (default "online").
	Index string
	// UploadLimit caps coop's peer server upload rate, in bytes per second
	// (0: unlimited).
	UploadLimit int64
	// CoopLogLevel is coop's --log-level (default "debug").
	CoopLogLevel string
	// ContainerdLogLevel defaults to "info".
	ContainerdLogLevel string
	// Snapshotter is containerd's snapshotter for pulls (default overlayfs).
	Snapshotter string
	// ExtraCoopArgs are appended to the coop node command line.
	ExtraCoopArgs []string
	// NetNS, when set, is a network namespace path (/run/netns/NAME): coop
	// and containerd run in it (nsenter --net), coop's peer server listens
	// on ListenIP there, and its mirror on that namespace's loopback. The
	// caller must be able to reach ListenIP.
	NetNS    string
	ListenIP string
	// PeerPort, with ListenIP, is the peer server's port (default a free
	// one): nodes in namespaces of their own can then be neighbours of
	// each other before they start.
	PeerPort int
	// Observer keeps containerd's built-in content store and runs coop
	// beside it in observer mode (--content-mode observer): coop learns
	// containerd's blobs from its events; the mirror works as usual.
	Observer bool
	// Migrations makes coop serve the records of its containers in the
	// default and k8s.io namespaces to cluster nodes (--serve-containers)
	// and let destinations stop them (--allow-remote-stop).
	Migrations bool
	// Claim runs coop with --claim (and --containerd-address): blobs the
	// index knows peers hold are claimed at containerd's Info and unpacked
	// as they stream in.
	Claim bool
	// Default runs coop node and coop containerd-config with their
	// defaults: no --content-mode, no --claim (Observer and Claim must be
	// false). It is what an operator who follows the README gets.
	Default bool
	// BaseDir holds the node's data directory (default os.TempDir()).
	BaseDir string
	// KeepDirs leaves the node's directories in place after Stop (for
	// debugging); mounts are still removed.
	KeepDirs bool
	// Logf, if set, receives the harness's progress lines.
	Logf func(format string, args ...any)
	// PKI, when set, gives the node a certificate of its name: coop serves
	// and speaks mutual TLS (--tls-dir) and the harness talks to it with
	// its own certificate. Nil: plain HTTP (--insecure).
	PKI *PKI
}

// Node is one simulated node: a coop node and the containerd that uses it as
// its content store and mirror (or, with Plain, a containerd alone).
type Node struct {
	// Name is the node's name.
	Name string
	// Dir is the node's data directory: configs, logs, containerd root,
	// coop's content store, hosts.toml tree.
	Dir string
	// RunDir holds the node's sockets, containerd state and runc root.
	RunDir string
	// Address is containerd's gRPC socket.
	Address string
	// ContentSocket is coop's content and diff socket (empty for Plain).
	ContentSocket string
	// PeerAddr and MirrorAddr are coop's listen addresses (host:port).
	PeerAddr, MirrorAddr string
	// HostsDir is the hosts.toml tree (containerd's registry config_path).
	HostsDir string
	// RuncRoot is the per-node runc root (ctr run --runc-root; CRI's Root).
	RuncRoot string

	opts  NodeOptions
	tools *Tools
	// http talks to the node's coop: with the harness's certificate when
	// the node has a PKI.
	http *http.Client
	logf func(format string, args ...any)

	mu         sync.Mutex
	coop       *process
	containerd *process
	stopOnce   sync.Once
	stopErr    error
}

// StartNode starts a coop node (unless opts.Plain) and then its containerd,
// and waits until both are ready. On error everything started is stopped and
// the error carries the tail of the logs.
func StartNode(ctx context.Context, tools *Tools, opts NodeOptions) (*Node, error) {
	if opts.Name == "" {
		return nil, errors.New("node: no name")
	}
	if !opts.Plain && tools.Coop == "" {
		return nil, errors.New("node: bin/coop is needed (FindTools(true)): run make build")
	}
	if tools.Runc == "" {
		return nil, errors.New("node: runc is not on PATH: apt-get install -y runc")
	}
	if opts.Index == "" {
		opts.Index = "online"
	}
	if opts.CoopLogLevel == "" {
		opts.CoopLogLevel = "debug"
	}
	if opts.ContainerdLogLevel == "" {
		opts.ContainerdLogLevel = "info"
	}
	if opts.Snapshotter == "" {
		opts.Snapshotter = "overlayfs"
	}
	if opts.BaseDir == "" {
		opts.BaseDir = os.TempDir()
	}
	opts.Registries = slices.Clone(opts.Registries)
	opts.Neighbors = slices.Clone(opts.Neighbors)
	opts.ExtraCoopArgs = slices.Clone(opts.ExtraCoopArgs)
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}

	sweepStale(logf)

	var idb [4]byte
	_, _ = crand.Read(idb[:])
	id := hex.EncodeToString(idb[:])
	n := &Node{
		Name:   opts.Name,
		RunDir: filepath.Join(RunRoot, id),
		opts:   opts,
		tools:  tools,
		logf:   func(f string, a ...any) { logf("node %s: "+f, append([]any{opts.Name}, a...)...) },
		http:   opts.PKI.HTTPClient(),
	}
	if err := os.MkdirAll(opts.BaseDir, 0o755); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(opts.BaseDir, "coop-node-"+sanitize(opts.Name)+"-")
	if err != nil {
		return nil, err
	}
	n.Dir = dir
	if err := os.MkdirAll(n.RunDir, 0o700); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	owner := fmt.Sprintf("pid=%d\ndir=%s\n", os.Getpid(), dir)
	if err := os.WriteFile(filepath.Join(n.RunDir, "owner"), []byte(owner), 0o644); err != nil {
		_ = n.Stop()
		return nil, err
	}
	n.Address = filepath.Join(n.RunDir, "c.sock")
	n.HostsDir = filepath.Join(dir, "hosts")
	n.RuncRoot = filepath.Join(n.RunDir, "runc")
	for _, d := range []string{n.HostsDir, n.RuncRoot, filepath.Join(dir, "tmp")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			_ = n.Stop()
			return nil, err
		}
	}
	if opts.PKI != nil && !opts.Plain {
		if err := opts.PKI.Issue(opts.Name, n.TLSDir()); err != nil {
			_ = n.Stop()
			return nil, fmt.Errorf("node %s: certificate: %w", opts.Name, err)
		}
	}
	if err := n.start(ctx); err != nil {
		logs := n.LogTail(40)
		_ = n.Stop()
		return nil, fmt.Errorf("node %s: %w\n%s", opts.Name, err, logs)
	}
	return n, nil
}

func (n *Node) start(ctx context.Context) error {
	if !n.opts.Plain {
		ports, err := freePorts(2)
		if err != nil {
			return err
		}
		n.PeerAddr = ports[0]
		n.MirrorAddr = ports[1]
		if n.opts.ListenIP != "" {
			_, port, _ := net.SplitHostPort(ports[0])
			if n.opts.PeerPort > 0 {
				port = strconv.Itoa(n.opts.PeerPort)
			}
			n.PeerAddr = net.JoinHostPort(n.opts.ListenIP, port)
		}
		n.ContentSocket = filepath.Join(n.RunDir, "coop.sock")
		if err := n.StartCoop(ctx); err != nil {
			return err
		}
	}
	if err := n.writeContainerdConfig(ctx); err != nil {
		return err
	}
	return n.startContainerd(ctx)
}

// PeerURL is the coop node's peer endpoint, https://IP:PORT (http://
// without a PKI): what neighbours use.
func (n *Node) PeerURL() string {
	if n.PeerAddr == "" {
		return ""
	}
	return n.opts.PKI.Scheme() + n.PeerAddr
}

// MirrorURL is the coop node's loopback mirror.
func (n *Node) MirrorURL() string {
	if n.MirrorAddr == "" {
		return ""
	}
	return "http://" + n.MirrorAddr
}

// AsNeighbor returns the node as a Neighbor for another node's options.
func (n *Node) AsNeighbor() Neighbor {
	return Neighbor{Name: n.Name, URL: n.PeerURL()}
}

// Migrate runs `coop migrate` at this node, from the node whose peer URL is
// from, with this node's containerd, mirror, hosts.toml tree, runc root and
// a cgroups path of its own; extra flags come before the container id.
func (n *Node) Migrate(ctx context.Context, from, id string, extra ...string) (string, error) {
	args := []string{"migrate", "--from", from, "--containerd-address", n.Address,
		"--mirror", n.MirrorURL(), "--mirror-token-file", n.MirrorTokenFile(), "--hosts-dir", n.HostsDir,
		"--runc-root", n.RuncRoot, "--cgroups-path", "/" + n.Name + "-" + id}
	if n.opts.PKI != nil {
		// The node's own certificate: the source serves its records only
		// to cluster members.
		args = append(args, "--tls-dir", n.TLSDir())
	}
	args = append(append(args, extra...), id)
	bin, full := n.inNetNS(n.tools.Coop, args)
	return runCommand(ctx, clientEnv(), nil, bin, full...)
}

// TLSDir is the node's --tls-dir (with a PKI).
func (n *Node) TLSDir() string { return filepath.Join(n.Dir, "tls") }

// HTTP is the client the harness talks to the node's coop with.
func (n *Node) HTTP() *http.Client { return n.http }

// CoopLog is the path of the coop node's log file (stdout and stderr of
// every start, each after a "===" line with its command line).
func (n *Node) CoopLog() string { return filepath.Join(n.Dir, "coop.log") }

// ContainerdLog is the path of containerd's log file.
func (n *Node) ContainerdLog() string { return filepath.Join(n.Dir, "containerd.log") }

// LogTail returns the last lines lines of each of the node's logs.
func (n *Node) LogTail(lines int) string {
	var b strings.Builder
	if !n.opts.Plain {
		fmt.Fprintf(&b, "--- %s: %s (last %d lines)\n%s\n", n.Name, n.CoopLog(), lines, tailFile(n.CoopLog(), lines))
	}
	fmt.Fprintf(&b, "--- %s: %s (last %d lines)\n%s\n", n.Name, n.ContainerdLog(), lines, tailFile(n.ContainerdLog(), lines))
	return b.String()
}

func (n *Node) coopArgs() []string {
	args := []string{"node",
		"--name", n.Name,
		"--root", filepath.Join(n.Dir, "coop"),
		"--content-socket", n.ContentSocket,
		"--peer-listen", n.PeerAddr,
		"--advertise", n.PeerURL(),
		"--mirror-listen", n.MirrorAddr,
		"--index", n.opts.Index,
		"--log-level", n.opts.CoopLogLevel,
	}
	if n.opts.PKI != nil {
		args = append(args, "--tls-dir", n.TLSDir())
	} else {
		args = append(args, "--insecure")
	}
	if len(n.opts.Neighbors) > 0 {
		var ns []string
		for _, nb := range n.opts.Neighbors {
			ns = append(ns, nb.Name+"="+nb.URL)
		}
		args = append(args, "--neighbors", strings.Join(ns, ","))
	}
	if n.opts.UploadLimit > 0 {
		args = append(args, "--upload-limit", strconv.FormatInt(n.opts.UploadLimit, 10))
	}
	// Always this node's own containerd, never the host's default.
	args = append(args, "--containerd-address", n.Address)
	if n.opts.Migrations {
		args = append(args, "--serve-containers", "default,k8s.io", "--allow-remote-stop")
	}
	switch {
	case n.opts.Default:
	case n.opts.Observer:
		args = append(args, "--content-mode", "observer", "--claim=false")
	case n.opts.Claim:
		args = append(args, "--content-mode", "proxy", "--claim")
	default:
		args = append(args, "--content-mode", "proxy", "--claim=false")
	}
	args = append(args, "--hosts-dir", n.HostsDir)
	return append(args, n.opts.ExtraCoopArgs...)
}

// StartCoop starts the coop node (after KillCoop or StopCoop) with the same
// flags and waits until it is ready: its socket exists and both /healthz
// answer 200.
func (n *Node) StartCoop(ctx context.Context) error {
	if n.opts.Plain {
		return errors.New("plain node: no coop")
	}
	n.mu.Lock()
	if n.coop != nil {
		if ok, _ := n.coop.exited(); !ok {
			n.mu.Unlock()
			return errors.New("coop is already running")
		}
	}
	// A killed coop leaves its socket behind; it must not pass for ready.
	_ = os.Remove(n.ContentSocket)
	bin, args := n.inNetNS(n.tools.Coop, n.coopArgs())
	p, err := startProcess("coop", n.CoopLog(), os.Environ(), bin, args...)
	if err != nil {
		n.mu.Unlock()
		return err
	}
	n.coop = p
	n.mu.Unlock()
	start := time.Now()
	err = waitReady(ctx, 30*time.Second, p, func(ctx context.Context) error {
		if _, err := os.Stat(n.ContentSocket); err != nil && !n.opts.Observer {
			return err
		}
		if err := httpOK(ctx, n.http, n.PeerURL()+"/healthz"); err != nil {
			return err
		}
		if n.opts.NetNS != "" {
			return nil // the mirror is on the namespace's own loopback
		}
		return httpOK(ctx, n.http, n.MirrorURL()+"/healthz")
	})
	if err != nil {
		return fmt.Errorf("coop node: %w", err)
	}
	n.logf("coop ready in %v (pid %d, peer %s, mirror %s)", time.Since(start).Round(time.Millisecond), p.pid(), n.PeerURL(), n.MirrorURL())
	return nil
}

// KillCoop kills the coop node with SIGKILL and waits for it to exit.
func (n *Node) KillCoop() error {
	n.mu.Lock()
	p := n.coop
	n.mu.Unlock()
	if p == nil {
		return nil
	}
	n.logf("killing coop (pid %d)", p.pid())
	return p.kill()
}

// KillContainerd kills containerd with SIGKILL (its shims and the
// containers live on) and waits for it to exit.
func (n *Node) KillContainerd() error {
	n.mu.Lock()
	p := n.containerd
	n.mu.Unlock()
	if p == nil {
		return nil
	}
	n.logf("killing containerd (pid %d)", p.pid())
	return p.kill()
}

// ContainerdPID is the node's containerd process id; 0 when it was never
// started.
func (n *Node) ContainerdPID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.containerd == nil {
		return 0
	}
	return n.containerd.pid()
}

// CoopPID is the coop node's process id; 0 when it was never started.
func (n *Node) CoopPID() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.coop == nil {
		return 0
	}
	return n.coop.pid()
}

// SignalCoop sends sig to the coop node: SIGSTOP and SIGCONT make a peer
// that stalls mid-transfer.
func (n *Node) SignalCoop(sig syscall.Signal) {
	n.mu.Lock()
	p := n.coop
	n.mu.Unlock()
	if p != nil {
		p.signal(sig)
	}
}

// BlobPath is where coop's store keeps blob dgst on disk.
func (n *Node) BlobPath(dgst digest.Digest) string {
	return filepath.Join(n.Dir, "coop", "blobs", dgst.Algorithm().String(), dgst.Encoded())
}

// CorruptBlob overwrites the file of blob dgst in coop's store with random
// bytes of the same size: a holder whose copy rotted, or lies.
func (n *Node) CorruptBlob(dgst digest.Digest) error {
	p := n.BlobPath(dgst)
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	junk := make([]byte, fi.Size())
	if _, err := crand.Read(junk); err != nil {
		return err
	}
	// The store keeps blobs read-only.
	if err := os.Chmod(p, 0o644); err != nil {
		return err
	}
	return os.WriteFile(p, junk, 0o644)
}

// CutBlob truncates the file of blob dgst in coop's store to half its size:
// a holder serving fewer bytes than its inventory says.
func (n *Node) CutBlob(dgst digest.Digest) error {
	p := n.BlobPath(dgst)
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	return os.Truncate(p, fi.Size()/2)
}

// StopCoop stops the coop node with SIGTERM (SIGKILL after 10 s).
func (n *Node) StopCoop() error {
	n.mu.Lock()
	p := n.coop
	n.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.stop(10 * time.Second)
}

// RestartCoop stops the coop node (SIGTERM) and starts it again with the
// same flags, leaving containerd running.
func (n *Node) RestartCoop(ctx context.Context) error {
	if err := n.StopCoop(); err != nil {
		return err
	}
	return n.StartCoop(ctx)
}

// RestartContainerd stops containerd (SIGTERM) and starts it again with the
// same config, leaving coop running.
func (n *Node) RestartContainerd(ctx context.Context) error {
	n.mu.Lock()
	p := n.containerd
	n.mu.Unlock()
	if p != nil {
		if err := p.stop(10 * time.Second); err != nil {
			return err
		}
	}
	return n.startContainerd(ctx)
}

// CoopRunning reports whether the coop process is alive.
func (n *Node) CoopRunning() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.coop == nil {
		return false
	}
	ok, _ := n.coop.exited()
	return !ok
}

func (n *Node) writeContainerdConfig(ctx context.Context) error {
	base := baseConfig{
		Root:          filepath.Join(n.Dir, "containerd"),
		State:         filepath.Join(n.RunDir, "state"),
		Temp:          filepath.Join(n.Dir, "tmp"),
		GRPC:          n.Address,
		TTRPC:         filepath.Join(n.RunDir, "t.sock"),
		ShimSocketDir: filepath.Join(n.RunDir, "s"),
		OptDir:        filepath.Join(n.Dir, "opt"),
		RuncRoot:      n.RuncRoot,
		LogLevel:      n.opts.ContainerdLogLevel,
		Snapshotter:   n.opts.Snapshotter,
	}
	if n.opts.Plain || n.opts.Observer {
		base.RegistryConfigPath = n.HostsDir
	}
	if n.opts.Default && (n.opts.Plain || n.opts.Observer || n.opts.Claim) {
		return errors.New("a node in coop's default mode sets neither Plain, Observer nor Claim")
	}
	basePath := filepath.Join(n.Dir, "base.toml")
	if err := writeFileAtomic(basePath, []byte(base.render())); err != nil {
		return err
	}
	cfgPath := filepath.Join(n.Dir, "config.toml")
	if n.opts.Plain {
		for _, r := range n.opts.Registries {
			if err := writeHostsToml(n.HostsDir, r.Host, r.URL); err != nil {
				return err
			}
		}
		return writeFileAtomic(cfgPath, []byte(base.render()))
	}
	if n.opts.Observer {
		// containerd's own store; hosts.toml: the mirror, then the registry.
		for _, r := range n.opts.Registries {
			if err := writeMirrorHostsToml(n.HostsDir, r.Host, n.MirrorURL(), r.URL); err != nil {
				return err
			}
		}
		return writeFileAtomic(cfgPath, []byte(base.render()))
	}
	snapshotters := n.opts.Snapshotter
	if snapshotters != "native" && !strings.Contains(snapshotters, ",") {
		snapshotters += ",native"
	}
	args := []string{"containerd-config",
		"--base", basePath,
		"--output", cfgPath,
		"--content-socket", n.ContentSocket,
		"--mirror-listen", n.MirrorAddr,
		"--hosts-dir", n.HostsDir,
		"--snapshotter", snapshotters,
		"--platform", "linux/amd64",
		"--write",
	}
	if !n.opts.Default {
		args = append(args, "--content-mode", "proxy")
	}
	for _, r := range n.opts.Registries {
		args = append(args, "--registry", r.Host+"="+r.URL)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := runCommand(cctx, os.Environ(), nil, n.tools.Coop, args...); err != nil {
		return fmt.Errorf("containerd config: %w", err)
	}
	return nil
}

func (n *Node) containerdEnv() []string {
	var env []string
	path := n.tools.Dir
	for _, kv := range os.Environ() {
		switch {
		case strings.HasPrefix(kv, "PATH="):
			path += ":" + strings.TrimPrefix(kv, "PATH=")
		case strings.HasPrefix(kv, "CONTAINERD_"):
		default:
			env = append(env, kv)
		}
	}
	if !strings.Contains(path, "/usr/sbin") {
		path += ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	return append(env, "PATH="+path)
}

func (n *Node) startContainerd(ctx context.Context) error {
	_ = os.Remove(n.Address)
	bin, args := n.inNetNS(n.tools.Containerd, []string{"--config", filepath.Join(n.Dir, "config.toml")})
	p, err := startProcess("containerd", n.ContainerdLog(), n.containerdEnv(), bin, args...)
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.containerd = p
	n.mu.Unlock()
	start := time.Now()
	err = waitReady(ctx, 30*time.Second, p, func(ctx context.Context) error {
		if _, err := os.Stat(n.Address); err != nil {
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := n.Ctr(cctx, "version")
		return err
	})
	if err != nil {
		return fmt.Errorf("containerd: %w", err)
	}
	n.logf("containerd ready in %v (pid %d, %s)", time.Since(start).Round(time.Millisecond), p.pid(), n.Address)
	return nil
}

// Tools returns the binaries the node runs.
func (n *Node) Tools() *Tools { return n.tools }

// HTTPOK returns nil when url answers 200.
func HTTPOK(ctx context.Context, c *http.Client, url string) error { return httpOK(ctx, c, url) }

// inNetNS returns the command line that runs bin with args in the node's
// network namespace (nsenter execs bin: same pid, same signals).
func (n *Node) inNetNS(bin string, args []string) (string, []string) {
	if n.opts.NetNS == "" {
		return bin, args
	}
	return "nsenter", append([]string{"--net=" + n.opts.NetNS, bin}, args...)
}

// InNetNS runs bin with args in the node's network namespace (or here) and
// returns its stdout.
func (n *Node) InNetNS(ctx context.Context, bin string, args ...string) (string, error) {
	b, a := n.inNetNS(bin, args)
	return runCommand(ctx, clientEnv(), nil, b, a...)
}

// clientEnv is the environment of ctr and crictl: the host's, without
// anything that could point them at another containerd.
func clientEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "CONTAINERD_") || strings.HasPrefix(kv, "CONTAINER_RUNTIME_ENDPOINT=") ||
			strings.HasPrefix(kv, "IMAGE_SERVICE_ENDPOINT=") || strings.HasPrefix(kv, "CRI_CONFIG_FILE=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// Ctr runs bin/ctr against the node's containerd in namespace "default" and
// returns its stdout.
func (n *Node) Ctr(ctx context.Context, args ...string) (string, error) {
	return n.CtrNamespace(ctx, "default", args...)
}

// CtrNamespace runs bin/ctr in the given namespace and returns its stdout.
func (n *Node) CtrNamespace(ctx context.Context, ns string, args ...string) (string, error) {
	full := append([]string{"--address", n.Address, "-n", ns}, args...)
	return runCommand(ctx, clientEnv(), nil, n.tools.Ctr, full...)
}

// CtrTo runs bin/ctr in the given namespace with its stdout written to w (for
// large outputs such as `content get`).
func (n *Node) CtrTo(ctx context.Context, w io.Writer, ns string, args ...string) error {
	full := append([]string{"--address", n.Address, "-n", ns}, args...)
	_, err := runCommand(ctx, clientEnv(), w, n.tools.Ctr, full...)
	return err
}

// Crictl runs bin/crictl against the node's CRI endpoint and returns its
// stdout.
func (n *Node) Crictl(ctx context.Context, args ...string) (string, error) {
	ep := "unix://" + n.Address
	full := append([]string{"--config", filepath.Join(n.Dir, "crictl.yaml"),
		"--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "30s"}, args...)
	cfg := fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 30\n", ep, ep)
	if err := os.WriteFile(filepath.Join(n.Dir, "crictl.yaml"), []byte(cfg), 0o644); err != nil {
		return "", err
	}
	return runCommand(ctx, clientEnv(), nil, n.tools.Crictl, full...)
}

// PullCtr pulls ref with `ctr image pull --hosts-dir` in namespace default
// (the transfer service, unpacking for the node's snapshotter).
func (n *Node) PullCtr(ctx context.Context, ref string, extra ...string) error {
	args := append([]string{"image", "pull", "--hosts-dir", n.HostsDir}, extra...)
	args = append(args, ref)
	_, err := n.Ctr(ctx, args...)
	return err
}

// PullCRI pulls ref through CRI with `crictl pull` (namespace k8s.io).
func (n *Node) PullCRI(ctx context.Context, ref string) error {
	_, err := n.Crictl(ctx, "pull", ref)
	return err
}

// ResetNamespaces removes every lease, image, content blob and snapshot in
// the default and k8s.io namespaces (CONTAINERD.md, "Test hygiene"). Errors
// on individual objects are ignored; the first listing error is returned.
func (n *Node) ResetNamespaces(ctx context.Context) error {
	for _, ns := range []string{"default", "k8s.io"} {
		for _, kind := range []struct{ list, rm []string }{
			{[]string{"leases", "ls", "-q"}, []string{"leases", "rm"}},
			{[]string{"images", "ls", "-q"}, []string{"images", "rm"}},
		} {
			out, err := n.CtrNamespace(ctx, ns, kind.list...)
			if err != nil {
				return err
			}
			for _, id := range strings.Fields(out) {
				_, _ = n.CtrNamespace(ctx, ns, append(slices.Clone(kind.rm), id)...)
			}
		}
		// Snapshots: remove leaves until none is left or nothing moves.
		for range 64 {
			out, err := n.CtrNamespace(ctx, ns, "snapshots", "--snapshotter", n.opts.Snapshotter, "ls")
			if err != nil {
				return err
			}
			keys := snapshotKeys(out)
			if len(keys) == 0 {
				break
			}
			removed := 0
			for _, k := range keys {
				if _, err := n.CtrNamespace(ctx, ns, "snapshots", "--snapshotter", n.opts.Snapshotter, "rm", k); err == nil {
					removed++
				}
			}
			if removed == 0 {
				break
			}
		}
		out, err := n.CtrNamespace(ctx, ns, "content", "ls", "-q")
		if err != nil {
			return err
		}
		for _, d := range strings.Fields(out) {
			_, _ = n.CtrNamespace(ctx, ns, "content", "rm", d)
		}
	}
	return nil
}

func snapshotKeys(ls string) []string {
	var keys []string
	for i, l := range strings.Split(ls, "\n") {
		f := strings.Fields(l)
		if i == 0 || len(f) == 0 {
			continue // header
		}
		keys = append(keys, f[0])
	}
	return keys
}

// Stop stops containerd (SIGTERM, then SIGKILL), removes what runc and the
// shims left, stops coop, unmounts everything under the node's directories
// and removes them (unless KeepDirs). It is safe to call more than once and
// from a signal handler's path.
func (n *Node) Stop() error {
	n.stopOnce.Do(func() {
		var errs []error
		n.mu.Lock()
		ctd, coop := n.containerd, n.coop
		n.mu.Unlock()
		if ctd != nil {
			errs = append(errs, ctd.stop(10*time.Second))
		}
		cleanupRunc(n.RuncRoot)
		var keep []int
		if coop != nil {
			keep = append(keep, coop.pid())
		}
		killReferencing(n.RunDir, keep...)
		if coop != nil {
			errs = append(errs, coop.stop(10*time.Second))
		}
		for _, d := range []string{n.Dir, n.RunDir} {
			if d != "" {
				errs = append(errs, unmountUnder(d))
			}
		}
		if !n.opts.KeepDirs && n.Dir != "" {
			errs = append(errs, os.RemoveAll(n.Dir))
		}
		if n.RunDir != "" {
			errs = append(errs, os.RemoveAll(n.RunDir))
		}
		n.stopErr = errors.Join(errs...)
	})
	return n.stopErr
}

// waitReady polls check until it succeeds, p exits, or timeout.
func waitReady(ctx context.Context, timeout time.Duration, p *process, check func(context.Context) error) error {
	return waitReadyEvery(ctx, timeout, 50*time.Millisecond, p, check)
}

// waitReadyEvery is waitReady polling every interval (a check that runs a
// program, such as kubectl, is worth fewer tries).
func waitReadyEvery(ctx context.Context, timeout, interval time.Duration, p *process, check func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if ok, err := p.exited(); ok {
			return fmt.Errorf("%s exited before it was ready: %v", p.name, err)
		}
		if last = check(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %v: %v", p.name, timeout, last)
		case <-time.After(interval):
		}
	}
}

func httpOK(ctx context.Context, c *http.Client, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// freePorts returns n distinct free loopback addresses (127.0.0.1:PORT).
func freePorts(n int) ([]string, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var addrs []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs, nil
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

// BlobDisk is what a node's content stores hold on disk, in bytes of blob
// files (snapshots are not counted).
type BlobDisk struct {
	// Coop is coop's content store under its --root: verified blobs and
	// claims still arriving.
	Coop int64
	// Containerd is containerd's built-in content store (empty when coop
	// is its content store).
	Containerd int64
}

// Total is the bytes of blobs on the node's disk in both stores.
func (d BlobDisk) Total() int64 { return d.Coop + d.Containerd }

// BlobDisk measures the blob files of the node's two content stores: coop's
// (<Dir>/coop/blobs and claims, BlobPath's tree) and containerd's built-in
// one (<Dir>/containerd/io.containerd.content.v1.content/blobs). A store
// that does not exist counts 0; files removed while they are walked are
// skipped.
func (n *Node) BlobDisk() (BlobDisk, error) {
	var d BlobDisk
	for _, s := range []struct {
		dirs []string
		sum  *int64
	}{
		{[]string{filepath.Join(n.Dir, "coop", "blobs"), filepath.Join(n.Dir, "coop", "claims")}, &d.Coop},
		{[]string{filepath.Join(n.Dir, "containerd", "io.containerd.content.v1.content", "blobs")}, &d.Containerd},
	} {
		for _, dir := range s.dirs {
			b, err := regularBytes(dir)
			if err != nil {
				return BlobDisk{}, fmt.Errorf("node %s: %w", n.Name, err)
			}
			*s.sum += b
		}
	}
	return d, nil
}

// SettledBlobDisk polls BlobDisk until it has not changed for quiet, and
// returns it; after limit it returns the last reading with settled false.
// (In observer mode coop drops its copy of a blob only when containerd's
// event for it arrives.)
func (n *Node) SettledBlobDisk(ctx context.Context, quiet, limit time.Duration) (d BlobDisk, settled bool, err error) {
	deadline := time.Now().Add(limit)
	last, err := n.BlobDisk()
	if err != nil {
		return BlobDisk{}, false, err
	}
	since := time.Now()
	for {
		select {
		case <-ctx.Done():
			return last, false, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		cur, err := n.BlobDisk()
		if err != nil {
			return BlobDisk{}, false, err
		}
		if cur != last {
			last, since = cur, time.Now()
		}
		if time.Since(since) >= quiet {
			return last, true, nil
		}
		if time.Now().After(deadline) {
			return last, false, nil
		}
	}
}

// regularBytes sums the sizes of the regular files under dir (0 if dir does
// not exist).
func regularBytes(dir string) (int64, error) {
	var sum int64
	err := filepath.WalkDir(dir, func(path string, de os.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		if !de.Type().IsRegular() {
			return nil
		}
		info, err := de.Info()
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		sum += info.Size()
		return nil
	})
	return sum, err
}

// ContainerdBlobPath is where containerd's built-in content store keeps
// blob dgst on disk (Plain and Observer nodes; with coop as containerd's
// content store nothing is there).
func (n *Node) ContainerdBlobPath(dgst digest.Digest) string {
	return filepath.Join(n.Dir, "containerd", "io.containerd.content.v1.content", "blobs", dgst.Algorithm().String(), dgst.Encoded())
}

// MirrorTokenFile is where the coop node keeps its mirror's API token,
// <--root>/mirror.token (mirror.TokenFile), which coop migrate reads.
func (n *Node) MirrorTokenFile() string {
	return filepath.Join(n.Dir, "coop", "mirror.token")
}
