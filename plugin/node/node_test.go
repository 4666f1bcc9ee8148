package node

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/modes"
	digest "github.com/opencontainers/go-digest"
)

// proxyOptions are the options of a proxy-mode node on loopback with no
// neighbours and no containerd: what runs without root.
func proxyOptions(t *testing.T) Options {
	dir := t.TempDir()
	return Options{
		Name: "n", Root: filepath.Join(dir, "root"), ContentMode: ContentProxy,
		ContentSocket: filepath.Join(dir, "content.sock"),
		PeerListen:    "127.0.0.1:0", Advertise: "http://127.0.0.1:1",
		MirrorListen: freeAddr(t), Policy: peers.PolicyStripe,
		DownloadBuffer: 1 << 20, StallTimeout: time.Second, ClaimParallel: 1,
		Index: modes.Options{Mode: modes.None},
	}
}

// validateCase changes proxyOptions; want is what the error must mention
// ("" means valid).
type validateCase struct {
	name   string
	change func(*Options)
	want   string
}

// checkValidate runs Validate on each case: a refusal is an invalid argument
// naming its flag.
func checkValidate(t *testing.T, cases []validateCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := proxyOptions(t)
			tc.change(&o)
			err := o.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("valid options refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errdefs.IsInvalidArgument(err) {
				t.Fatalf("err %v: want an invalid argument mentioning %q", err, tc.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	checkValidate(t, []validateCase{
		{"valid", func(*Options) {}, ""},
		{"no name", func(o *Options) { o.Name = "" }, "--name"},
		{"unknown content mode", func(o *Options) { o.ContentMode = "copy" }, "--content-mode"},
		{"observer without containerd", func(o *Options) { o.ContentMode = ContentObserver }, "--containerd-address"},
		{"claim in observer mode", func(o *Options) { o.ContentMode, o.Containerd, o.Claim = ContentObserver, "/x.sock", true }, "--claim needs --content-mode proxy"},
		{"claim without containerd", func(o *Options) { o.Claim = true }, "--claim needs --containerd-address"},
		{"remote stop without containerd", func(o *Options) { o.AllowRemoteStop = true }, "--allow-remote-stop"},
		{"mirror not on loopback", func(o *Options) { o.MirrorListen = "0.0.0.0:5051" }, "--mirror-listen"},
		{"debug not on loopback", func(o *Options) { o.DebugListen = "0.0.0.0:6060" }, "--debug-listen"},
		{"unknown policy", func(o *Options) { o.Policy = "best" }, "--policy"},
		{"small buffer", func(o *Options) { o.DownloadBuffer = 1 }, "--download-buffer"},
		{"no stall timeout", func(o *Options) { o.StallTimeout = 0 }, "--stall-timeout"},
		{"no claim slots", func(o *Options) { o.ClaimParallel = 0 }, "--claim-parallel"},
		{"negative upload limit", func(o *Options) { o.UploadLimit = -1 }, "--upload-limit"},
		{"index push without broker", func(o *Options) { o.Index.Mode = modes.Push }, "--nats-url"},
	})
}

// TestNodeLifecycle: New opens the listeners, Run serves the peer server and
// the mirror until its context ends, Close releases every port.
func TestNodeLifecycle(t *testing.T) {
	o := proxyOptions(t)
	n, err := New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- n.Run(ctx) }()
	for _, u := range []string{
		"http://" + n.PeerAddr().String() + "/healthz",
		"http://" + n.MirrorAddr().String() + "/healthz",
		"http://" + n.PeerAddr().String() + "/metrics",
	} {
		resp, err := http.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s", u, resp.Status)
		}
		if strings.HasSuffix(u, "/metrics") && !strings.Contains(string(body), "coop_inventory_blobs") {
			t.Fatalf("metrics lack coop_inventory_blobs: the node's registry is not served")
		}
	}
	cancel()
	if err := <-ran; err != nil {
		t.Fatalf("Run after its context ended: %v", err)
	}
	peerAddr := n.PeerAddr().String()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	l, err := net.Listen("tcp", peerAddr)
	if err != nil {
		t.Fatalf("the peer port is still held after Close: %v", err)
	}
	l.Close()
}

// TestNewFailsClean: when a listener cannot be opened, New fails naming the
// flag and releases what it had taken (the peer port, the content socket).
func TestNewFailsClean(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	peerAddr := freeAddr(t)
	o := proxyOptions(t)
	o.PeerListen, o.MirrorListen = peerAddr, busy.Addr().String()
	if _, err := New(context.Background(), o); err == nil || !strings.Contains(err.Error(), "--mirror-listen") {
		t.Fatalf("err %v, want one naming --mirror-listen", err)
	}
	l, err := net.Listen("tcp", peerAddr)
	if err != nil {
		t.Fatalf("the peer port is still held after a failed New: %v", err)
	}
	l.Close()
	if c, err := net.Dial("unix", o.ContentSocket); err == nil {
		c.Close()
		t.Fatal("the content socket still answers after a failed New")
	}
}

// freeAddr returns a loopback address with a port nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestNodesSpeakMutualTLS: two nodes with certificates of one CA find each
// other's blobs over mutual TLS; the peer server refuses a client without a
// certificate but for /healthz and /metrics.
// testPKI issues certificates of one CA.
type testPKI struct {
	t   *testing.T
	dir string
}

func newTestPKI(t *testing.T) *testPKI {
	p := &testPKI{t: t, dir: t.TempDir()}
	if err := trust.InitCA(filepath.Join(p.dir, "ca"), trust.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *testPKI) creds(name string) *trust.Credentials {
	dir := filepath.Join(p.dir, name)
	if err := trust.Issue(filepath.Join(p.dir, "ca"), dir, trust.IssueOptions{Name: name}); err != nil {
		p.t.Fatal(err)
	}
	c, err := trust.Load(dir)
	if err != nil {
		p.t.Fatal(err)
	}
	return c
}

// startNode runs a node until the test ends.
func startNode(t *testing.T, o Options) *Node {
	n, err := New(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = n.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done; _ = n.Close() })
	return n
}

func TestNodesSpeakMutualTLS(t *testing.T) {
	pki := newTestPKI(t)
	creds, start := pki.creds, func(o Options) *Node { return startNode(t, o) }
	ao := proxyOptions(t)
	ao.Name, ao.TLS = "node-a", creds("node-a")
	ao.PeerListen = freeAddr(t)
	ao.Advertise = "https://" + ao.PeerListen
	a := start(ao)

	bo := proxyOptions(t)
	bo.Name, bo.TLS = "node-b", creds("node-b")
	bo.Advertise = "https://127.0.0.1:1"
	bo.Index = modes.Options{Mode: modes.Online, Neighbors: []resolver.Neighbor{{Name: "node-a", URL: ao.Advertise}}}
	b := start(bo)

	// a holds a blob; b's resolver finds it over mutual TLS.
	d := digest.FromString("blob")
	a.Inventory().Add(d, 4)
	got, err := b.index.Resolver().Locate(context.Background(), []digest.Digest{d})
	if err != nil || len(got[d]) != 1 || got[d][0].Node != "node-a" {
		t.Fatalf("b located %v (%v), want node-a", got, err)
	}

	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // the stranger
	for path, want := range map[string]int{"/healthz": 200, "/metrics": 200, "/coop/v1/inventory": 401, "/v2/x/blobs/" + d.String(): 401} {
		resp, err := anon.Get(ao.Advertise + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("a stranger's GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
}
