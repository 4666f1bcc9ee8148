package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
)

// answerTransport answers every request 200 with body.
type answerTransport []byte

func (b answerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return &http.Response{
		StatusCode: http.StatusOK,
		Header:     http.Header{"Content-Type": {"application/json"}},
		Body:       io.NopCloser(bytes.NewReader(b)),
		Request:    r,
	}, nil
}

// FuzzClientInventory checks the client's reading of an inventory answer
// (full or since): whatever a peer sends, an answer the client accepts has
// a valid epoch, digests and sizes and survives encoding again unchanged;
// one it refuses is ErrDataLoss. Seeds: testdata/fuzz/FuzzClientInventory.
func FuzzClientInventory(f *testing.F) {
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, body []byte, since bool) {
		c := &Client{HTTP: &http.Client{Transport: answerTransport(body)}, Node: "t"}
		epoch := ""
		if since {
			epoch = "e"
		}
		ir, err := c.Inventory(ctx, "http://peer", epoch, 7)
		if err != nil {
			if !errdefs.IsDataLoss(err) {
				t.Fatalf("%q: error %v is not data loss", body, err)
			}
			return
		}
		if err := ir.Validate(); err != nil {
			t.Fatalf("%q: accepted %+v: %v", body, ir, err)
		}
		b, err := json.Marshal(ir)
		if err != nil {
			t.Fatal(err)
		}
		var again InventoryResponse
		if err := json.Unmarshal(b, &again); err != nil || !reflect.DeepEqual(noEmpty(&again), noEmpty(ir)) {
			t.Fatalf("%q: accepted %+v, which encodes to %s and decodes to %+v, %v", body, ir, b, again, err)
		}
	})
}

// noEmpty returns a copy of ir with empty Added and Removed as nil: they
// are left out of the JSON when empty.
func noEmpty(ir *InventoryResponse) InventoryResponse {
	c := *ir
	if len(c.Added) == 0 {
		c.Added = nil
	}
	if len(c.Removed) == 0 {
		c.Removed = nil
	}
	if len(c.Partial) == 0 {
		c.Partial = nil
	}
	return c
}

// FuzzClientContainer checks the client's reading of a container record:
// an accepted record names an image and a valid target and carries a JSON
// spec; a refused one is ErrDataLoss. Seeds: testdata/fuzz/FuzzClientContainer.
func FuzzClientContainer(f *testing.F) {
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, body []byte) {
		c := &Client{HTTP: &http.Client{Transport: answerTransport(body)}, Node: "t"}
		rec, err := c.Container(ctx, "http://peer", "default", "web")
		if err != nil {
			if !errdefs.IsDataLoss(err) {
				t.Fatalf("%q: error %v is not data loss", body, err)
			}
			return
		}
		if rec.Image == "" || rec.Target.Digest.Validate() != nil || !json.Valid(rec.Spec) {
			t.Fatalf("%q: accepted %+v", body, rec)
		}
	})
}

// FuzzClientPartialStatus checks the client's reading of a chunk map: an
// answer it accepts is for the blob asked, within the bounds, with bitmaps
// of the right length (or Whole); one it refuses is ErrDataLoss.
func FuzzClientPartialStatus(f *testing.F) {
	ctx := context.Background()
	d := "sha256:" + strings.Repeat("ab", 32)
	f.Add([]byte(`{"node":"a","digest":"`+d+`","size":200000,"chunk_size":65536,"have":"Dw==","fetching":"AA=="}`), int64(200000))
	f.Add([]byte(`{"node":"a","digest":"`+d+`","size":5,"whole":true}`), int64(5))
	f.Add([]byte(`{"digest":"`+d+`","size":1e18,"chunk_size":1}`), int64(0))
	f.Fuzz(func(t *testing.T, body []byte, size int64) {
		c := &Client{HTTP: &http.Client{Transport: answerTransport(body)}, Node: "t"}
		st, err := c.PartialStatus(ctx, "http://peer", digest.Digest(d), size)
		if err != nil {
			if !errdefs.IsDataLoss(err) {
				t.Fatalf("%q: error %v is not data loss", body, err)
			}
			return
		}
		if st.Digest != digest.Digest(d) || (size > 0 && st.Size != size) || st.Size <= 0 {
			t.Fatalf("%q: accepted %+v", body, st)
		}
		if !st.Whole {
			n := Chunks(st.Size, st.ChunkSize)
			if st.ChunkSize < MinPartialChunk || n > MaxPartialChunks || len(st.Have) != (n+7)/8 {
				t.Fatalf("%q: accepted %+v", body, st)
			}
		}
	})
}
