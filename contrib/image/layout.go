package main

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// The image's fixed facts.
const (
	binaryPath = "usr/local/bin/coop"
	// nonRoot is the default user: `coop kb` runs so; `coop node` is run as
	// root by its deployment (it talks to containerd's socket).
	nonRoot   = "65532:65532"
	pathEnv   = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	etcPasswd = "root:x:0:0:root:/root:/sbin/nologin\ncoop:x:65532:65532:coop:/tmp:/sbin/nologin\n"
	etcGroup  = "root:x:0:\ncoop:x:65532:\n"
)

// platformBinary is one platform's coop executable.
type platformBinary struct {
	// Platform is the image's platform (os, architecture, variant).
	Platform ocispec.Platform
	// Path is the executable's file.
	Path string
}

// layoutOptions describe the image writeLayout writes. Every field that
// reaches a blob is here: the same options and the same binaries give the
// same bytes.
type layoutOptions struct {
	// Binaries are the platforms' executables, in the image index's order.
	Binaries []platformBinary
	// Created is every timestamp in the image (SOURCE_DATE_EPOCH).
	Created time.Time
	// Version, Revision and Source go into the org.opencontainers.image.*
	// labels and annotations; empty ones are left out.
	Version, Revision, Source string
	// Tag is index.json's org.opencontainers.image.ref.name.
	Tag string
}

func (o layoutOptions) validate() error {
	if len(o.Binaries) == 0 {
		return fmt.Errorf("no binaries: %w", errdefs.ErrInvalidArgument)
	}
	seen := map[string]bool{}
	for _, b := range o.Binaries {
		p := platformString(b.Platform)
		if b.Platform.OS == "" || b.Platform.Architecture == "" {
			return fmt.Errorf("binary %q: platform %q lacks os or architecture: %w", b.Path, p, errdefs.ErrInvalidArgument)
		}
		if seen[p] {
			return fmt.Errorf("platform %s given twice: %w", p, errdefs.ErrInvalidArgument)
		}
		seen[p] = true
	}
	if !validTag(o.Tag) {
		return fmt.Errorf("tag %q: want [A-Za-z0-9_][A-Za-z0-9._-]{0,127}: %w", o.Tag, errdefs.ErrInvalidArgument)
	}
	if o.Created.Unix() < 0 {
		return fmt.Errorf("created %v is before 1970: %w", o.Created, errdefs.ErrInvalidArgument)
	}
	return nil
}

// validTag reports whether tag is a registry tag, so that index.json's
// ref.name can also be pushed as is.
func validTag(tag string) bool {
	if tag == "" || len(tag) > 128 || tag[0] == '.' || tag[0] == '-' {
		return false
	}
	for _, c := range tag {
		if !tagChar(c) {
			return false
		}
	}
	return true
}

func tagChar(c rune) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-'
}

func platformString(p ocispec.Platform) string {
	return strings.Join(slices.DeleteFunc([]string{p.OS, p.Architecture, p.Variant}, func(s string) bool { return s == "" }), "/")
}

// writeLayout writes the image as an OCI image layout in dir: a multi-platform
// image index named by index.json, a manifest, config and one layer per
// binary. dir is replaced as a whole, so no stale blob stays; a dir that
// exists and holds something other than an OCI layout is refused with
// ErrFailedPrecondition. It returns the image index's descriptor.
func writeLayout(ctx context.Context, dir string, opts layoutOptions) (ocispec.Descriptor, error) {
	if err := opts.validate(); err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := checkReplaceable(dir); err != nil {
		return ocispec.Descriptor{}, err
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return ocispec.Descriptor{}, err
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dir)+"-")
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer os.RemoveAll(tmp)
	desc, err := writeLayoutIn(ctx, tmp, opts)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	// MkdirTemp makes 0700; the layout is meant to be read by others.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := os.RemoveAll(dir); err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return ocispec.Descriptor{}, err
	}
	return desc, nil
}

// checkReplaceable refuses to remove a directory that is not an OCI layout
// (a mistyped --out).
func checkReplaceable(dir string) error {
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) || err == nil && len(entries) == 0 {
		return nil
	}
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, ocispec.ImageLayoutFile)); err != nil {
		return fmt.Errorf("%s exists and is not an OCI image layout (no %s); not replacing it: %w", dir, ocispec.ImageLayoutFile, errdefs.ErrFailedPrecondition)
	}
	return nil
}

func writeLayoutIn(ctx context.Context, dir string, opts layoutOptions) (ocispec.Descriptor, error) {
	blobs := blobDir{dir: filepath.Join(dir, ocispec.ImageBlobsDir, string(digest.SHA256))}
	if err := os.MkdirAll(blobs.dir, 0o755); err != nil {
		return ocispec.Descriptor{}, err
	}
	index := ocispec.Index{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   ocispec.MediaTypeImageIndex,
		Annotations: opts.annotations(),
	}
	for _, b := range opts.Binaries {
		if err := ctx.Err(); err != nil {
			return ocispec.Descriptor{}, err
		}
		m, err := writeImage(blobs, b, opts)
		if err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("%s: %w", platformString(b.Platform), err)
		}
		index.Manifests = append(index.Manifests, m)
	}
	desc, err := blobs.writeJSON(ocispec.MediaTypeImageIndex, index)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc.Annotations = map[string]string{ocispec.AnnotationRefName: opts.Tag}
	top := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{desc},
	}
	if err := writeJSONFile(filepath.Join(dir, ocispec.ImageIndexFile), top); err != nil {
		return ocispec.Descriptor{}, err
	}
	err = writeJSONFile(filepath.Join(dir, ocispec.ImageLayoutFile), ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	return desc, err
}

// annotations are the org.opencontainers.image.* keys, on the index, the
// manifests and (as labels) the configs.
func (o layoutOptions) annotations() map[string]string {
	a := map[string]string{ocispec.AnnotationCreated: o.Created.UTC().Format(time.RFC3339)}
	for k, v := range map[string]string{
		ocispec.AnnotationVersion:  o.Version,
		ocispec.AnnotationRevision: o.Revision,
		ocispec.AnnotationSource:   o.Source,
	} {
		if v != "" {
			a[k] = v
		}
	}
	return a
}

// writeImage writes one platform's layer, config and manifest and returns the
// manifest's descriptor, with its platform, for the index.
func writeImage(blobs blobDir, b platformBinary, opts layoutOptions) (ocispec.Descriptor, error) {
	layer, diffID, err := blobs.writeLayer(b.Path, opts.Created)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	created := opts.Created.UTC()
	labels := opts.annotations()
	delete(labels, ocispec.AnnotationCreated)
	config, err := blobs.writeJSON(ocispec.MediaTypeImageConfig, ocispec.Image{
		Created:  &created,
		Platform: b.Platform,
		Config: ocispec.ImageConfig{
			User:       nonRoot,
			Env:        []string{pathEnv},
			Entrypoint: []string{"/" + binaryPath},
			WorkingDir: "/",
			Labels:     labels,
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
		History: []ocispec.History{{
			Created:   &created,
			CreatedBy: "go run ./contrib/image: /" + binaryPath + ", /etc/passwd, /etc/group, /tmp",
		}},
	})
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	manifest, err := blobs.writeJSON(ocispec.MediaTypeImageManifest, ocispec.Manifest{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   ocispec.MediaTypeImageManifest,
		Config:      config,
		Layers:      []ocispec.Descriptor{layer},
		Annotations: opts.annotations(),
	})
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	p := b.Platform
	manifest.Platform = &p
	return manifest, nil
}

// blobDir is a layout's blobs/sha256 directory.
type blobDir struct{ dir string }

func (d blobDir) writeJSON(mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	dgst := digest.FromBytes(b)
	if err := os.WriteFile(filepath.Join(d.dir, dgst.Encoded()), b, 0o644); err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: dgst, Size: int64(len(b))}, nil
}

// writeLayer streams the layer holding binary into a blob and returns its
// descriptor and its diff ID (the digest of the uncompressed tar).
func (d blobDir) writeLayer(binary string, mtime time.Time) (_ ocispec.Descriptor, _ digest.Digest, retErr error) {
	f, err := os.CreateTemp(d.dir, ".layer-")
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer func() {
		f.Close()
		if retErr != nil {
			os.Remove(f.Name())
		}
	}()
	compressed := digest.SHA256.Digester()
	counter := &countingWriter{w: io.MultiWriter(f, compressed.Hash())}
	diffID, err := writeLayerTar(counter, binary, mtime)
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := f.Chmod(0o644); err != nil { // CreateTemp makes 0600
		return ocispec.Descriptor{}, "", err
	}
	if err := f.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	dgst := compressed.Digest()
	if err := os.Rename(f.Name(), filepath.Join(d.dir, dgst.Encoded())); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: dgst, Size: counter.n}, diffID, nil
}

// writeLayerTar writes the gzipped layer tar to w and returns the digest of
// the uncompressed tar. Every byte is fixed by its inputs: sorted entries,
// uid and gid 0 with no names, fixed modes, mtime for every time, the USTAR
// format, and a gzip header with no name, no time and a fixed OS.
func writeLayerTar(w io.Writer, binary string, mtime time.Time) (digest.Digest, error) {
	bin, err := os.Open(binary)
	if err != nil {
		return "", err
	}
	defer bin.Close()
	st, err := bin.Stat()
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file: %w", binary, errdefs.ErrInvalidArgument)
	}

	zw, err := gzip.NewWriterLevel(w, gzip.BestCompression)
	if err != nil {
		return "", err
	}
	zw.Header = gzip.Header{OS: 255} // unknown OS, no name, no time
	uncompressed := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(zw, uncompressed))
	for _, e := range layerEntries(st.Size()) {
		hdr := &tar.Header{
			Name:     e.name,
			Typeflag: e.typ,
			Mode:     e.mode,
			Size:     e.size,
			ModTime:  mtime.UTC(),
			Format:   tar.FormatUSTAR,
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return "", fmt.Errorf("layer entry %s: %w", e.name, err)
		}
		body := e.body
		if e.name == binaryPath {
			body = io.LimitReader(bin, st.Size())
		}
		if body == nil {
			continue
		}
		if n, err := io.Copy(tw, body); err != nil {
			return "", fmt.Errorf("layer entry %s: %w", e.name, err)
		} else if n != e.size {
			return "", fmt.Errorf("layer entry %s: %d bytes of %d (the file changed while read)", e.name, n, e.size)
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	return digest.NewDigest(digest.SHA256, uncompressed), nil
}

type layerEntry struct {
	name string
	typ  byte
	mode int64
	size int64
	body io.Reader
}

// layerEntries are the layer's files in name order; binarySize is the size of
// usr/local/bin/coop, whose body the caller supplies.
func layerEntries(binarySize int64) []layerEntry {
	file := func(name, content string) layerEntry {
		return layerEntry{name: name, typ: tar.TypeReg, mode: 0o644, size: int64(len(content)), body: strings.NewReader(content)}
	}
	dir := func(name string, mode int64) layerEntry {
		return layerEntry{name: name, typ: tar.TypeDir, mode: mode}
	}
	entries := []layerEntry{
		dir("etc/", 0o755),
		file("etc/group", etcGroup),
		file("etc/passwd", etcPasswd),
		dir("tmp/", 0o1777), // coop kb keeps its broker's state under $TMPDIR by default
		dir("usr/", 0o755),
		dir("usr/local/", 0o755),
		dir("usr/local/bin/", 0o755),
		{name: binaryPath, typ: tar.TypeReg, mode: 0o755, size: binarySize},
	}
	slices.SortFunc(entries, func(a, b layerEntry) int { return strings.Compare(a.name, b.name) })
	return entries
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func writeJSONFile(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}
