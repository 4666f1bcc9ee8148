package resolver

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// fullReader answers every inventory read with a fixed full inventory.
type fullReader struct {
	inv   peers.InventoryResponse
	calls atomic.Int32
}

func (f *fullReader) Inventory(context.Context, string, string, uint64) (*peers.InventoryResponse, error) {
	f.calls.Add(1)
	r := f.inv
	return &r, nil
}

func TestSyncCarriesLoad(t *testing.T) {
	d := digest.FromString("d")
	r := &fullReader{inv: peers.InventoryResponse{Node: "n1", Epoch: "e", Seq: 1, Full: true,
		Blobs: []content.Blob{{Digest: d, Size: 5}}, Load: &peers.Load{ActiveUploads: 3, MaxUploads: 4}}}
	x := NewIndex()
	if err := Sync(context.Background(), x, r, Neighbor{Name: "n1", URL: "http://n1"}, nil, "poll"); err != nil {
		t.Fatal(err)
	}
	cs := x.Locate([]digest.Digest{d}, LocateOptions{})[d]
	if len(cs) != 1 || cs[0].Load == nil || cs[0].Load.ActiveUploads != 3 || cs[0].Load.MaxUploads != 4 {
		t.Fatalf("candidates %+v: want n1 with its load", cs)
	}
	// A node answering under another name is refused.
	r.inv.Node = "impostor"
	if err := Sync(context.Background(), x, r, Neighbor{Name: "n1", URL: "http://n1"}, nil, "poll"); err == nil {
		t.Fatal("sync accepted an answer from another node")
	}
}
