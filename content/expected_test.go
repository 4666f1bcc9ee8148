package content

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestManifestChildren(t *testing.T) {
	cfg := digest.FromString("config")
	l1, l2 := digest.FromString("layer1"), digest.FromString("layer2")
	m1 := digest.FromString("manifest1")
	desc := func(d digest.Digest, size int64) string {
		return fmt.Sprintf(`{"mediaType":"application/octet-stream","digest":%q,"size":%d}`, d, size)
	}
	manifest := fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":%s,"layers":[%s,%s]}`,
		ocispec.MediaTypeImageManifest, desc(cfg, 10), desc(l1, 100), desc(l2, 200))
	for _, tc := range []struct {
		name string
		doc  string
		want map[digest.Digest]int64
	}{
		{"oci manifest", manifest, map[digest.Digest]int64{cfg: 10, l1: 100, l2: 200}},
		{"leading space", "  \n" + manifest, map[digest.Digest]int64{cfg: 10, l1: 100, l2: 200}},
		{"docker manifest", fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":%s,"layers":[%s]}`,
			mediaTypeDockerManifest, desc(cfg, 10), desc(l1, 100)), map[digest.Digest]int64{cfg: 10, l1: 100}},
		{"oci index", fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[%s]}`,
			ocispec.MediaTypeImageIndex, desc(m1, 500)), map[digest.Digest]int64{m1: 500}},
		{"docker list", fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[%s]}`,
			mediaTypeDockerList, desc(m1, 500)), map[digest.Digest]int64{m1: 500}},
		{"manifest without media type", fmt.Sprintf(`{"schemaVersion":2,"config":%s,"layers":[%s]}`,
			desc(cfg, 10), desc(l1, 100)), map[digest.Digest]int64{cfg: 10, l1: 100}},
		{"index without media type", fmt.Sprintf(`{"schemaVersion":2,"manifests":[%s]}`, desc(m1, 500)),
			map[digest.Digest]int64{m1: 500}},
		{"bad children skipped", fmt.Sprintf(`{"schemaVersion":2,"config":%s,"layers":[%s,%s,{"digest":"sha256:zz","size":5}]}`,
			desc(cfg, 10), desc(l1, 0), desc(l2, -4)), map[digest.Digest]int64{cfg: 10}},
		{"manifest with manifests", fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"config":%s,"manifests":[%s]}`,
			ocispec.MediaTypeImageManifest, desc(cfg, 10), desc(m1, 5)), nil},
		{"index with layers", fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"layers":[%s],"manifests":[%s]}`,
			ocispec.MediaTypeImageIndex, desc(l1, 10), desc(m1, 5)), nil},
		{"other media type", fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.config.v1+json","config":%s}`, desc(cfg, 10)), nil},
		{"schema 1", fmt.Sprintf(`{"schemaVersion":1,"config":%s}`, desc(cfg, 10)), nil},
		{"a config", `{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`, nil},
		{"not json", "\x1f\x8b\x08\x00gzip", nil},
		{"truncated", manifest[:len(manifest)-3], nil},
		{"empty", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := map[digest.Digest]int64{}
			for _, d := range ManifestChildren([]byte(tc.doc)) {
				got[d.Digest] = d.Size
			}
			if len(got) != len(tc.want) {
				t.Fatalf("children %v, want %v", got, tc.want)
			}
			for d, s := range tc.want {
				if got[d] != s {
					t.Fatalf("children %v, want %v", got, tc.want)
				}
			}
		})
	}
}

func TestManifestChildrenTooBig(t *testing.T) {
	layers := make([]ocispec.Descriptor, 0, MaxManifestSize/100)
	for i := 0; len(layers) < cap(layers); i++ {
		layers = append(layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString(fmt.Sprint(i)), Size: 1})
	}
	b, err := json.Marshal(ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: layers[0], Layers: layers})
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] = ' ' // keep it JSON-looking, make sure of the size
	if len(b) <= MaxManifestSize {
		t.Fatalf("test manifest is only %d bytes", len(b))
	}
	if got := ManifestChildren(b); got != nil {
		t.Fatalf("a %d-byte manifest gave %d children; want none", len(b), len(got))
	}
}

func TestExpectedSizes(t *testing.T) {
	e := NewExpectedSizes(3)
	doc := func(sizes ...int64) []byte {
		m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
		m.SchemaVersion = 2
		for i, s := range sizes {
			d := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString(fmt.Sprint(i)), Size: s}
			if i == 0 {
				m.Config = d
			} else {
				m.Layers = append(m.Layers, d)
			}
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	m1 := digest.FromString("manifest 1")
	if n := e.Learn(m1, doc(1, 2)); n != 2 {
		t.Fatalf("learned %d sizes, want 2", n)
	}
	if s, ok := e.Size(digest.FromString("1")); !ok || s != 2 {
		t.Fatalf("size of layer 1 = %d, %v; want 2", s, ok)
	}
	if p, ok := e.Parent(digest.FromString("1")); !ok || p != m1 {
		t.Fatalf("parent of layer 1 = %s, %v; want %s", p, ok, m1)
	}
	if _, ok := e.Parent(m1); ok {
		t.Fatal("a manifest no index named has a parent")
	}
	// A later manifest giving another size wins; the oldest entries go
	// first once 3 are kept.
	if n := e.LearnBlob("", bytes.NewReader(doc(1, 5, 7)), int64(len(doc(1, 5, 7)))); n != 3 {
		t.Fatalf("learned %d sizes, want 3", n)
	}
	if s, _ := e.Size(digest.FromString("1")); s != 5 {
		t.Fatalf("size of layer 1 = %d; want 5 (the last manifest's)", s)
	}
	e.Learn("", doc(1, 1, 1, 9))
	if _, ok := e.Size(digest.FromString("0")); ok {
		t.Fatal("the oldest size is still kept beyond the bound")
	}
	if s, ok := e.Size(digest.FromString("3")); !ok || s != 9 {
		t.Fatalf("size of the newest = %d, %v; want 9", s, ok)
	}
	if e.LearnBlob("", bytes.NewReader([]byte("\x1f\x8b rest")), 7) != 0 {
		t.Fatal("learned from a gzip blob")
	}
	var nilSizes *ExpectedSizes
	if _, ok := nilSizes.Size(digest.FromString("1")); ok {
		t.Fatal("a nil ExpectedSizes knows a size")
	}
}

// FuzzManifestChildren checks the manifest reader on any bytes: it never
// panics, reads nothing that is not JSON of at most MaxManifestSize bytes,
// and every descriptor it returns has a valid digest and a positive size.
// Seeds: testdata/fuzz/FuzzManifestChildren.
func FuzzManifestChildren(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		ds := ManifestChildren(b)
		if len(ds) == 0 {
			return
		}
		if !json.Valid(b) || len(b) > MaxManifestSize {
			t.Fatalf("%q: %d children from bytes that are not a manifest", b, len(ds))
		}
		for _, d := range ds {
			if d.Digest.Validate() != nil || d.Size <= 0 {
				t.Fatalf("%q: child %+v", b, d)
			}
		}
		e := NewExpectedSizes(4)
		if n := e.Learn("", b); n != len(ds) {
			t.Fatalf("Learn learned %d of %d children", n, len(ds))
		}
	})
}
