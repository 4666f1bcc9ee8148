package resolver

import (
	"context"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/log/logtest"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

func TestToken(t *testing.T) {
	for in, want := range map[string]string{
		"node-1":              "node-1",
		"ip-10-0-0-1.ec2.int": "ip-10-0-0-1=2Eec2=2Eint",
		"a*b>c d":             "a=2Ab=3Ec=20d",
		"x=y":                 "x=3Dy",
	} {
		if got := Token(in); got != want {
			t.Errorf("Token(%q) = %q, want %q", in, got, want)
		}
	}
}

// startNATS starts an embedded broker with JetStream on addr
// ("127.0.0.1:0" for any port).
func startNATS(t *testing.T, addr, dir string) *server.Server {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	if p == 0 {
		p = server.RANDOM_PORT
	}
	ns, err := server.NewServer(&server.Options{Host: host, Port: p, NoSigs: true, NoLog: true, JetStream: true, StoreDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("broker not ready")
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	return ns
}

// logEntry is one recorded log entry.
type logEntry struct {
	level log.Level
	msg   string
	err   any
}

// logRecorder records what a test's logger logs (and logtest passes it on
// to t.Log).
type logRecorder struct {
	mu      sync.Mutex
	entries []logEntry
	more    chan struct{} // closed at the next entry
}

func recordLogs(t *testing.T) (context.Context, *logRecorder) {
	ctx := logtest.WithT(context.Background(), t)
	r := &logRecorder{more: make(chan struct{})}
	log.G(ctx).Logger.AddHook(r)
	return ctx, r
}

func (r *logRecorder) Levels() []log.Level {
	return []log.Level{log.PanicLevel, log.FatalLevel, log.ErrorLevel, log.WarnLevel, log.InfoLevel, log.DebugLevel, log.TraceLevel}
}

func (r *logRecorder) Fire(e *log.Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.entries = append(r.entries, logEntry{level: e.Level, msg: e.Message, err: e.Data["error"]})
	close(r.more)
	r.more = make(chan struct{})
	return nil
}

// since returns the entries logged from the i-th on.
func (r *logRecorder) since(i int) []logEntry {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]logEntry(nil), r.entries[min(i, len(r.entries)):]...)
}

// wait waits until an entry with msg is logged from the i-th entry on.
func (r *logRecorder) wait(t *testing.T, i int, msg string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		more := r.more
		for _, e := range r.entries[min(i, len(r.entries)):] {
			if e.msg == msg {
				r.mu.Unlock()
				return
			}
		}
		r.mu.Unlock()
		select {
		case <-more:
		case <-timeout:
			t.Fatalf("never logged: %q", msg)
		}
	}
}

// countingReader answers every inventory read with an empty inventory and
// reports each read on reads.
type countingReader struct {
	calls atomic.Int32
	reads chan string
}

func (c *countingReader) Inventory(_ context.Context, url, _ string, _ uint64) (*peers.InventoryResponse, error) {
	c.calls.Add(1)
	select {
	case c.reads <- url:
	default:
	}
	return &peers.InventoryResponse{Node: "x", Epoch: "e", Seq: 1, Full: true}, nil
}

// TestSharedConnection: a publisher and a subscriber share one broker
// connection and neither takes over its handlers. A broker restart is
// logged by the connection itself (lost, with the cause; back) and resyncs
// the subscriber; once they have stopped, closing the connection logs
// nothing at warning or above.
func TestSharedConnection(t *testing.T) {
	dir := t.TempDir()
	ns := startNATS(t, "127.0.0.1:0", dir)
	addr := ns.Addr().String()
	ctx, logs := recordLogs(t)
	nc, err := ConnectBroker(ctx, ns.ClientURL(), "dest")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	pub, err := NewPublisher(PublisherOptions{Node: "dest", URL: "http://dest", Inventory: content.NewInventory(), Conn: nc, Period: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	reader := &countingReader{reads: make(chan string, 16)}
	sub, err := NewSubscriber(SubscriberOptions{Index: NewIndex(), Conn: nc, Reader: reader, Period: time.Hour,
		Members: Neighborhood{Source: Static{{Name: "x", URL: "http://x"}}}})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = pub.Run(rctx) })
	wg.Go(func() { _ = sub.Run(rctx) })
	// The subscriber reads x at start (nothing retained for it).
	<-reader.reads

	mark := len(logs.since(0))
	ns.Shutdown()
	ns.WaitForShutdown()
	logs.wait(t, mark, "broker connection lost; reconnecting")
	startNATS(t, addr, dir)
	logs.wait(t, mark, "broker connection back")
	logs.wait(t, mark, "broker connection back; resyncing the index")
	select {
	case <-reader.reads: // the resync read x again
	case <-time.After(10 * time.Second):
		t.Fatal("the subscriber did not resync after the broker came back")
	}
	for _, e := range logs.since(mark) {
		if e.level <= log.WarnLevel && e.err == nil {
			t.Errorf("%s without a cause: %q", e.level, e.msg)
		}
	}

	cancel()
	wg.Wait()
	closed := make(chan struct{})
	nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
	mark = len(logs.since(0))
	nc.Close()
	<-closed // after any disconnect handler: callbacks run in order
	for _, e := range logs.since(mark) {
		if e.level <= log.WarnLevel {
			t.Errorf("closing the connection logged %s %q (error %v)", e.level, e.msg, e.err)
		}
	}
}
