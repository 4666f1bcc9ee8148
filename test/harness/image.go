package harness

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"time"

	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ImageSpec describes an image of random layers.
type ImageSpec struct {
	// Repo is the repository name, such as "coop/test"; default "coop/random".
	Repo string
	// Tag defaults to "latest".
	Tag string
	// LayerSizes are the sizes of the random file in each layer, in bytes.
	// Each layer is a gzip stream (stored, not deflated: the data is random)
	// of a tar holding one file, so its blob is slightly larger.
	LayerSizes []int64
	// Seed makes the content reproducible; 0 picks a random seed.
	Seed uint64
	// Busybox, when set, is the path of a static busybox binary: the image
	// then gets a bottom layer with it and a web root, and runs a tiny HTTP
	// server: busybox httpd -f -p 8080 -h /www (index.html says "coop").
	Busybox string
	// Cmd, when set, is the image's command instead of busybox httpd.
	Cmd []string
}

// BusyboxPath is where Debian's busybox-static puts its binary.
const BusyboxPath = "/bin/busybox"

// busyboxLayer returns a gzip'd tar with /bin/busybox, /bin/sh and
// /www/index.html, and its diff ID.
func busyboxLayer(path string) ([]byte, digest.Digest, error) {
	bin, err := os.ReadFile(path)
	if err != nil {
		return nil, "", fmt.Errorf("busybox: %w (apt-get install busybox-static)", err)
	}
	var out bytes.Buffer
	gz := gzip.NewWriter(&out)
	dd := digest.SHA256.Digester()
	tw := tar.NewWriter(io.MultiWriter(gz, dd.Hash()))
	index := []byte("coop\n")
	for _, e := range []struct {
		hdr  tar.Header
		data []byte
	}{
		{tar.Header{Name: "bin/", Mode: 0o755, Typeflag: tar.TypeDir}, nil},
		{tar.Header{Name: "bin/busybox", Mode: 0o755, Size: int64(len(bin)), Typeflag: tar.TypeReg}, bin},
		{tar.Header{Name: "bin/sh", Linkname: "busybox", Mode: 0o777, Typeflag: tar.TypeSymlink}, nil},
		{tar.Header{Name: "tmp/", Mode: 0o1777, Typeflag: tar.TypeDir}, nil},
		{tar.Header{Name: "www/", Mode: 0o755, Typeflag: tar.TypeDir}, nil},
		{tar.Header{Name: "www/index.html", Mode: 0o644, Size: int64(len(index)), Typeflag: tar.TypeReg}, index},
	} {
		h := e.hdr
		h.ModTime, h.Format = time.Unix(0, 0), tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			return nil, "", err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	if err := gz.Close(); err != nil {
		return nil, "", err
	}
	return out.Bytes(), dd.Digest(), nil
}

// Blob is one blob of an image.
type Blob struct {
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
	MediaType string        `json:"mediaType"`
}

// Image is an image pushed to a Registry.
type Image struct {
	// Ref is host/repo:tag.
	Ref string
	// DigestRef is host/repo@digest, the manifest pinned by digest.
	DigestRef string
	// Repo and Tag as pushed.
	Repo, Tag string
	// Manifest is the image manifest blob.
	Manifest Blob
	// Config is the image config blob (os linux, architecture amd64).
	Config Blob
	// Layers are the layer blobs, bottom first.
	Layers []Blob
}

// Blobs returns the manifest, the config and the layers.
func (img *Image) Blobs() []Blob {
	return append([]Blob{img.Manifest, img.Config}, img.Layers...)
}

// Digests returns the digests of Blobs.
func (img *Image) Digests() []digest.Digest {
	var ds []digest.Digest
	for _, b := range img.Blobs() {
		ds = append(ds, b.Digest)
	}
	return ds
}

// LayerDigests returns the layers' digests.
func (img *Image) LayerDigests() []digest.Digest {
	var ds []digest.Digest
	for _, b := range img.Layers {
		ds = append(ds, b.Digest)
	}
	return ds
}

// LayerBytes is the sum of the layers' blob sizes.
func (img *Image) LayerBytes() int64 {
	var n int64
	for _, b := range img.Layers {
		n += b.Size
	}
	return n
}

// TotalBytes is the sum of every blob's size (manifest, config, layers).
func (img *Image) TotalBytes() int64 {
	n := img.LayerBytes()
	return n + img.Manifest.Size + img.Config.Size
}

// PushRandomImage builds an image of incompressible random layers of the
// given sizes and pushes it: blobs go straight into the registry's store and
// the manifest through the distribution API, so the registry must be running.
// Request counters are not reset.
func (r *Registry) PushRandomImage(ctx context.Context, spec ImageSpec) (*Image, error) {
	if len(spec.LayerSizes) == 0 {
		return nil, fmt.Errorf("image spec: no layers")
	}
	if spec.Repo == "" {
		spec.Repo = "coop/random"
	}
	if spec.Tag == "" {
		spec.Tag = "latest"
	}
	seed := spec.Seed
	if seed == 0 {
		var b [8]byte
		_, _ = crand.Read(b[:])
		seed = binary.LittleEndian.Uint64(b[:])
	}
	var seedBytes [32]byte
	binary.LittleEndian.PutUint64(seedBytes[:], seed)
	rng := rand.NewChaCha8(seedBytes)

	img := &Image{Repo: spec.Repo, Tag: spec.Tag}
	var diffIDs []digest.Digest
	cmd := []string{"/random-0.bin"}
	if spec.Busybox != "" {
		blob, diffID, err := busyboxLayer(spec.Busybox)
		if err != nil {
			return nil, err
		}
		img.Layers = append(img.Layers, Blob{Digest: r.putBlob(blob), Size: int64(len(blob)), MediaType: ocispec.MediaTypeImageLayerGzip})
		diffIDs = append(diffIDs, diffID)
		cmd = []string{"/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"}
		if len(spec.Cmd) > 0 {
			cmd = spec.Cmd
		}
	}
	for i, size := range spec.LayerSizes {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		blob, diffID, err := randomLayer(rng, fmt.Sprintf("random-%d.bin", i), size)
		if err != nil {
			return nil, err
		}
		dgst := r.putBlob(blob)
		img.Layers = append(img.Layers, Blob{Digest: dgst, Size: int64(len(blob)), MediaType: ocispec.MediaTypeImageLayerGzip})
		diffIDs = append(diffIDs, diffID)
	}

	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Config:   ocispec.ImageConfig{Cmd: cmd},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	cfgBytes, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	img.Config = Blob{Digest: r.putBlob(cfgBytes), Size: int64(len(cfgBytes)), MediaType: ocispec.MediaTypeImageConfig}

	mf := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: img.Config.MediaType, Digest: img.Config.Digest, Size: img.Config.Size},
	}
	for _, l := range img.Layers {
		mf.Layers = append(mf.Layers, ocispec.Descriptor{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size})
	}
	mfBytes, err := json.Marshal(mf)
	if err != nil {
		return nil, err
	}
	img.Manifest = Blob{Digest: digest.FromBytes(mfBytes), Size: int64(len(mfBytes)), MediaType: ocispec.MediaTypeImageManifest}
	if err := r.putManifest(ctx, spec.Repo, spec.Tag, ocispec.MediaTypeImageManifest, mfBytes); err != nil {
		return nil, err
	}
	host := r.Host()
	img.Ref = host + "/" + spec.Repo + ":" + spec.Tag
	img.DigestRef = host + "/" + spec.Repo + "@" + img.Manifest.Digest.String()
	return img, nil
}

// putManifest stores a manifest of mediaType under repo:tag, in process
// (the registry may listen in another network namespace).
func (r *Registry) putManifest(ctx context.Context, repo, tag, mediaType string, b []byte) error {
	req := httptest.NewRequestWithContext(ctx, http.MethodPut, "/v2/"+repo+"/manifests/"+tag, bytes.NewReader(b))
	req.Header.Set("Content-Type", mediaType)
	rec := httptest.NewRecorder()
	r.handler.ServeHTTP(rec, req)
	if rec.Code != http.StatusCreated && rec.Code != http.StatusOK {
		return fmt.Errorf("push manifest %s:%s: %d: %s", repo, tag, rec.Code, strings.TrimSpace(rec.Body.String()))
	}
	return nil
}

// PushLayout pushes the image an OCI layout holds (its index.json's first
// manifest or index, and everything under it) as repo:tag.
func (r *Registry) PushLayout(ctx context.Context, dir, repo, tag string) (digest.Digest, error) {
	var idx ocispec.Index
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		return "", err
	}
	if err := json.Unmarshal(b, &idx); err != nil || len(idx.Manifests) == 0 {
		return "", fmt.Errorf("%s: no image in index.json (%v)", dir, err)
	}
	blob := func(d digest.Digest) ([]byte, error) {
		return os.ReadFile(filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded()))
	}
	var push func(desc ocispec.Descriptor, ref string) error
	push = func(desc ocispec.Descriptor, ref string) error {
		mb, err := blob(desc.Digest)
		if err != nil {
			return err
		}
		var doc struct {
			Config    *ocispec.Descriptor  `json:"config"`
			Layers    []ocispec.Descriptor `json:"layers"`
			Manifests []ocispec.Descriptor `json:"manifests"`
		}
		if err := json.Unmarshal(mb, &doc); err != nil {
			return err
		}
		for _, m := range doc.Manifests {
			if err := push(m, m.Digest.String()); err != nil {
				return err
			}
		}
		children := doc.Layers
		if doc.Config != nil {
			children = append(children, *doc.Config)
		}
		for _, c := range children {
			cb, err := blob(c.Digest)
			if err != nil {
				return err
			}
			r.putBlob(cb)
		}
		return r.putManifest(ctx, repo, ref, desc.MediaType, mb)
	}
	top := idx.Manifests[0]
	if err := push(top, tag); err != nil {
		return "", fmt.Errorf("push %s to %s:%s: %w", dir, repo, tag, err)
	}
	return top.Digest, nil
}

// randomLayer returns a gzip'd tar holding one file of size random bytes, and
// the digest of the uncompressed tar (the layer's diff ID). The gzip stream
// uses stored blocks: random data does not compress, and deflating it would
// only cost time.
func randomLayer(rng io.Reader, name string, size int64) (blob []byte, diffID digest.Digest, err error) {
	var out bytes.Buffer
	out.Grow(int(size) + int(size)/1000 + 4096)
	gz, err := gzip.NewWriterLevel(&out, gzip.NoCompression)
	if err != nil {
		return nil, "", err
	}
	dd := digest.SHA256.Digester()
	tw := tar.NewWriter(io.MultiWriter(gz, dd.Hash()))
	hdr := &tar.Header{
		Name:     name,
		Mode:     0o644,
		Size:     size,
		Typeflag: tar.TypeReg,
		ModTime:  time.Unix(0, 0),
		Format:   tar.FormatPAX,
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, "", err
	}
	if _, err := io.CopyN(tw, rng, size); err != nil {
		return nil, "", err
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	if err := gz.Close(); err != nil {
		return nil, "", err
	}
	return out.Bytes(), dd.Digest(), nil
}
