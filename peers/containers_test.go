package peers

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/log/logtest"
)

type fakeContainers struct{ stopped []string }

func (f *fakeContainers) Record(_ context.Context, ns, id string) (*ContainerRecord, error) {
	if id != "web" {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return &ContainerRecord{Namespace: ns, ID: id, Image: "registry.example/web:1", Spec: []byte(`{"ociVersion":"1.2.0"}`), Runtime: "io.containerd.runc.v2"}, nil
}

func (f *fakeContainers) Stop(_ context.Context, ns, id string) error {
	f.stopped = append(f.stopped, ns+"/"+id)
	return nil
}

func TestServerContainers(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 16)
	for _, allow := range []bool{false, true} {
		fc := &fakeContainers{}
		srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: f.inv, Containers: fc, AllowStop: allow})
		if err != nil {
			t.Fatal(err)
		}
		ts := httptest.NewServer(srv)
		for _, tc := range []struct {
			method, path string
			status       int
		}{
			{"GET", ContainersPath + "/default/web", 200},
			{"GET", ContainersPath + "/default/nope", 404},
			{"GET", ContainersPath + "/default", 404},
			{"PUT", ContainersPath + "/default/web", 405},
			{"GET", ContainersPath + "/default/web/stop", 405},
			{"POST", ContainersPath + "/default/web/stop", map[bool]int{false: 403, true: 204}[allow]},
		} {
			resp, body := do(t, ts, tc.method, tc.path, nil, nil)
			if resp.StatusCode != tc.status {
				t.Fatalf("allow=%v %s %s: %d, want %d: %s", allow, tc.method, tc.path, resp.StatusCode, tc.status, body)
			}
			if tc.status == 200 {
				var rec ContainerRecord
				if err := json.Unmarshal(body, &rec); err != nil || rec.ID != "web" || string(rec.Spec) != `{"ociVersion":"1.2.0"}` {
					t.Fatalf("record %s (%v)", body, err)
				}
			}
		}
		if got := len(fc.stopped); (got == 1) != allow {
			t.Fatalf("allow=%v: stopped %v", allow, fc.stopped)
		}
		ts.Close()
	}
	// Without containerd the endpoint says so.
	resp, _ := do(t, f.start(ctx, t), "GET", ContainersPath+"/default/web", nil, nil)
	if resp.StatusCode != 404 {
		t.Fatalf("no containerd: %d", resp.StatusCode)
	}
}
