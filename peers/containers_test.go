package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/log/logtest"
	"github.com/coopnet/coop/peers/trust"
)

type fakeContainers struct {
	mu      sync.Mutex
	stopped []string
}

func (f *fakeContainers) Record(_ context.Context, ns, id string) (*ContainerRecord, error) {
	if id != "web" {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return &ContainerRecord{Namespace: ns, ID: id, Image: "registry.example/web:1", Spec: []byte(`{"ociVersion":"1.2.0"}`), Runtime: "io.containerd.runc.v2"}, nil
}

func (f *fakeContainers) Stop(_ context.Context, ns, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stopped = append(f.stopped, ns+"/"+id)
	return nil
}

func (f *fakeContainers) stops() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.stopped...)
}

// TestServerContainers: records are off without Containers, served only
// for the listed namespaces, and the stop only with AllowStop.
func TestServerContainers(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 16)
	type req struct {
		method, path string
		status       int
		code         string // "" for a success
	}
	const web, stop = ContainersPath + "/default/web", ContainersPath + "/default/web/stop"
	for _, tc := range []struct {
		name      string
		serve     bool // Containers set
		nss       []string
		allowStop bool
		reqs      []req
		stopped   int
	}{
		{"off", false, nil, false, []req{
			{"GET", web, 403, CodeDenied},
			{"HEAD", web, 403, ""},
			{"POST", stop, 403, CodeDenied},
			{"GET", ContainersPath + "/default", 403, CodeDenied},
		}, 0},
		{"listed namespaces", true, []string{"default", "k8s.io"}, false, []req{
			{"GET", web, 200, ""},
			{"HEAD", web, 200, ""},
			{"GET", ContainersPath + "/k8s.io/web", 200, ""},
			{"GET", ContainersPath + "/default/nope", 404, CodeNotFound},
			{"GET", ContainersPath + "/secret/web", 403, CodeDenied},
			{"GET", ContainersPath + "/defaul/web", 403, CodeDenied},
			{"GET", ContainersPath + "/default", 404, CodeNotFound},
			{"GET", ContainersPath + "/default/web/x", 404, CodeNotFound},
			{"PUT", web, 405, CodeUnsupported},
			{"GET", stop, 405, CodeUnsupported},
			{"POST", stop, 403, CodeDenied},
		}, 0},
		{"stop allowed", true, []string{"default"}, true, []req{
			{"GET", web, 200, ""},
			{"POST", ContainersPath + "/secret/web/stop", 403, CodeDenied},
			{"POST", stop, 204, ""},
		}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fc := &fakeContainers{}
			opts := ServerOptions{Node: "n", Store: f.store, Inventory: f.inv, ContainerNamespaces: tc.nss, AllowStop: tc.allowStop}
			if tc.serve {
				opts.Containers = fc
			}
			srv, err := NewServer(opts)
			if err != nil {
				t.Fatal(err)
			}
			ts := httptest.NewServer(srv)
			defer ts.Close()
			for _, rq := range tc.reqs {
				resp, body := do(t, ts, rq.method, rq.path, nil, nil)
				if resp.StatusCode != rq.status || (rq.code != "" && errorCode(body) != rq.code) {
					t.Fatalf("%s %s: %d %s, want %d %s", rq.method, rq.path, resp.StatusCode, body, rq.status, rq.code)
				}
				if rq.status == 200 && rq.method == "GET" {
					var rec ContainerRecord
					if err := json.Unmarshal(body, &rec); err != nil || rec.ID != "web" || rec.Node != "n" || string(rec.Spec) != `{"ociVersion":"1.2.0"}` {
						t.Fatalf("record %s (%v)", body, err)
					}
				}
			}
			if got := fc.stops(); len(got) != tc.stopped {
				t.Fatalf("stopped %v, want %d stops", got, tc.stopped)
			}
		})
	}
	// Off says how to turn it on.
	resp, body := do(t, f.start(ctx, t), "GET", web, nil, nil)
	if resp.StatusCode != 403 || !strings.Contains(string(body), "--serve-containers") {
		t.Fatalf("records off: %d %s", resp.StatusCode, body)
	}
}

func TestNewServerValidatesContainers(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 16)
	fc := &fakeContainers{}
	for _, tc := range []struct {
		name string
		opts ServerOptions
	}{
		{"records without namespaces", ServerOptions{Containers: fc}},
		{"namespaces without records", ServerOptions{ContainerNamespaces: []string{"default"}}},
		{"stop without records", ServerOptions{AllowStop: true}},
		{"empty namespace", ServerOptions{Containers: fc, ContainerNamespaces: []string{"default", ""}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.opts
			o.Node, o.Store, o.Inventory = "n", f.store, f.inv
			if _, err := NewServer(o); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("NewServer: %v, want invalid argument", err)
			}
		})
	}
}

// syncBuffer is a log output read by the test while servers write to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestServerContainersAuthenticated: behind Authenticated over mutual TLS,
// a client without a certificate gets 401 before any record is read, and a
// cluster member gets the record and the stop, each logged with its name.
func TestServerContainersAuthenticated(t *testing.T) {
	root := t.TempDir()
	ca := filepath.Join(root, "ca")
	if err := trust.InitCA(ca, trust.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	creds := map[string]*trust.Credentials{}
	for _, name := range []string{"src", "dst"} {
		if err := trust.Issue(ca, filepath.Join(root, name), trust.IssueOptions{Name: name}); err != nil {
			t.Fatal(err)
		}
		c, err := trust.Load(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		creds[name] = c
	}
	ctx := logtest.WithT(context.Background(), t)
	logs := &syncBuffer{}
	log.G(ctx).Logger.SetOutput(logs)
	f := newFixture(ctx, t, 16)
	fc := &fakeContainers{}
	srv, err := NewServer(ServerOptions{Node: "src", Store: f.store, Inventory: f.inv,
		Containers: fc, ContainerNamespaces: []string{"default"}, AllowStop: true})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(Authenticated(srv, OpenPaths...))
	ts.Config.BaseContext = func(net.Listener) context.Context { return ctx }
	ts.TLS = creds["src"].ServerConfig()
	ts.StartTLS()
	defer ts.Close()

	member := &http.Client{Transport: &http.Transport{TLSClientConfig: creds["dst"].ClientConfig()}, Timeout: 5 * time.Second}
	stranger := creds["dst"].ClientConfig()
	stranger.Certificates, stranger.GetClientCertificate = nil, nil
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: stranger}, Timeout: 5 * time.Second}
	for _, tc := range []struct {
		name         string
		c            *http.Client
		method, path string
		status       int
	}{
		{"stranger's record", anon, "GET", ContainersPath + "/default/web", 401},
		{"stranger's stop", anon, "POST", ContainersPath + "/default/web/stop", 401},
		{"member's record", member, "GET", ContainersPath + "/default/web", 200},
		{"member's unlisted namespace", member, "GET", ContainersPath + "/k8s.io/web", 403},
		{"member's stop", member, "POST", ContainersPath + "/default/web/stop", 204},
	} {
		req, err := http.NewRequest(tc.method, ts.URL+tc.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := tc.c.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Fatalf("%s: %d, want %d", tc.name, resp.StatusCode, tc.status)
		}
	}
	if got := fc.stops(); len(got) != 1 {
		t.Fatalf("stopped %v, want the member's one stop", got)
	}
	out := logs.String()
	for _, want := range []string{"container record served", "container stopped for a peer", "namespace not served"} {
		found := false
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, want) && strings.Contains(l, "asker=dst") {
				found = true
			}
		}
		if !found {
			t.Errorf("no %q line naming the asker dst in the logs:\n%s", want, out)
		}
	}
}
