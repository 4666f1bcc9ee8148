//go:build integration

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/test/harness"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	digest "github.com/opencontainers/go-digest"
)

// securityTableEnv names the file the suite writes its table to, as
// markdown (for the README's threat table).
const securityTableEnv = "COOP_SECURITY_TABLE"

// Outcomes the rows compare.
const (
	refusedHandshake = "handshake refused"
	connected        = "connected"
)

// Sections of the table, in print order.
const (
	secPeer = iota
	secKB
	secBroker
	secMirror
	secHostile
	secMigrate
)

// secRow is one attack: what it should get, what it got, and what the
// suite measured on the way.
type secRow struct {
	section                       int
	attack, expected, got, detail string
}

// secTable collects rows from the suite's parallel parts.
type secTable struct {
	mu   sync.Mutex
	rows []secRow
}

func (tb *secTable) add(section int, attack, expected, got, detail string) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	tb.rows = append(tb.rows, secRow{section, attack, expected, got, detail})
}

// markdown renders the table; failed rows are marked.
func (tb *secTable) markdown() string {
	tb.mu.Lock()
	rows := slices.Clone(tb.rows)
	tb.mu.Unlock()
	slices.SortStableFunc(rows, func(a, b secRow) int { return a.section - b.section })
	cell := func(s string) string { return strings.ReplaceAll(strings.ReplaceAll(s, "|", `\|`), "\n", " ") }
	var b strings.Builder
	b.WriteString("| attack | expected | got | detail |\n|---|---|---|---|\n")
	for _, r := range rows {
		got := r.got
		if got != r.expected {
			got = "**FAIL: " + got + "**"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", cell(r.attack), cell(r.expected), cell(got), cell(r.detail))
	}
	return b.String()
}

// TestSecuritySuite tries each attack of issue 12 on real coop node and
// coop kb processes and prints a table (attack, expected, got); it fails
// on every row whose outcome is not the expected refusal. $COOP_SECURITY_TABLE,
// when set, receives the table as markdown.
func TestSecuritySuite(t *testing.T) {
	e := newEnv(t, true)
	tb := &secTable{}
	start := time.Now()
	t.Run("attacks", func(t *testing.T) {
		for _, part := range []struct {
			name string
			run  func(*env, *secTable)
		}{
			{"peer-server-mirror-migrate", secPeerServer},
			{"clusterkb-broker", secClusterKB},
			{"size-2^62", secHugeSize},
			{"size-lie", secSizeLie},
			{"swarm-liar", secSwarmLiar},
			{"registry-liar", secRegistryLiar},
			{"slow-readers", secSlowReaders},
		} {
			t.Run(part.name, func(t *testing.T) {
				t.Parallel()
				part.run(e.sub(t), tb)
			})
		}
	})
	table := tb.markdown()
	t.Logf("security suite (%v):\n%s", time.Since(start).Round(time.Second), table)
	if path := os.Getenv(securityTableEnv); path != "" {
		if err := os.WriteFile(path, []byte(table), 0o644); err != nil {
			t.Errorf("%s: %v", securityTableEnv, err)
		}
	}
	for _, r := range tb.rows {
		if r.got != r.expected {
			t.Errorf("%s: got %q, want %q (%s)", r.attack, r.got, r.expected, r.detail)
		}
	}
}

// secPeerServer: a stranger and an impostor against a node's peer server,
// SSRF through its mirror's sources API, and a privileged spec through
// coop migrate from it.
func secPeerServer(e *env, tb *secTable) {
	t := e.t
	reg := e.registry()
	img := e.webImage(reg)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	a := e.node(harness.NodeOptions{Name: "a", Registries: up, Migrations: true})
	e.runWeb(a, img, "web")
	if _, err := a.Ctr(e.ctx, "container", "create", "--privileged", img.Ref, "priv"); err != nil {
		t.Fatal(err)
	}

	// A stranger: TLS, no client certificate.
	stranger := harness.TLSHTTPClient(harness.StrangerTLS())
	layer := img.Layers[len(img.Layers)-1]
	blobURL := a.PeerURL() + "/v2/" + img.Repo + "/blobs/" + layer.Digest.String()
	have, _ := json.Marshal(map[string]any{"digests": []digest.Digest{layer.Digest}})
	for _, c := range []struct {
		attack, method, path string
		body                 []byte
		want                 int
	}{
		{"stranger GETs a blob", http.MethodGet, "/v2/" + img.Repo + "/blobs/" + layer.Digest.String(), nil, http.StatusUnauthorized},
		{"stranger GETs a manifest", http.MethodGet, "/v2/" + img.Repo + "/manifests/" + img.Manifest.Digest.String(), nil, http.StatusUnauthorized},
		{"stranger GETs the inventory", http.MethodGet, peers.InventoryPath, nil, http.StatusUnauthorized},
		{"stranger GETs a chunk map (swarm)", http.MethodGet, peers.PartialPath + "/" + layer.Digest.String(), nil, http.StatusUnauthorized},
		{"stranger POSTs have", http.MethodPost, peers.HavePath, have, http.StatusUnauthorized},
		{"stranger GETs a container record", http.MethodGet, peers.ContainersPath + "/default/web", nil, http.StatusUnauthorized},
		{"stranger POSTs a stop", http.MethodPost, peers.ContainersPath + "/default/web/stop", nil, http.StatusUnauthorized},
		{"stranger GETs /healthz (open)", http.MethodGet, "/healthz", nil, http.StatusOK},
		{"stranger GETs /metrics (open)", http.MethodGet, "/metrics", nil, http.StatusOK},
	} {
		code, err := secDo(e.ctx, stranger, c.method, a.PeerURL()+c.path, c.body)
		got, detail := statusOutcome(code, err), c.method+" "+c.path
		if strings.HasSuffix(c.path, "/stop") {
			detail += ": task web " + taskState(e, a, "web")
		}
		tb.add(secPeer, "peer server: "+c.attack, strconv.Itoa(c.want), got, detail)
	}
	// The same request with the cluster's certificate: the 401s above are
	// the certificate's doing, not a wrong path.
	code, err := secDo(e.ctx, e.http, http.MethodGet, blobURL, nil)
	tb.add(secPeer, "peer server: member GETs the blob (control)", "200", statusOutcome(code, err), "certificate "+harness.HarnessName)

	// A member, for a namespace the node does not serve records of
	// (the harness serves default and k8s.io).
	if _, err := a.CtrNamespace(e.ctx, "private", "container", "create", "--runc-root", a.RuncRoot, img.Ref, "hidden"); err != nil {
		// The image is in namespace default only: pull it for private.
		if err := a.CtrTo(e.ctx, io.Discard, "private", "image", "pull", "--hosts-dir", a.HostsDir, img.Ref); err != nil {
			t.Fatal(err)
		}
		if _, err := a.CtrNamespace(e.ctx, "private", "container", "create", img.Ref, "hidden"); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ attack, method, path, want string }{
		{"member GETs a served container record (control)", http.MethodGet, "/default/web", "200"},
		{"member GETs a record of a namespace not served", http.MethodGet, "/private/hidden", "403"},
		{"member POSTs a stop in a namespace not served", http.MethodPost, "/private/hidden/stop", "403"},
	} {
		code, err := secDo(e.ctx, e.http, c.method, a.PeerURL()+peers.ContainersPath+c.path, nil)
		tb.add(secPeer, "peer server: "+c.attack, c.want, statusOutcome(code, err), c.method+" "+peers.ContainersPath+c.path)
	}

	// An impostor: a certificate of another CA naming a real node.
	impostor := e.impostorTLS("a")
	got, detail := tlsAttempt(a.PeerAddr, impostor, http.MethodGet, "/v2/"+img.Repo+"/blobs/"+layer.Digest.String())
	tb.add(secPeer, `peer server: another CA's certificate named "a" GETs a blob`, refusedHandshake, got, detail)

	secMirrorSources(e, tb, a)

	// A privileged spec through migrate: refused before anything is made.
	b := e.node(harness.NodeOptions{Name: "b", Registries: up, Migrations: true})
	ctx, cancel := context.WithTimeout(e.ctx, migrateTimeout)
	defer cancel()
	_, err = b.Migrate(ctx, a.PeerURL(), "priv", "--start")
	got = "migrated"
	if err != nil {
		got = "refused"
		for _, want := range []string{"permission denied", "CAP_SYS_ADMIN", "--allow-privileged"} {
			if !strings.Contains(err.Error(), want) {
				got = fmt.Sprintf("refused without naming %q", want)
			}
		}
	}
	if out, lerr := b.Ctr(e.ctx, "container", "ls", "-q"); lerr != nil || strings.TrimSpace(out) != "" {
		got += fmt.Sprintf(", left containers %q (%v)", out, lerr)
	}
	tb.add(secMigrate, "coop migrate of a --privileged container (no --allow-privileged)", "refused", got, refusal(err))
}

// secMirrorSources: SSRF through the mirror's sources API, and its token.
func secMirrorSources(e *env, tb *secTable, n *harness.Node) {
	tok, err := os.ReadFile(n.MirrorTokenFile())
	if err != nil {
		e.t.Fatal(err)
	}
	token := strings.TrimSpace(string(tok))
	d := digest.FromString("coop security suite")
	for _, c := range []struct {
		attack, url, token string
		want               int
	}{
		{"a source URL ending in '#' (any path of the host)", "http://127.0.0.1:1/#", token, http.StatusBadRequest},
		{"a source URL with a path", "http://127.0.0.1:1/coop/v1/containers/default/web/stop#", token, http.StatusBadRequest},
		{"a source URL with a query", "http://127.0.0.1:1/?x=y", token, http.StatusBadRequest},
		{"a source URL with user info", "http://user:pw@127.0.0.1:1", token, http.StatusBadRequest},
		{"a source without the token", "https://127.0.0.1:1", "", http.StatusUnauthorized},
		{"a source with a wrong token", "https://127.0.0.1:1", strings.Repeat("0", len(token)), http.StatusUnauthorized},
		{"a valid source with the token (control)", "https://127.0.0.1:1", token, http.StatusOK},
	} {
		body, _ := json.Marshal(map[string]any{"node": "src", "url": c.url, "blobs": map[digest.Digest]int64{d: 1}, "ttl_seconds": 60})
		req, err := http.NewRequestWithContext(e.ctx, http.MethodPost, n.MirrorURL()+"/coop/v1/sources", bytes.NewReader(body))
		if err != nil {
			e.t.Fatal(err)
		}
		if c.token != "" {
			req.Header.Set("Authorization", "Bearer "+c.token)
		}
		code, answer, err := secAnswer(http.DefaultClient, req)
		if code == http.StatusOK {
			var sr struct{ ID string }
			_ = json.Unmarshal(answer, &sr)
			del, _ := http.NewRequestWithContext(e.ctx, http.MethodDelete, n.MirrorURL()+"/coop/v1/sources/"+sr.ID, nil)
			del.Header.Set("Authorization", "Bearer "+token)
			_, _, _ = secAnswer(http.DefaultClient, del)
		}
		tb.add(secMirror, "mirror: "+c.attack, strconv.Itoa(c.want), statusOutcome(code, err), "url "+c.url)
	}
}

// secClusterKB: strangers, impostors and a forged registration against
// coop kb, and its broker's handshake.
func secClusterKB(e *env, tb *secTable) {
	t := e.t
	const static, staticURL = "s", "https://127.0.0.1:2"
	api, broker := e.startSecKB("--nodes", static+"="+staticURL)
	stranger := harness.TLSHTTPClient(harness.StrangerTLS())
	reg := func(name, url string) []byte {
		b, _ := json.Marshal(map[string]string{"name": name, "url": url})
		return b
	}
	for _, c := range []struct {
		attack, method, path string
		body                 []byte
		want                 int
	}{
		{"stranger lists the members", http.MethodGet, "/coop/v1/nodes", nil, http.StatusUnauthorized},
		{`stranger registers "a"`, http.MethodPost, "/coop/v1/nodes", reg("a", "https://127.0.0.1:3"), http.StatusUnauthorized},
		{"stranger locates a blob", http.MethodPost, "/coop/v1/locate", []byte(`{"digests":[]}`), http.StatusUnauthorized},
		{"stranger GETs /healthz (open)", http.MethodGet, "/healthz", nil, http.StatusOK},
		{"stranger GETs /metrics (open)", http.MethodGet, "/metrics", nil, http.StatusOK},
	} {
		code, err := secDo(e.ctx, stranger, c.method, api+c.path, c.body)
		tb.add(secKB, "ClusterKB: "+c.attack, strconv.Itoa(c.want), statusOutcome(code, err), c.method+" "+c.path)
	}

	client := func(name string) *http.Client {
		c, err := e.pki.HTTPClientAs(name, filepath.Join(t.TempDir(), name))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	const realURL, evilURL = "https://127.0.0.1:4", "https://127.0.0.1:6666"
	code, err := secDo(e.ctx, client("a"), http.MethodPost, api+"/coop/v1/nodes", reg("a", realURL))
	tb.add(secKB, `ClusterKB: node "a" registers itself (control)`, "200", statusOutcome(code, err), "url "+realURL)
	x := client("x")
	for _, c := range []struct{ victim, url string }{{"a", realURL}, {static, staticURL}} {
		code, err := secDo(e.ctx, x, http.MethodPost, api+"/coop/v1/nodes", reg(c.victim, evilURL))
		got := statusOutcome(code, err)
		now := secMemberURL(e, api, c.victim)
		if now != c.url {
			got += fmt.Sprintf(", %q now at %s", c.victim, now)
		}
		kind := "registered member"
		if c.victim == static {
			kind = "static member"
		}
		tb.add(secKB, fmt.Sprintf(`ClusterKB: node "x" (its own certificate) registers as %s %q`, kind, c.victim),
			"403", got, fmt.Sprintf("%q still at %s", c.victim, now))
	}
	impostor := e.impostorTLS("a")
	got, detail := tlsAttempt(strings.TrimPrefix(api, "https://"), impostor, http.MethodPost, "/coop/v1/nodes")
	tb.add(secKB, `ClusterKB: another CA's certificate named "a" registers "a"`, refusedHandshake, got, detail)

	// The broker: members only, at the handshake.
	xTLS, err := e.pki.ClientTLSAs("x", filepath.Join(t.TempDir(), "x-nats"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		attack string
		tls    *tls.Config
		want   string
	}{
		{"stranger (no certificate) connects", harness.StrangerTLS(), refusedHandshake},
		{`another CA's certificate named "a" connects`, impostor, refusedHandshake},
		{`node "x" connects (control)`, xTLS, connected},
	} {
		nc, err := nats.Connect(broker, nats.Secure(c.tls), nats.Timeout(5*time.Second), nats.NoReconnect())
		got := connected
		if err != nil {
			got = refusedHandshake
		} else {
			nc.Close()
		}
		tb.add(secBroker, "broker: "+c.attack, c.want, got, errDetail(err))
	}
	secBrokerForgery(e, tb, broker)
}

// secBrokerForgery: node x publishes on node a's subject and writes a's key
// of the retained inventories; node y, following every subject, reads.
func secBrokerForgery(e *env, tb *secTable, broker string) {
	t := e.t
	x, xErrs := e.natsMember(broker, "x")
	y, _ := e.natsMember(broker, "y")
	sub, err := y.SubscribeSync(resolver.SubjectPrefix + ">")
	if err != nil {
		t.Fatal(err)
	}
	if err := y.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ attack, node, want string }{
		{`node "x" publishes on "a"'s subject`, "a", "refused"},
		{`node "x" publishes on its own subject (control)`, "x", "delivered"},
	} {
		subject := resolver.Subject(c.node)
		if err := x.Publish(subject, []byte(`{"node":"`+c.node+`","epoch":"forged","seq":1,"full":true}`)); err != nil {
			t.Fatal(err)
		}
		_ = x.Flush()
		got, detail := "refused", ""
		if m, err := sub.NextMsg(time.Second); err == nil {
			got, detail = "delivered", "y received it on "+m.Subject
		}
		select {
		case err := <-xErrs:
			detail = strings.TrimSpace(detail + " " + err.Error())
		case <-time.After(100 * time.Millisecond):
		}
		tb.add(secBroker, "broker: "+c.attack+" "+subject, c.want, got, detail)
	}

	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	bucket := func(nc *nats.Conn) jetstream.KeyValue {
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		kv, err := js.KeyValue(ctx, resolver.Bucket)
		if err != nil {
			t.Fatalf("bucket %s: %v", resolver.Bucket, err)
		}
		return kv
	}
	xkv, ykv := bucket(x), bucket(y)
	for _, c := range []struct{ attack, node, want string }{
		{`node "x" writes "a"'s key of the retained inventories`, "a", "refused"},
		{`node "x" writes its own key (control)`, "x", "written"},
	} {
		key := resolver.Token(c.node)
		pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := xkv.Put(pctx, key, []byte("forged"))
		pcancel()
		got := "written"
		if err != nil {
			got = "refused"
		}
		v, gerr := ykv.Get(ctx, key)
		switch {
		case gerr == nil && string(v.Value()) == "forged" && got == "refused":
			got = "refused, but written"
		case (gerr != nil || string(v.Value()) != "forged") && got == "written":
			got = "answered, not written"
		}
		detail := errDetail(err)
		select {
		case aerr := <-xErrs:
			detail = strings.TrimSpace(aerr.Error() + "; put: " + detail)
		default:
		}
		tb.add(secBroker, "broker: "+c.attack+" "+resolver.Bucket+"/"+key, c.want, got, detail)
	}
}

// natsMember connects to the broker as node name (a certificate of the
// cluster, inboxes under its name as coop's own connections have them) and
// returns the connection and its asynchronous errors (permission
// violations).
func (e *env) natsMember(broker, name string) (*nats.Conn, <-chan error) {
	e.t.Helper()
	cfg, err := e.pki.ClientTLSAs(name, filepath.Join(e.t.TempDir(), "nats-"+name))
	if err != nil {
		e.t.Fatal(err)
	}
	errs := make(chan error, 16)
	nc, err := nats.Connect(broker, nats.Secure(cfg), nats.Timeout(5*time.Second), nats.NoReconnect(),
		nats.CustomInboxPrefix("_INBOX."+resolver.Token(name)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case errs <- err:
			default:
			}
		}))
	if err != nil {
		e.t.Fatalf("broker: %s connects: %v", name, err)
	}
	e.t.Cleanup(nc.Close)
	return nc, errs
}

// secMemberURL is the URL ClusterKB lists for member name ("" if none).
func secMemberURL(e *env, api, name string) string {
	req, err := http.NewRequestWithContext(e.ctx, http.MethodGet, api+"/coop/v1/nodes", nil)
	if err != nil {
		e.t.Fatal(err)
	}
	code, body, err := secAnswer(e.http, req)
	if err != nil || code != http.StatusOK {
		e.t.Fatalf("list members: %d %v", code, err)
	}
	var nodes []struct{ Name, URL string }
	if err := json.Unmarshal(body, &nodes); err != nil {
		e.t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Name == name {
			return n.URL
		}
	}
	return ""
}

// secHugeSize: a neighbour says every blob is 2^62 bytes; the victim's
// pull still completes, from the registry, with its memory bounded and
// nothing corrupt committed.
func secHugeSize(e *env, tb *secTable) {
	reg := e.registry()
	img := e.push(reg, "coop/huge", 8<<20, 4<<20)
	liar := e.startLiar("evil", 1<<62)
	v := e.node(harness.NodeOptions{Name: "v", Registries: []harness.Upstream{harness.UpstreamOf(reg)},
		Neighbors: []harness.Neighbor{{Name: "evil", URL: liar.srv.URL}}})
	pid := coopPID(v)
	err := e.timed("v: pull beside a 2^62 liar", pullTimeout, func(ctx context.Context) error { return v.PullCtr(ctx, img.Ref) })
	var got string
	switch {
	case err != nil:
		got = "pull failed"
	case liar.haves.Load() == 0:
		got = "the liar was never asked" // the row would prove nothing
	default:
		got = "pulled from the registry"
	}
	e.verifyContent(v, "default") // fails the test on any corrupt blob
	files := e.verifyStoreFiles(v)
	hwm := peakRSS(pid)
	const bound = 512 << 20
	if hwm > bound || hwm == 0 {
		got += fmt.Sprintf(", peak RSS %d MiB (bound %d)", hwm>>20, bound>>20)
	}
	if err := harness.HTTPOK(e.ctx, e.http, v.PeerURL()+"/healthz"); err != nil {
		got += ", /healthz: " + err.Error()
	}
	tb.add(secHostile, "a neighbour answers have with size 2^62 for every blob", "pulled from the registry", got,
		strings.TrimSuffix(fmt.Sprintf("liar asked %d times, %d GETs; %d store files verified; coop peak RSS %d MiB; %s",
			liar.haves.Load(), liar.gets.Load(), files, hwm>>20, errDetail(err)), "; "))
}

// secSizeLie: a neighbour says every blob is 12 MiB, a plausible size.
// The manifest the victim commits before the blobs gives their real sizes:
// the liar is no candidate, its bytes are never asked for, the registry
// serves. In proxy mode the manifest is committed through coop's own store;
// in observer mode coop learns it from containerd's event or, when a layer
// is asked before the event arrives, from the manifest containerd already
// labelled with its children.
func secSizeLie(e *env, tb *secTable) {
	reg := e.registry()
	img := e.push(reg, "coop/sizelie", 8<<20, 4<<20)
	liar := e.startLiar("evil", 12<<20)
	for _, observer := range []bool{false, true} {
		mode := map[bool]string{false: "proxy", true: "observer"}[observer]
		v := e.node(harness.NodeOptions{Name: "v-" + mode, Observer: observer, Registries: []harness.Upstream{harness.UpstreamOf(reg)},
			Neighbors: []harness.Neighbor{{Name: "evil", URL: liar.srv.URL}}})
		gets0 := liar.gets.Load()
		err := e.timed("v-"+mode+": pull beside a size liar", pullTimeout, func(ctx context.Context) error { return v.PullCtr(ctx, img.Ref) })
		gets := liar.gets.Load() - gets0
		refused, _ := v.Metric(e.ctx, "coop_mirror_size_refused_total")
		learned, _ := v.Metric(e.ctx, "coop_manifest_sizes")
		e.verifyContent(v, "default")
		var got, want string
		switch {
		case err != nil:
			got = "pull failed"
		case liar.haves.Load() == 0:
			got = "the liar was never asked"
		case learned < float64(len(img.Layers)):
			got = fmt.Sprintf("only %v sizes learned from the manifest", learned)
		case gets > 0 || refused == 0:
			got = fmt.Sprintf("the liar was a candidate (%d GETs, %v refusals)", gets, refused)
		default:
			got = "refused by the manifest's size; pulled from the registry"
		}
		want = "refused by the manifest's size; pulled from the registry"
		tb.add(secHostile, "a neighbour answers have with a plausible wrong size (12 MiB) for every blob ("+mode+" mode)", want, got,
			strings.TrimSuffix(fmt.Sprintf("liar asked %d times, %d GETs; %v candidates refused by size; %v sizes known; %s",
				liar.haves.Load(), gets, refused, learned, errDetail(err)), "; "))
	}
}

// liar is a neighbour with a certificate of the cluster, whose have
// answers claim every digest asked with size, and whose blobs are zeros.
type liar struct {
	srv         *httptest.Server
	size        int64
	haves, gets atomic.Int64
}

func (e *env) startLiar(name string, size int64) *liar {
	l := &liar{size: size}
	l.srv = e.startMember(name, http.HandlerFunc(l.serveHTTP))
	return l
}

// startMember serves h over TLS with a certificate of the cluster named
// name (a hostile member), until the test ends.
func (e *env) startMember(name string, h http.Handler) *httptest.Server {
	e.t.Helper()
	cfg, err := e.pki.ServerTLSAs(name, filepath.Join(e.t.TempDir(), "tls-"+name))
	if err != nil {
		e.t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = cfg
	srv.StartTLS()
	e.t.Cleanup(srv.Close)
	return srv
}

func (l *liar) serveHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == peers.HavePath:
		l.haves.Add(1)
		var req struct {
			Digests []digest.Digest `json:"digests"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		blobs := []map[string]any{}
		for _, d := range req.Digests {
			blobs = append(blobs, map[string]any{"digest": d, "size": l.size})
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"node": "evil", "epoch": "e1", "seq": 1, "blobs": blobs})
	case strings.Contains(r.URL.Path, "/blobs/"):
		l.gets.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(1<<20))
		_, _ = w.Write(make([]byte, 1<<20))
	default:
		w.WriteHeader(http.StatusOK)
	}
}

// secSwarmLiar: a member says it is downloading every blob, has every
// chunk, and serves random bytes (a swarm's liar). The pull beside it
// completes at once from the honest holder; nothing corrupt is committed;
// the liar is not asked again for the next image.
func secSwarmLiar(e *env, tb *secTable) {
	reg := e.registry()
	img := e.push(reg, "coop/swarmliar", 6<<20, 3<<20)
	img2 := e.push(reg, "coop/swarmliar2", 5<<20)
	up := []harness.Upstream{harness.UpstreamOf(reg)}
	sizes := map[digest.Digest]int64{}
	for _, im := range []*harness.Image{img, img2} {
		for _, b := range im.Blobs() {
			sizes[b.Digest] = b.Size
		}
	}
	liar := e.startPartialLiar("swarmliar", sizes)
	h := e.node(harness.NodeOptions{Name: "honest", Registries: up, Index: "none", Observer: true})
	for _, im := range []*harness.Image{img, img2} {
		if err := h.PullCtr(e.ctx, im.Ref); err != nil {
			e.t.Fatal(err)
		}
	}
	v := e.node(harness.NodeOptions{Name: "v-swarm", Observer: true, Registries: up,
		Neighbors: []harness.Neighbor{h.AsNeighbor(), {Name: "swarmliar", URL: liar.srv.URL}}})
	err := e.timed("v-swarm: pull beside a swarm liar", pullTimeout, func(ctx context.Context) error { return v.PullCtr(ctx, img.Ref) })
	first := liar.gets.Load()
	var err2 error
	if err == nil {
		err2 = e.timed("v-swarm: the next image", pullTimeout, func(ctx context.Context) error { return v.PullCtr(ctx, img2.Ref) })
	}
	again := liar.gets.Load() - first
	e.verifyContent(v, "default")
	fromHonest := e.metric(v, "coop_mirror_peer_bytes_total", "node", "honest")
	want := "completed from the honest holder; the liar not asked again"
	var got string
	switch {
	case err != nil || err2 != nil:
		got = "pull failed"
	case first == 0:
		got = "the liar was never asked"
	case again > 0:
		got = fmt.Sprintf("the liar served %d chunks of the next image", again)
	case fromHonest < float64(img.LayerBytes()):
		got = fmt.Sprintf("only %.0f bytes from the honest holder", fromHonest)
	default:
		got = want
	}
	tb.add(secHostile, "a member says it is downloading every blob and serves corrupt chunks (swarm, observer mode)", want, got,
		fmt.Sprintf("liar served %d chunks, then %d; %.0f bytes from the honest holder; %s", first, again, fromHonest, errDetail(errors.Join(err, err2))))
}

// partialLiar is a member whose have answers say it is downloading every
// digest asked (with its right size), whose chunk maps have every chunk,
// and whose chunks are random bytes.
type partialLiar struct {
	srv   *httptest.Server
	sizes map[digest.Digest]int64
	gets  atomic.Int64
}

func (e *env) startPartialLiar(name string, sizes map[digest.Digest]int64) *partialLiar {
	l := &partialLiar{sizes: sizes}
	l.srv = e.startMember(name, http.HandlerFunc(l.serveHTTP))
	return l
}

func (l *partialLiar) serveHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.URL.Path == peers.HavePath:
		var req struct {
			Digests []digest.Digest `json:"digests"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		partial := []map[string]any{}
		for _, d := range req.Digests {
			if size, ok := l.sizes[d]; ok {
				partial = append(partial, map[string]any{"digest": d, "size": size})
			}
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"node": "swarmliar", "epoch": "e1", "seq": 1, "blobs": []any{}, "partial": partial})
	case strings.HasPrefix(r.URL.Path, peers.PartialPath+"/"):
		d := digest.Digest(strings.TrimPrefix(r.URL.Path, peers.PartialPath+"/"))
		size, ok := l.sizes[d]
		if !ok {
			http.NotFound(w, r)
			return
		}
		n := peers.Chunks(size, peers.SwarmChunk)
		_ = json.NewEncoder(w).Encode(peers.PartialStatus{Node: "swarmliar", Digest: d, Size: size, ChunkSize: peers.SwarmChunk,
			Have: bytes.Repeat([]byte{0xff}, (n+7)/8)})
	case strings.Contains(r.URL.Path, "/blobs/"):
		l.gets.Add(1)
		d := digest.Digest(r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:])
		a, b, _ := strings.Cut(strings.TrimPrefix(r.Header.Get("Range"), "bytes="), "-")
		off, err1 := strconv.ParseInt(a, 10, 64)
		last, err2 := strconv.ParseInt(b, 10, 64)
		if err1 != nil || err2 != nil || last < off || last-off > 64<<20 {
			http.Error(w, "range", http.StatusRequestedRangeNotSatisfiable)
			return
		}
		body := make([]byte, last-off+1)
		_, _ = rand.Read(body)
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, last, l.sizes[d]))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body)
	default:
		w.WriteHeader(http.StatusOK)
	}
}

// secSlowReaders: a member opens 20 blob GETs and stops reading. Another
// member's GET is still served, and the stalled answers are cut within
// the write-stall bound.
func secSlowReaders(e *env, tb *secTable) {
	t := e.t
	const stalled, size = 20, 32 << 20
	n := e.startBare("slow", freeAddr(t))
	d, err := n.Commit(e.ctx, size)
	if err != nil {
		t.Fatal(err)
	}
	blobPath := "/v2/coop/big/blobs/" + d.String()
	addr := strings.TrimPrefix(n.peer, "https://")
	mallory, err := e.pki.ClientTLSAs("mallory", filepath.Join(t.TempDir(), "mallory"))
	if err != nil {
		t.Fatal(err)
	}
	dialer := &net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return errors.Join(err, serr)
	}}
	var conns []*tls.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	stallStart := time.Now()
	for range stalled {
		c, err := tls.DialWithDialer(dialer, "tcp", addr, mallory)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", blobPath, addr); err != nil {
			t.Fatal(err)
		}
	}
	metric := func(name string) float64 {
		m, err := harness.FetchMetrics(e.ctx, e.http, n.peer)
		if err != nil {
			t.Fatal(err)
		}
		v, _ := m.Sum(name)
		return v
	}
	var held float64
	e.eventually("the stalled GETs hold upload slots", func() bool {
		held = metric(harness.MetricActiveUploads)
		return held > 0 && metric("coop_peer_client_busy_total")+held >= stalled
	})

	// Another member's GET, while the stalled ones hold their slots.
	b, err := e.pki.HTTPClientAs("b", filepath.Join(t.TempDir(), "b"))
	if err != nil {
		t.Fatal(err)
	}
	got := "served"
	detail := ""
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, n.peer+blobPath, nil)
	served := time.Now()
	resp, err := b.Do(req)
	if err != nil {
		got = "error"
		detail = err.Error()
	} else {
		h := sha256.New()
		nb, cerr := io.Copy(h, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || cerr != nil || "sha256:"+hex.EncodeToString(h.Sum(nil)) != d.String() {
			got = fmt.Sprintf("%s, %d bytes, %v", resp.Status, nb, cerr)
		}
		detail = fmt.Sprintf("%d MiB in %v while %v slots were held", nb>>20, time.Since(served).Round(time.Millisecond), held)
	}
	tb.add(secHostile, `a member's blob GET while "mallory" stalls 20 GETs`, "served", got, detail)

	// The stalled answers: cut within the bound. A piece of the answer
	// that completes re-arms the write deadline, and the stalled client's
	// kernel may still take a few bytes for seconds after the client
	// stopped reading (a zero-window probe meeting a collapsed receive
	// queue): measured, 15 s for most answers, 20 s for some.
	bound := peers.DefaultWriteStall + 10*time.Second
	for time.Since(stallStart) < bound && metric(harness.MetricActiveUploads) > 0 {
		time.Sleep(200 * time.Millisecond)
	}
	freed := time.Since(stallStart)
	var cut, refused, whole, other int
	for _, c := range conns {
		switch stalledOutcome(c, size) {
		case "cut":
			cut++
		case "429":
			refused++
		case "whole":
			whole++
		default:
			other++
		}
	}
	got = "cut within the bound"
	if freed >= bound || cut == 0 || whole > 0 || other > 0 {
		got = fmt.Sprintf("slots freed after %v; %d cut, %d whole, %d other", freed.Round(time.Second), cut, whole, other)
	}
	tb.add(secHostile, `20 blob GETs by "mallory" that stop reading`, "cut within the bound", got,
		fmt.Sprintf("%d held a slot and were cut, %d answered 429; slots free %v after the stall began (bound %v = write stall %v + 10 s)",
			cut, refused, freed.Round(time.Second), bound, peers.DefaultWriteStall))
}

// stalledOutcome reads what is left of a stalled GET: "429" (refused at
// once), "cut" (a 200 whose body ends short), "whole" (the blob arrived:
// never cut) or what else happened.
func stalledOutcome(c *tls.Conn, size int64) string {
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return "no answer: " + err.Error()
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusTooManyRequests {
		return "429"
	}
	n, err := io.Copy(io.Discard, resp.Body)
	var ne net.Error
	switch {
	case n >= size:
		return "whole"
	case errors.As(err, &ne) && ne.Timeout():
		return "still open"
	case resp.StatusCode == http.StatusOK:
		return "cut"
	default:
		return resp.Status
	}
}

// startSecKB runs `coop kb` (push feed, embedded broker, mutual TLS) with
// extra flags and returns its API and broker URLs.
func (e *env) startSecKB(extra ...string) (api, broker string) {
	e.t.Helper()
	apiAddr, natsAddr := e.runKB(append([]string{"--feed", "push"}, extra...)...)
	return "https://" + apiAddr, "tls://" + natsAddr
}

// impostorTLS is a client presenting a certificate named name from another
// CA than the cluster's. It accepts any server, so that only the server
// can refuse.
func (e *env) impostorTLS(name string) *tls.Config {
	e.t.Helper()
	other, err := harness.NewPKI(e.t.TempDir())
	if err != nil {
		e.t.Fatal(err)
	}
	cfg, err := other.ClientTLSAs(name, filepath.Join(e.t.TempDir(), "impostor-"+name))
	if err != nil {
		e.t.Fatal(err)
	}
	cfg = cfg.Clone()
	cfg.VerifyConnection = nil
	return cfg
}

// secDo sends one request and returns its status.
func secDo(ctx context.Context, c *http.Client, method, url string, body []byte) (int, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	code, _, err := secAnswer(c, req)
	return code, err
}

// secAnswer sends req and returns the status and (the first MiB of) the
// body.
func secAnswer(c *http.Client, req *http.Request) (int, []byte, error) {
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, b, err
}

// statusOutcome is a request's status, or its error.
func statusOutcome(code int, err error) string {
	if err != nil {
		return "error: " + err.Error()
	}
	return strconv.Itoa(code)
}

// tlsAttempt sends one bodiless request to addr over TLS with cfg and
// returns whether the server refused the handshake (an alert from it: in
// TLS 1.3 the client reads it after its own handshake is done), or what it
// answered instead; and the error, for the table.
func tlsAttempt(addr string, cfg *tls.Config, method, path string) (got, detail string) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err == nil {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", method, path, addr)
	}
	if err == nil {
		var resp *http.Response
		if resp, err = http.ReadResponse(bufio.NewReader(c), nil); err == nil {
			resp.Body.Close()
			return "answered " + resp.Status, ""
		}
	}
	// crypto/tls reports an alert received as a net.OpError "remote error".
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" {
		return refusedHandshake, err.Error()
	}
	return "error: " + err.Error(), err.Error()
}

func errDetail(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// refusal is the gist of coop's error in a command's failure: from its
// "coop: " on, at most 200 bytes.
func refusal(err error) string {
	if err == nil {
		return ""
	}
	s := err.Error()
	if _, after, ok := strings.Cut(s, "coop: "); ok {
		s = after
	}
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// taskState is the state ctr lists for task id on n.
func taskState(e *env, n *harness.Node, id string) string {
	out, err := n.Ctr(e.ctx, "task", "ls")
	if err != nil {
		return err.Error()
	}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 3 && f[0] == id {
			return f[2]
		}
	}
	return "absent"
}

// coopPID finds the pid of n's coop node: the process whose command line
// names n's content socket.
func coopPID(n *harness.Node) int {
	entries, _ := os.ReadDir("/proc")
	for _, de := range entries {
		pid, err := strconv.Atoi(de.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", de.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) > 1 && args[1] == "node" && slices.Contains(args, n.ContentSocket) {
			return pid
		}
	}
	return 0
}

// peakRSS is the process's peak resident set (VmHWM), in bytes; 0 if
// unknown.
func peakRSS(pid int) int64 {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) == 2 && f[1] == "kB" {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}
