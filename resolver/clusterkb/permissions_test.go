package clusterkb_test

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// kbName is ClusterKB's name in the test clusters' certificates.
const kbName = "coop-kb"

// testCA is a cluster CA that issues certificates on demand.
type testCA struct {
	dir string

	mu     sync.Mutex
	issued map[string]*trust.Credentials
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	dir := t.TempDir()
	if err := trust.InitCA(filepath.Join(dir, "ca"), trust.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	return &testCA{dir: dir, issued: map[string]*trust.Credentials{}}
}

func (ca *testCA) creds(t *testing.T, name string) *trust.Credentials {
	t.Helper()
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if c := ca.issued[name]; c != nil {
		return c
	}
	out := filepath.Join(ca.dir, "issued", name)
	if err := trust.Issue(filepath.Join(ca.dir, "ca"), out, trust.IssueOptions{Name: name}); err != nil {
		t.Fatal(err)
	}
	c, err := trust.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	ca.issued[name] = c
	return c
}

// broker starts an embedded broker with TLS and per-node permissions.
func (ca *testCA) broker(t *testing.T) string {
	t.Helper()
	ns, err := clusterkb.StartBroker(clusterkb.BrokerOptions{Listen: "127.0.0.1:0", StoreDir: t.TempDir(),
		TLS: ca.creds(t, kbName).BrokerConfig(), KB: kbName})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	return ns.ClientURL()
}

// natsOptions are name's options towards the broker.
func (ca *testCA) natsOptions(t *testing.T, name string) []nats.Option {
	return []nats.Option{nats.Secure(ca.creds(t, name).ClientConfig())}
}

// connect connects to the broker as name, as a coop process does; the
// broker's asynchronous errors (permission violations) go to errs.
func (ca *testCA) connect(t *testing.T, url, name string) (*nats.Conn, <-chan error) {
	t.Helper()
	errs := make(chan error, 16)
	opts := append(ca.natsOptions(t, name), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case errs <- err:
		default:
		}
	}))
	nc, err := resolver.ConnectBroker(t.Context(), url, name, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	deadline := time.Now().Add(5 * time.Second)
	for !nc.IsConnected() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not connected to the broker", name)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nc, errs
}

func TestBrokerNeedsKBNameWithTLS(t *testing.T) {
	ca := newTestCA(t)
	_, err := clusterkb.StartBroker(clusterkb.BrokerOptions{Listen: "127.0.0.1:0", StoreDir: t.TempDir(), TLS: ca.creds(t, kbName).BrokerConfig()})
	if !errdefs.IsInvalidArgument(err) {
		t.Fatalf("TLS without the KB's name: %v, want invalid argument", err)
	}
}

// TestBrokerPermissions: each node publishes and writes as itself only;
// ClusterKB and the nodes read everything.
func TestBrokerPermissions(t *testing.T) {
	ca := newTestCA(t)
	checkPermissions(t, ca, ca.broker(t))
}

// TestExternalBrokerConfig: a NATS server configured as the sample in
// contrib says gives each client the embedded broker's permissions, and
// enforces them.
func TestExternalBrokerConfig(t *testing.T) {
	ca := newTestCA(t)
	tlsDir := ca.creds(t, "nats").Dir()
	b, err := os.ReadFile("../../contrib/nats/coop-broker.conf")
	if err != nil {
		t.Fatal(err)
	}
	conf := strings.NewReplacer("/etc/nats/tls/", tlsDir+"/", "/var/lib/nats", t.TempDir(), "port: 4222", "port: -1").Replace(string(b))
	path := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]*server.Permissions{kbName: clusterkb.KBPermissions(kbName),
		"node-a": clusterkb.NodePermissions("node-a"), "node-b": clusterkb.NodePermissions("node-b")}
	if len(opts.Users) != len(want) {
		t.Fatalf("%d users in the sample, want %d", len(opts.Users), len(want))
	}
	for _, u := range opts.Users {
		if !reflect.DeepEqual(u.Permissions, want[u.Username]) {
			t.Errorf("sample's permissions of %s:\n%+v %+v\nwant\n%+v %+v", u.Username,
				u.Permissions.Publish, u.Permissions.Subscribe, want[u.Username].Publish, want[u.Username].Subscribe)
		}
	}
	opts.NoLog, opts.NoSigs, opts.Host = true, true, "127.0.0.1"
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS server from the sample did not start")
	}
	checkPermissions(t, ca, ns.ClientURL())
}

// checkPermissions tries, as ClusterKB and as nodes node-a and node-b, what
// each may and may not do on the broker at url.
func checkPermissions(t *testing.T, ca *testCA, url string) {
	t.Helper()
	ctx := t.Context()
	kbc, _ := ca.connect(t, url, kbName)
	kbKV, err := resolver.InventoryBucket(ctx, kbc) // created by the embedded broker, or else by ClusterKB
	if err != nil {
		t.Fatalf("ClusterKB opens the bucket: %v", err)
	}
	got := make(chan *nats.Msg, 16)
	if _, err := kbc.ChanSubscribe(resolver.SubjectPrefix+">", got); err != nil {
		t.Fatal(err)
	}
	if err := kbc.Flush(); err != nil {
		t.Fatal(err)
	}
	a, aErrs := ca.connect(t, url, "node-a")
	b, _ := ca.connect(t, url, "node-b")
	aKV, err := resolver.InventoryBucket(ctx, a)
	if err != nil {
		t.Fatalf("node-a opens the bucket: %v", err)
	}
	bKV, err := resolver.InventoryBucket(ctx, b)
	if err != nil {
		t.Fatalf("node-b opens the bucket: %v", err)
	}
	timeout := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, time.Second) }

	// What a node may do.
	if err := a.Publish(resolver.Subject("node-a"), []byte("own")); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m.Subject != resolver.Subject("node-a") || string(m.Data) != "own" {
			t.Fatalf("ClusterKB got %s %q", m.Subject, m.Data)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("node-a's event on its own subject not delivered")
	}
	pctx, cancel := timeout()
	_, err = aKV.Put(pctx, resolver.Token("node-a"), []byte("a's inventory"))
	cancel()
	if err != nil {
		t.Fatalf("node-a puts its own key: %v", err)
	}
	for who, kv := range map[string]jetstream.KeyValue{kbName: kbKV, "node-b": bKV} {
		gctx, cancel := timeout()
		e, err := kv.Get(gctx, resolver.Token("node-a"))
		cancel()
		if err != nil || string(e.Value()) != "a's inventory" {
			t.Fatalf("%s reads node-a's key: %v", who, err)
		}
	}
	lctx, cancel := timeout()
	keys, err := kbKV.Keys(lctx)
	cancel()
	if err != nil || len(keys) != 1 || keys[0] != resolver.Token("node-a") {
		t.Fatalf("ClusterKB lists the keys: %v %v", keys, err)
	}

	// What it may not: each attempt is refused by the broker.
	refused := func(t *testing.T) {
		t.Helper()
		select {
		case err := <-aErrs:
			if !errors.Is(err, nats.ErrPermissionViolation) {
				t.Fatalf("broker said %v, want a permissions violation", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no permissions violation reported")
		}
	}
	t.Run("publish on another node's subject", func(t *testing.T) {
		if err := a.Publish(resolver.Subject("node-b"), []byte("forged")); err != nil {
			t.Fatal(err)
		}
		refused(t)
		// A message after it, on a's own subject, arrives: the forged one
		// would have come first.
		if err := a.Publish(resolver.Subject("node-a"), []byte("own")); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-got:
			if m.Subject != resolver.Subject("node-a") {
				t.Fatalf("ClusterKB got %s %q", m.Subject, m.Data)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("node-a's own event not delivered")
		}
	})
	t.Run("put another node's key", func(t *testing.T) {
		pctx, cancel := timeout()
		defer cancel()
		if _, err := aKV.Put(pctx, resolver.Token("node-b"), []byte("forged")); err == nil {
			t.Fatal("node-a put node-b's key")
		}
		refused(t)
		gctx, cancel := timeout()
		defer cancel()
		if _, err := kbKV.Get(gctx, resolver.Token("node-b")); !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Fatalf("node-b's key after node-a's put: %v, want not found", err)
		}
	})
	t.Run("delete or purge the bucket", func(t *testing.T) {
		js, err := jetstream.New(a)
		if err != nil {
			t.Fatal(err)
		}
		dctx, cancel := timeout()
		defer cancel()
		if err := js.DeleteKeyValue(dctx, resolver.Bucket); err == nil {
			t.Fatal("node-a deleted the bucket")
		}
		refused(t)
		pctx, cancel := timeout()
		defer cancel()
		if err := aKV.Delete(pctx, resolver.Token("node-a")); err != nil {
			t.Fatalf("node-a deletes its own key: %v", err) // a put of a marker on its key
		}
		if err := aKV.Purge(pctx, resolver.Token("node-b")); err == nil {
			t.Fatal("node-a purged node-b's key")
		}
		refused(t)
	})
	t.Run("forge a reply to ClusterKB", func(t *testing.T) {
		if err := a.Publish("_INBOX."+kbName+".x.y", []byte("forged")); err != nil {
			t.Fatal(err)
		}
		refused(t)
	})
	t.Run("listen to another's inbox", func(t *testing.T) {
		if _, err := a.SubscribeSync("_INBOX.>"); err != nil {
			t.Fatal(err)
		}
		refused(t)
	})
}

// TestBrokerRefusesStrangers: without a certificate of the cluster CA, no
// connection.
func TestBrokerRefusesStrangers(t *testing.T) {
	ca := newTestCA(t)
	url := ca.broker(t)
	other := newTestCA(t)
	for _, tc := range []struct {
		name string
		opts []nats.Option
	}{
		{"plain", nil},
		{"TLS without a certificate", []nats.Option{nats.Secure(&tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})}}, //nolint:gosec // the client's trust is not tested
		{"certificate of another CA", []nats.Option{nats.Secure(other.creds(t, "node-a").ClientConfig())}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nc, err := nats.Connect(url, append(tc.opts, nats.Timeout(2*time.Second), nats.NoReconnect())...)
			if err == nil {
				nc.Close()
				t.Fatal("connected")
			}
		})
	}
}
