//go:build integration

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/resolvertest"
	"github.com/coopnet/coop/test/harness"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const conformancePeriod = 500 * time.Millisecond

// bareNode is a `coop node` process with no containerd: blobs are written
// and deleted through its content socket, as containerd would.
type bareNode struct {
	name, peer, mirror, sock string
	cmd                      *exec.Cmd
	conn                     *grpc.ClientConn
	store                    ctdcontent.Store
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startBare starts coop node name with its peer server on peerAddr and the
// given extra flags, and waits until it answers.
func (e *env) startBare(name, peerAddr string, extra ...string) *bareNode {
	e.t.Helper()
	dir, err := os.MkdirTemp("", "coop-bare-"+name+"-")
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { os.RemoveAll(dir) })
	n := &bareNode{name: name, peer: "https://" + peerAddr, mirror: "http://" + freeAddr(e.t), sock: filepath.Join(dir, "c.sock")}
	args := append([]string{"node", "--name", name, "--root", filepath.Join(dir, "root"), "--content-socket", n.sock,
		"--peer-listen", peerAddr, "--advertise", n.peer, "--mirror-listen", strings.TrimPrefix(n.mirror, "http://"),
		"--period", conformancePeriod.String(), "--peer-timeout", "300ms", "--log-level", "info",
		"--content-mode", "proxy", "--containerd-address", ""}, append(e.tlsFlags(name), extra...)...)
	n.cmd = exec.Command(e.tools.Coop, args...)
	logf, err := os.Create(filepath.Join(dir, "coop.log"))
	if err != nil {
		e.t.Fatal(err)
	}
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	stop := func() error { n.kill(); return nil }
	track(n, stop)
	e.t.Cleanup(func() {
		n.kill()
		untrack(n)
		if e.t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			e.t.Logf("log of %s:\n%s", name, tail(string(b), 30))
		}
	})
	e.eventually(name+" answers", func() bool { return harness.HTTPOK(e.ctx, e.http, n.peer+"/healthz") == nil })
	conn, err := grpc.NewClient("unix://"+n.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	n.conn, n.store = conn, proxy.NewContentStore(conn)
	return n
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

func (n *bareNode) kill() {
	if n.conn != nil {
		n.conn.Close()
	}
	if n.cmd != nil && n.cmd.Process != nil {
		_ = n.cmd.Process.Kill()
		_ = n.cmd.Wait()
		n.cmd = nil
	}
}

func (n *bareNode) Name() string { return n.name }
func (n *bareNode) URL() string  { return n.peer }
func (n *bareNode) Commit(ctx context.Context, size int64) (digest.Digest, error) {
	b := make([]byte, size)
	_, _ = rand.Read(b)
	desc := ocispec.Descriptor{Digest: digest.FromBytes(b), Size: size}
	return desc.Digest, ctdcontent.WriteBlob(ctx, n.store, "t-"+desc.Digest.Encoded(), bytes.NewReader(b), desc)
}
func (n *bareNode) Delete(ctx context.Context, d digest.Digest) error { return n.store.Delete(ctx, d) }
func (n *bareNode) Kill(context.Context) error                        { n.kill(); return nil }

// mirrorResolver asks a node which candidates its resolver returns, through
// its mirror's /coop/v1/locate: the same answer its pulls get.
type mirrorResolver struct{ url string }

func (m mirrorResolver) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	b, err := json.Marshal(resolver.LocateRequest{Digests: dgsts})
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, m.url+resolver.LocatePath, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("locate: %s", resp.Status)
	}
	var lr resolver.LocateResponse
	if err := json.NewDecoder(resp.Body).Decode(&lr); err != nil {
		return nil, err
	}
	return lr.Candidates, nil
}

// processCluster is one index mode on real processes: holders x and y
// (their addresses fixed up front, so the destination can list them), a
// destination coop node, and for kb and push a real `coop kb` with its
// embedded broker.
type processCluster struct {
	e           *env
	mode        string
	addrs       map[string]string
	holderFlags []string
	dest        *bareNode
	bound, dead time.Duration
}

func newProcessCluster(e *env, mode, feed string) *processCluster {
	c := &processCluster{e: e, mode: mode, addrs: map[string]string{"x": freeAddr(e.t), "y": freeAddr(e.t)}}
	var nbs []string
	for _, n := range []string{"x", "y"} {
		nbs = append(nbs, n+"=https://"+c.addrs[n])
	}
	destFlags := []string{"--index", mode, "--neighbors", strings.Join(nbs, ",")}
	p := conformancePeriod
	switch mode {
	case "online":
		c.bound, c.dead = 2*time.Second, 2*time.Second
	case "periodic":
		c.bound, c.dead = 2*p+2*time.Second, 2*p+3*time.Second
	case "push", "kb":
		api, broker := e.startKBFeed(feed)
		c.holderFlags = []string{"--nats-url", broker, "--kb", api}
		destFlags = append(destFlags, "--nats-url", broker, "--kb", api)
		c.bound, c.dead = 2*p+2*time.Second, 5*p+3*time.Second
	}
	c.dest = e.startBare("dest-"+mode, freeAddr(e.t), destFlags...)
	return c
}

func (c *processCluster) Holder(_ context.Context, t *testing.T, name string) resolvertest.Holder {
	addr, ok := c.addrs[name]
	if !ok {
		t.Fatalf("no address reserved for holder %q", name)
	}
	return c.e.startBare(name, addr, append([]string{"--index", "none"}, c.holderFlags...)...)
}
func (c *processCluster) Resolver() resolver.Resolver { return mirrorResolver{url: c.dest.mirror} }
func (c *processCluster) Bound() time.Duration        { return c.bound }
func (c *processCluster) Dead() time.Duration         { return c.dead }

// startKBFeed starts `coop kb` with the given feed and an embedded broker.
func (e *env) startKBFeed(feed string) (api, broker string) {
	e.t.Helper()
	apiAddr, natsAddr := e.runKB("--feed", feed, "--period", conformancePeriod.String())
	return "https://" + apiAddr, "nats://" + natsAddr
}

// runKB starts coop kb (with its certificate, an embedded broker, on
// loopback) with the given flags, waits until it answers and returns its
// API and broker addresses. The ports are picked free and then given to the
// process: another test may take one in between, and the KB then exits; it
// is started again then.
func (e *env) runKB(flags ...string) (apiAddr, natsAddr string) {
	e.t.Helper()
	for attempt := 1; ; attempt++ {
		apiAddr, natsAddr, exited := e.tryKB(flags)
		if !exited {
			return apiAddr, natsAddr
		}
		if attempt == 3 {
			e.t.Fatalf("coop kb exited at start %d times (its log is above)", attempt)
		}
	}
}

// tryKB starts coop kb on ports free a moment ago and waits until it
// answers; exited says it stopped first.
func (e *env) tryKB(flags []string) (apiAddr, natsAddr string, exited bool) {
	e.t.Helper()
	apiAddr, natsAddr = freeAddr(e.t), freeAddr(e.t)
	dir := e.t.TempDir()
	args := append([]string{"kb", "--listen", apiAddr, "--nats-listen", natsAddr,
		"--root", filepath.Join(dir, "root"), "--log-level", "info"}, e.tlsFlags("coop-kb")...)
	cmd := exec.Command(e.tools.Coop, append(args, flags...)...)
	logf, err := os.Create(filepath.Join(dir, "kb.log"))
	if err != nil {
		e.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	stop := func() error { _ = cmd.Process.Kill(); <-done; return nil }
	track(cmd, stop)
	e.t.Cleanup(func() {
		_ = stop()
		untrack(cmd)
		if e.t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			e.t.Logf("log of coop kb:\n%s", tail(string(b), 30))
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for harness.HTTPOK(e.ctx, e.http, "https://"+apiAddr+"/healthz") != nil {
		select {
		case <-done:
			b, _ := os.ReadFile(logf.Name())
			e.t.Logf("coop kb exited at start:\n%s", tail(string(b), 10))
			return "", "", true
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			e.t.Fatal("not within 10 s: coop kb answers")
		}
	}
	return apiAddr, natsAddr, false
}

// TestIndexConformanceOnProcesses runs the resolver conformance suite for
// every mode on real coop node and coop kb processes.
func TestIndexConformanceOnProcesses(t *testing.T) {
	for _, m := range []struct{ name, mode, feed string }{
		{"online", "online", ""},
		{"periodic", "periodic", ""},
		{"push", "push", "push"},
		{"kb-pull", "kb", "pull"},
		{"kb-push", "kb", "push"},
	} {
		t.Run(m.name, func(t *testing.T) {
			resolvertest.Run(t, func(t *testing.T) resolvertest.Cluster {
				return newProcessCluster(newEnv(t, true), m.mode, m.feed)
			})
		})
	}
}
