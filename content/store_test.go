package content

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/content/testsuite"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestContentSuite(t *testing.T) {
	testsuite.ContentSuite(t, "coop", func(ctx context.Context, root string) (context.Context, ctdcontent.Store, func() error, error) {
		s, err := NewStore(ctx, root, NewInventory())
		if err != nil {
			return nil, nil, nil, err
		}
		return ctx, s, func() error { return nil }, nil
	})
}

func write(ctx context.Context, t *testing.T, s ctdcontent.Store, ref string, data []byte, expected digest.Digest) {
	t.Helper()
	w, err := s.Writer(ctx, ctdcontent.WithRef(ref))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(ctx, int64(len(data)), expected); err != nil && !errdefs.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

func TestStoreRecordsInventory(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	inv := NewInventory()
	s, err := NewStore(ctx, root, inv)
	if err != nil {
		t.Fatal(err)
	}
	a := []byte("with an expected digest")
	b := bytes.Repeat([]byte("x"), 1<<20+3)
	write(ctx, t, s, "a", a, digest.FromBytes(a))
	write(ctx, t, s, "b", b, "") // as ctr import does: no expected digest
	if got := inv.Snapshot().Seq; got != 2 {
		t.Fatalf("seq after two commits = %d, want 2", got)
	}
	if n, ok := inv.Size(digest.FromBytes(b)); !ok || n != int64(len(b)) {
		t.Fatalf("blob committed without a digest: size %d held %v", n, ok)
	}
	write(ctx, t, s, "a2", a, digest.FromBytes(a)) // already exists: no change
	if got := inv.Snapshot().Seq; got != 2 {
		t.Fatalf("seq after a duplicate commit = %d, want 2", got)
	}
	if err := s.Delete(ctx, digest.FromBytes(a)); err != nil {
		t.Fatal(err)
	}
	if _, ok := inv.Size(digest.FromBytes(a)); ok {
		t.Fatal("deleted blob still in the inventory")
	}
	if got := inv.Snapshot().Seq; got != 3 {
		t.Fatalf("seq after delete = %d, want 3", got)
	}
	if err := s.Delete(ctx, digest.FromBytes(a)); !errdefs.IsNotFound(err) {
		t.Fatalf("second delete: %v, want not found", err)
	}

	// A restart walks the store: new epoch, same blobs.
	inv2 := NewInventory()
	if _, err := NewStore(ctx, root, inv2); err != nil {
		t.Fatal(err)
	}
	if inv2.Epoch() == inv.Epoch() {
		t.Fatal("restart kept the epoch")
	}
	got := inv2.Have([]digest.Digest{digest.FromBytes(a), digest.FromBytes(b)})
	want := []Blob{{Digest: digest.FromBytes(b), Size: int64(len(b))}}
	if len(got) != 1 || got[0] != want[0] {
		t.Fatalf("rebuilt inventory = %v, want %v", got, want)
	}
}

func TestInventoryWatch(t *testing.T) {
	inv := NewInventory()
	var got []Change
	stop := inv.Watch(func(c Change) { got = append(got, c) })
	d := digest.FromString("x")
	inv.Add(d, 1)
	inv.Add(d, 1) // no change
	inv.Remove(d)
	inv.Remove(d) // no change
	stop()
	inv.Add(d, 1)
	if len(got) != 2 {
		t.Fatalf("changes = %d, want 2: %+v", len(got), got)
	}
	if got[0].Seq != 1 || len(got[0].Added) != 1 || got[1].Seq != 2 || got[1].Removed[0] != d {
		t.Fatalf("unexpected changes %+v", got)
	}
}

func TestInventorySince(t *testing.T) {
	inv := NewInventorySize(3)
	var ds []digest.Digest
	for i := range 5 {
		d := digest.FromString(string(rune('a' + i)))
		ds = append(ds, d)
		inv.Add(d, int64(i))
	}
	epoch, seq := inv.Version()
	if seq != 5 {
		t.Fatalf("seq %d", seq)
	}
	for _, tc := range []struct {
		name  string
		epoch string
		from  uint64
		ok    bool
		n     int
	}{
		{"up to date", epoch, 5, true, 0},
		{"last two", epoch, 3, true, 2},
		{"whole log", epoch, 2, true, 3},
		{"older than the log", epoch, 1, false, 0},
		{"future", epoch, 6, false, 0},
		{"other epoch", "x", 4, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs, cur, ok := inv.Since(tc.epoch, tc.from)
			if ok != tc.ok || len(cs) != tc.n || cur != 5 {
				t.Fatalf("Since: %d changes, cur %d, ok %v", len(cs), cur, ok)
			}
			for i, c := range cs {
				if c.Seq != tc.from+uint64(i)+1 || c.Added[0].Digest != ds[c.Seq-1] {
					t.Fatalf("change %d: %+v", i, c)
				}
			}
		})
	}
}

// A store with ExpectedSizes learns the sizes of the blobs a manifest names
// when the manifest is committed to it, and nothing from other blobs.
func TestStoreLearnsSizes(t *testing.T) {
	ctx := context.Background()
	sizes := NewExpectedSizes(0)
	s, err := NewStore(ctx, t.TempDir(), NewInventory(), WithExpectedSizes(sizes))
	if err != nil {
		t.Fatal(err)
	}
	layer := digest.FromString("layer")
	m, err := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromString("cfg"), Size: 2},
		Layers: []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: layer, Size: 12345}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range [][]byte{[]byte("{not a manifest"), []byte("\x1f\x8b layer bytes"), m} {
		if err := ctdcontent.WriteBlob(ctx, s, "b", bytes.NewReader(b), ocispec.Descriptor{Digest: digest.FromBytes(b), Size: int64(len(b))}); err != nil {
			t.Fatal(err)
		}
	}
	if got, ok := sizes.Size(layer); !ok || got != 12345 || sizes.Len() != 2 {
		t.Fatalf("learned %d (%v) for the layer, %d sizes in all; want 12345 and 2 (config, layer)", got, ok, sizes.Len())
	}
}
