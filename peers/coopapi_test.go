package peers

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/log/logtest"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

func TestServerInventory(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 1024)
	ts := f.start(ctx, t)

	resp, body := do(t, ts, http.MethodGet, InventoryPath, nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type %q", ct)
	}
	var got InventoryResponse
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatal(err)
	}
	snap := f.inv.Snapshot()
	if got.Node != "node-a" || got.Epoch != snap.Epoch || got.Seq != snap.Seq || len(got.Blobs) != len(snap.Blobs) {
		t.Fatalf("inventory %s/%s/%d with %d blobs, want node-a/%s/%d with %d", got.Node, got.Epoch, got.Seq, len(got.Blobs), snap.Epoch, snap.Seq, len(snap.Blobs))
	}
	for i, b := range snap.Blobs {
		if got.Blobs[i] != b {
			t.Fatalf("blob %d: %v, want %v", i, got.Blobs[i], b)
		}
	}

	t.Run("empty inventory is a list", func(t *testing.T) {
		inv := content.NewInventory()
		srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: inv})
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodGet, InventoryPath, nil))
		if !strings.Contains(rec.Body.String(), `"blobs":[]`) {
			t.Fatalf("empty inventory: %s", rec.Body)
		}
	})

	t.Run("post", func(t *testing.T) {
		resp, body := do(t, ts, http.MethodPost, InventoryPath, nil, strings.NewReader("{}"))
		if resp.StatusCode != http.StatusMethodNotAllowed || errorCode(body) != CodeUnsupported || resp.Header.Get("Allow") != "GET, HEAD" {
			t.Fatalf("POST inventory: %d %q %s", resp.StatusCode, resp.Header.Get("Allow"), body)
		}
	})
}

func TestServerHave(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 1024)
	ts := f.start(ctx, t)

	digests := func(n int) string {
		ds := make([]digest.Digest, n)
		for i := range ds {
			ds[i] = digest.FromString(strconv.Itoa(i))
		}
		b, _ := json.Marshal(HaveRequest{Digests: ds})
		return string(b)
	}
	for _, tc := range []struct {
		name   string
		method string
		body   string
		status int
		code   string
		want   []content.Blob
	}{
		{name: "some held", method: "POST", body: fmt.Sprintf(`{"digests":[%q,%q,%q]}`, f.bigD, f.missingD, f.smallD), status: 200,
			want: []content.Blob{{Digest: f.bigD, Size: int64(len(f.big))}, {Digest: f.smallD, Size: int64(len(f.small))}}},
		{name: "none asked", method: "POST", body: `{"digests":[]}`, status: 200, want: []content.Blob{}},
		{name: "at the limit", method: "POST", body: digests(MaxHaveDigests), status: 200, want: []content.Blob{}},
		{name: "too many digests", method: "POST", body: digests(MaxHaveDigests + 1), status: 413, code: CodeSizeInvalid},
		{name: "invalid json", method: "POST", body: `{"digests":[`, status: 400, code: CodeInvalidArgument},
		{name: "trailing data", method: "POST", body: `{"digests":[]} {}`, status: 400, code: CodeInvalidArgument},
		{name: "invalid digest", method: "POST", body: fmt.Sprintf(`{"digests":[%q,"sha256:nope"]}`, f.bigD), status: 400, code: CodeDigestInvalid},
		{name: "get", method: "GET", status: 405, code: CodeUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := do(t, ts, tc.method, HavePath, map[string]string{"Content-Type": "application/json"}, strings.NewReader(tc.body))
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d; body %.300s", resp.StatusCode, tc.status, body)
			}
			if tc.code != "" {
				if got := errorCode(body); got != tc.code {
					t.Fatalf("error code %q, want %q; body %s", got, tc.code, body)
				}
				return
			}
			var got HaveResponse
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatal(err)
			}
			if got.Node != "node-a" || got.Epoch != f.inv.Epoch() || got.Seq != f.inv.Snapshot().Seq {
				t.Fatalf("answer from %s/%s/%d", got.Node, got.Epoch, got.Seq)
			}
			if got.Blobs == nil || len(got.Blobs) != len(tc.want) {
				t.Fatalf("blobs %v, want %v", got.Blobs, tc.want)
			}
			for i := range tc.want {
				if got.Blobs[i] != tc.want[i] {
					t.Fatalf("blobs %v, want %v", got.Blobs, tc.want)
				}
			}
		})
	}

	// Straight to the handler: a client may not finish sending a body the
	// server stopped reading.
	t.Run("oversized body", func(t *testing.T) {
		body := `{"digests":["` + strings.Repeat("a", maxHaveBody) + `"]}`
		rec := httptest.NewRecorder()
		f.srv.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodPost, HavePath, strings.NewReader(body)))
		if rec.Code != http.StatusRequestEntityTooLarge || errorCode(rec.Body.Bytes()) != CodeSizeInvalid {
			t.Fatalf("oversized have: %d %s", rec.Code, rec.Body)
		}
	})
}

// TestInventorySince: the client's incremental reads, against a real server
// over an inventory with a small log.
func TestInventorySince(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	f := newFixture(ctx, t, 16)
	inv := content.NewInventorySize(4)
	srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: inv})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	c := &Client{HTTP: ts.Client(), Node: "t"}
	a, b, d := digest.FromString("a"), digest.FromString("b"), digest.FromString("d")
	inv.Add(a, 1)
	inv.Add(b, 2)
	epoch, seq := inv.Version()
	inv.Add(d, 3)
	inv.Remove(a)
	inv.Add(a, 1)
	inv.Remove(b)

	got, err := c.Inventory(ctx, ts.URL, epoch, seq)
	if err != nil {
		t.Fatal(err)
	}
	if got.Full || got.Seq != seq+4 || len(got.Blobs) != 0 {
		t.Fatalf("incremental answer %+v", got)
	}
	// Net effect: d and a added (a re-added wins over its removal), b removed.
	if len(got.Added) != 2 || got.Added[0].Digest != d || got.Added[1].Digest != a || len(got.Removed) != 1 || got.Removed[0] != b {
		t.Fatalf("changes %+v", got)
	}
	for _, tc := range []struct {
		name  string
		epoch string
		seq   uint64
	}{
		{"no since", "", 0},
		{"other epoch", "other", seq},
		{"from the future", epoch, seq + 100},
		{"older than the log", epoch, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.Inventory(ctx, ts.URL, tc.epoch, tc.seq)
			if err != nil {
				t.Fatal(err)
			}
			if !got.Full || got.Epoch != epoch || len(got.Blobs) != 2 {
				t.Fatalf("want the whole inventory, got %+v", got)
			}
		})
	}
	for _, bad := range []string{"nocolon", ":5", "e:-1", "e:x"} {
		resp, body := do(t, ts, http.MethodGet, InventoryPath+"?since="+bad, nil, nil)
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("since=%s: status %d: %s", bad, resp.StatusCode, body)
		}
	}
}
