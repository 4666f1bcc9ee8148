package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coopnet/coop/plugin/node"
	"github.com/coopnet/coop/resolver/clusterkb"
)

func TestStatusCommand(t *testing.T) {
	now := time.Now()
	healthy := node.Status{Node: "n1", Started: now.Add(-time.Hour), ContentMode: "observer", Advertise: "https://n1:5050",
		TLSNotAfter: now.Add(365 * 24 * time.Hour), Index: node.IndexStatus{Mode: "kb", KB: "ok"},
		Neighbors: []node.NeighborStatus{
			{Name: "n2", URL: "https://n2:5050", Up: true, RTT: 3 * time.Millisecond, ActiveUploads: 1, MaxUploads: 16, Bandwidth: 12 << 20},
			{Name: "n3", URL: "https://n3:5050", Error: "connection refused"},
		},
		Blobs:   node.BlobStatus{Held: 42, InFlight: 1},
		Bytes:   node.ByteStatus{ServedToPeers: 3 << 30, FromPeers: map[string]int64{"n2": 512 << 20}, FromRegistries: 10 << 20},
		Members: []clusterkb.NodeInfo{{Name: "n1", URL: "https://n1:5050", Blobs: 42, LastHeartbeat: now}},
		Errors:  []node.LogEntry{{Time: now, Level: "warning", Message: "peer transfer failed", Error: "stalled"}},
	}
	broken := healthy
	broken.Problems = []string{"ClusterKB does not answer: timeout"}
	for _, tc := range []struct {
		name    string
		status  node.Status
		args    []string
		wantErr error
		want    []string
	}{
		{"healthy", healthy, nil, nil, []string{"coop node n1: OK", "observer", "index     kb; ClusterKB ok", "42 held, 1 in flight",
			"served to peers 3.00 GiB", "n2 512.0 MiB", "from registries 10.0 MiB", "n2  ", "up 3ms", "1/16", "12.0 MiB/s", "n3: connection refused",
			"MEMBER", "peer transfer failed: stalled"}},
		{"problems", broken, nil, errProblems, []string{"1 PROBLEM(S)", "! ClusterKB does not answer: timeout"}},
		{"json", healthy, []string{"--json"}, nil, []string{`"node": "n1"`, `"from_registries": 10485760`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var asked string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				asked = r.URL.String()
				_ = json.NewEncoder(w).Encode(tc.status)
			}))
			defer srv.Close()
			var out bytes.Buffer
			err := runStatus(context.Background(), append([]string{"--node", srv.URL, "--all"}, tc.args...), &out, &out)
			if !errors.Is(err, tc.wantErr) && err != tc.wantErr { //nolint:errorlint // nil or the sentinel
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if asked != node.StatusPath+"?all=1" {
				t.Fatalf("asked %q", asked)
			}
			for _, w := range tc.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
		})
	}
	// No node: a clear error, exit status 2.
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	var out bytes.Buffer
	err := runStatus(context.Background(), []string{"--node", url}, &out, &out)
	if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "no coop node answers") {
		t.Fatalf("a node that is not there: %v", err)
	}
}
