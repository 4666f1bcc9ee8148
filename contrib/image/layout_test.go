package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func linuxAMD64() ocispec.Platform { return ocispec.Platform{OS: "linux", Architecture: "amd64"} }
func linuxARM64() ocispec.Platform {
	return ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}
}

// fakeOptions writes a small fake binary per platform under t.TempDir and
// returns options naming them.
func fakeOptions(t *testing.T, amd64Bin, arm64Bin string) layoutOptions {
	t.Helper()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return layoutOptions{
		Binaries: []platformBinary{
			{Platform: linuxAMD64(), Path: write("coop-amd64", amd64Bin)},
			{Platform: linuxARM64(), Path: write("coop-arm64", arm64Bin)},
		},
		Created:  time.Unix(1700000000, 0),
		Version:  "v0.1.0-3-gabcdef0",
		Revision: "abcdef0123456789abcdef0123456789abcdef01",
		Source:   "https://github.com/coopnet/coop",
		Tag:      "v0.1.0-3-gabcdef0",
	}
}

func mustWrite(t *testing.T, dir string, opts layoutOptions) ocispec.Descriptor {
	t.Helper()
	desc, err := writeLayout(context.Background(), dir, opts)
	if err != nil {
		t.Fatalf("writeLayout: %v", err)
	}
	return desc
}

func TestWriteLayoutIsReproducible(t *testing.T) {
	opts := fakeOptions(t, "amd64 coop", "arm64 coop")
	a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	da, db := mustWrite(t, a, opts), mustWrite(t, b, opts)
	if da.Digest != db.Digest {
		t.Fatalf("two writes of the same binaries: %s and %s", da.Digest, db.Digest)
	}
	if fa, fb := readTree(t, a), readTree(t, b); !maps.Equal(fa, fb) {
		t.Errorf("two writes of the same binaries differ: %v and %v", slices.Sorted(maps.Keys(fa)), slices.Sorted(maps.Keys(fb)))
	}
}

func TestWriteLayoutIsAValidImage(t *testing.T) {
	opts := fakeOptions(t, "amd64 coop", "arm64 coop")
	dir := filepath.Join(t.TempDir(), "image")
	desc := mustWrite(t, dir, opts)
	got := checkLayout(t, dir)

	if got.index != desc.Digest {
		t.Errorf("index.json names %s; writeLayout returned %s", got.index, desc.Digest)
	}
	if got.tag != opts.Tag {
		t.Errorf("ref.name %q, want %q", got.tag, opts.Tag)
	}
	if want := []ocispec.Platform{linuxAMD64(), linuxARM64()}; !slices.EqualFunc(got.platforms, want, platformEqual) {
		t.Errorf("platforms %v, want %v", got.platforms, want)
	}
	wantEntries := []string{"etc/", "etc/group", "etc/passwd", "tmp/", "usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/coop"}
	for i, img := range got.images {
		p := platformString(got.platforms[i])
		if !slices.Equal(img.entries, wantEntries) {
			t.Errorf("%s: layer entries %v, want %v", p, img.entries, wantEntries)
		}
		if img.coopMode != 0o755 {
			t.Errorf("%s: usr/local/bin/coop mode %o, want 755", p, img.coopMode)
		}
		if want := []string{"amd64 coop", "arm64 coop"}[i]; img.coop != want {
			t.Errorf("%s: usr/local/bin/coop holds %q, want %q", p, img.coop, want)
		}
		c := img.config
		if c.Config.User != "65532:65532" {
			t.Errorf("%s: user %q, want 65532:65532", p, c.Config.User)
		}
		if !slices.Equal(c.Config.Entrypoint, []string{"/usr/local/bin/coop"}) {
			t.Errorf("%s: entrypoint %q", p, c.Config.Entrypoint)
		}
		if c.Created == nil || !c.Created.Equal(opts.Created) {
			t.Errorf("%s: created %v, want %v", p, c.Created, opts.Created)
		}
		for k, want := range map[string]string{
			ocispec.AnnotationVersion:  opts.Version,
			ocispec.AnnotationRevision: opts.Revision,
			ocispec.AnnotationSource:   opts.Source,
		} {
			if c.Config.Labels[k] != want {
				t.Errorf("%s: label %s = %q, want %q", p, k, c.Config.Labels[k], want)
			}
		}
	}
}

func TestWriteLayoutDigest(t *testing.T) {
	base := fakeOptions(t, "amd64 coop", "arm64 coop")
	want := mustWrite(t, filepath.Join(t.TempDir(), "base"), base).Digest
	for _, tc := range []struct {
		name   string
		change func(*layoutOptions)
		same   bool
	}{
		{"another amd64 binary", func(o *layoutOptions) { *o = fakeOptions(t, "amd64 coop 2", "arm64 coop") }, false},
		{"another arm64 binary", func(o *layoutOptions) { *o = fakeOptions(t, "amd64 coop", "arm64 coop 2") }, false},
		{"another version", func(o *layoutOptions) { o.Version = "v0.2.0" }, false},
		{"another revision", func(o *layoutOptions) { o.Revision = "0123" }, false},
		{"another time", func(o *layoutOptions) { o.Created = o.Created.Add(time.Second) }, false},
		{"platforms swapped", func(o *layoutOptions) { slices.Reverse(o.Binaries) }, false},
		{"another tag only names it", func(o *layoutOptions) { o.Tag = "latest" }, true},
		{"the same time in another zone", func(o *layoutOptions) { o.Created = o.Created.In(time.FixedZone("x", 3600)) }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := base
			opts.Binaries = slices.Clone(base.Binaries)
			tc.change(&opts)
			got := mustWrite(t, filepath.Join(t.TempDir(), "image"), opts).Digest
			if (got == want) != tc.same {
				t.Errorf("digest %s, base %s: same = %v, want %v", got, want, got == want, tc.same)
			}
		})
	}
}

func TestWriteLayoutReplacesOnlyALayout(t *testing.T) {
	opts := fakeOptions(t, "amd64 coop", "arm64 coop")

	t.Run("stale blobs go", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "image")
		mustWrite(t, dir, fakeOptions(t, "old amd64", "old arm64"))
		mustWrite(t, dir, opts)
		checkLayout(t, dir) // fails on an unreferenced blob
	})
	t.Run("an empty directory is used", func(t *testing.T) {
		dir := t.TempDir()
		mustWrite(t, dir, opts)
		checkLayout(t, dir)
	})
	t.Run("another directory is kept", func(t *testing.T) {
		dir := t.TempDir()
		keep := filepath.Join(dir, "precious")
		if err := os.WriteFile(keep, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := writeLayout(context.Background(), dir, opts)
		if !errdefs.IsFailedPrecondition(err) {
			t.Errorf("writeLayout over a non-layout: %v, want ErrFailedPrecondition", err)
		}
		if _, err := os.Stat(keep); err != nil {
			t.Errorf("the directory's file: %v", err)
		}
	})
	t.Run("a failed write keeps the old layout", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "image")
		old := mustWrite(t, dir, opts)
		bad := opts
		bad.Binaries = []platformBinary{{Platform: linuxAMD64(), Path: filepath.Join(t.TempDir(), "missing")}}
		if _, err := writeLayout(context.Background(), dir, bad); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("writeLayout with a missing binary: %v, want not exist", err)
		}
		if got := checkLayout(t, dir).index; got != old.Digest {
			t.Errorf("after a failed write the layout holds %s, want %s", got, old.Digest)
		}
		if entries, _ := os.ReadDir(filepath.Dir(dir)); len(entries) != 1 {
			t.Errorf("left beside the layout: %v", entries)
		}
	})
}

func TestLayoutOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*layoutOptions)
	}{
		{"no binaries", func(o *layoutOptions) { o.Binaries = nil }},
		{"a platform twice", func(o *layoutOptions) { o.Binaries[1].Platform = linuxAMD64() }},
		{"no architecture", func(o *layoutOptions) { o.Binaries[0].Platform.Architecture = "" }},
		{"no tag", func(o *layoutOptions) { o.Tag = "" }},
		{"a tag with a colon", func(o *layoutOptions) { o.Tag = "a:b" }},
		{"a tag starting with a dot", func(o *layoutOptions) { o.Tag = ".a" }},
		{"before 1970", func(o *layoutOptions) { o.Created = time.Unix(-1, 0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := fakeOptions(t, "a", "b")
			tc.change(&opts)
			dir := filepath.Join(t.TempDir(), "image")
			if _, err := writeLayout(context.Background(), dir, opts); !errdefs.IsInvalidArgument(err) {
				t.Errorf("writeLayout: %v, want ErrInvalidArgument", err)
			}
			if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("rejected options wrote %s: %v", dir, err)
			}
		})
	}
}

// layoutFacts are what checkLayout read from a valid layout.
type layoutFacts struct {
	index     digest.Digest
	tag       string
	platforms []ocispec.Platform
	images    []imageFacts
}

type imageFacts struct {
	config   ocispec.Image
	entries  []string
	coop     string
	coopMode int64
}

// checkLayout validates the OCI layout in dir: oci-layout; every blob's name
// is its digest; every descriptor's size and digest match its blob; index.json
// → image index → manifests → config and layer resolve; each config matches
// its platform and its layer's diff ID; each layer is deterministic; no blob
// is left unreferenced.
func checkLayout(t *testing.T, dir string) layoutFacts {
	t.Helper()
	if b, err := os.ReadFile(filepath.Join(dir, "oci-layout")); err != nil || string(b) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Fatalf("oci-layout: %q, %v", b, err)
	}
	unreferenced := map[digest.Digest]bool{}
	blobDir := filepath.Join(dir, "blobs", "sha256")
	entries, err := os.ReadDir(blobDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(blobDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if got := digest.FromBytes(b); got.Encoded() != e.Name() {
			t.Fatalf("blob %s holds %s", e.Name(), got)
		}
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != 0o644 {
			t.Errorf("blob %s: mode %v, want 0644 (readable by whoever pushes it)", e.Name(), info.Mode())
		}
		unreferenced[digest.NewDigestFromEncoded(digest.SHA256, e.Name())] = true
	}
	blob := func(d ocispec.Descriptor, mediaType string) []byte {
		t.Helper()
		if d.MediaType != mediaType {
			t.Fatalf("descriptor %s: media type %q, want %q", d.Digest, d.MediaType, mediaType)
		}
		b, err := os.ReadFile(filepath.Join(blobDir, d.Digest.Encoded()))
		if err != nil {
			t.Fatalf("descriptor %s: %v", d.Digest, err)
		}
		if int64(len(b)) != d.Size || digest.FromBytes(b) != d.Digest {
			t.Fatalf("descriptor %s size %d: blob of %d bytes, %s", d.Digest, d.Size, len(b), digest.FromBytes(b))
		}
		delete(unreferenced, d.Digest)
		return b
	}
	decode := func(b []byte, v any) {
		t.Helper()
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatal(err)
		}
	}

	var top ocispec.Index
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	decode(b, &top)
	if top.SchemaVersion != 2 || len(top.Manifests) != 1 {
		t.Fatalf("index.json: schema %d, %d manifests; want 2, 1", top.SchemaVersion, len(top.Manifests))
	}
	facts := layoutFacts{index: top.Manifests[0].Digest, tag: top.Manifests[0].Annotations[ocispec.AnnotationRefName]}
	var index ocispec.Index
	decode(blob(top.Manifests[0], ocispec.MediaTypeImageIndex), &index)
	if index.SchemaVersion != 2 || index.MediaType != ocispec.MediaTypeImageIndex {
		t.Fatalf("image index: schema %d, media type %q", index.SchemaVersion, index.MediaType)
	}
	for _, md := range index.Manifests {
		if md.Platform == nil {
			t.Fatalf("manifest %s has no platform", md.Digest)
		}
		facts.platforms = append(facts.platforms, *md.Platform)
		var m ocispec.Manifest
		decode(blob(md, ocispec.MediaTypeImageManifest), &m)
		if m.SchemaVersion != 2 || m.MediaType != ocispec.MediaTypeImageManifest || len(m.Layers) != 1 {
			t.Fatalf("manifest %s: schema %d, media type %q, %d layers", md.Digest, m.SchemaVersion, m.MediaType, len(m.Layers))
		}
		var img imageFacts
		decode(blob(m.Config, ocispec.MediaTypeImageConfig), &img.config)
		if !platformEqual(img.config.Platform, *md.Platform) {
			t.Errorf("manifest %s: config's platform %v, index's %v", md.Digest, img.config.Platform, *md.Platform)
		}
		tarBytes := gunzip(t, blob(m.Layers[0], ocispec.MediaTypeImageLayerGzip))
		if want := []digest.Digest{digest.FromBytes(tarBytes)}; !slices.Equal(img.config.RootFS.DiffIDs, want) || img.config.RootFS.Type != "layers" {
			t.Errorf("manifest %s: rootfs %v, want layers %v", md.Digest, img.config.RootFS, want)
		}
		readLayer(t, tarBytes, *img.config.Created, &img)
		facts.images = append(facts.images, img)
	}
	if len(unreferenced) > 0 {
		t.Errorf("unreferenced blobs: %v", slices.Collect(maps.Keys(unreferenced)))
	}
	return facts
}

func gunzip(t *testing.T, b []byte) []byte {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if zr.Name != "" || !zr.ModTime.IsZero() {
		t.Errorf("gzip header: name %q, time %v; want neither", zr.Name, zr.ModTime)
	}
	out, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// readLayer lists the layer's entries, checking the deterministic headers.
func readLayer(t *testing.T, b []byte, created time.Time, img *imageFacts) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Uid != 0 || hdr.Gid != 0 || hdr.Uname != "" || hdr.Gname != "" || !hdr.ModTime.Equal(created) {
			t.Errorf("%s: uid %d gid %d uname %q gname %q mtime %v; want 0, 0, none, none, %v",
				hdr.Name, hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname, hdr.ModTime, created)
		}
		img.entries = append(img.entries, hdr.Name)
		if hdr.Name == "usr/local/bin/coop" {
			body, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			img.coop, img.coopMode = string(body), hdr.Mode
		}
	}
}

func platformEqual(a, b ocispec.Platform) bool {
	return a.OS == b.OS && a.Architecture == b.Architecture && a.Variant == b.Variant
}

// readTree returns every file under dir by its relative path.
func readTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		files[rel] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}
