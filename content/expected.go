package content

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"sync"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// MaxManifestSize is the largest blob read as a manifest or an index: the
// limit registries put on manifests.
const MaxManifestSize = 4 << 20

// DefaultExpectedSizes is how many sizes an ExpectedSizes keeps by default.
const DefaultExpectedSizes = 1 << 16

// Docker's media types of a manifest and a manifest list, which carry
// descriptors like their OCI counterparts.
const (
	mediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// ExpectedSizes remembers the sizes the manifests and indexes committed on
// this node give the blobs they name, and which manifest named each. A pull
// commits a manifest before it fetches the manifest's children, so the size
// of a blob being pulled is known from its descriptor, not from what peers
// say: a peer that reports another size is not a candidate. The parent
// links a blob to the pull's registry (plugin/upstream). It keeps the last
// Max blobs learned. It is safe for concurrent use.
type ExpectedSizes struct {
	mu    sync.Mutex
	sizes *Bounded[digest.Digest, expected]
}

type expected struct {
	size   int64
	parent digest.Digest
}

// NewExpectedSizes returns an ExpectedSizes keeping at most max sizes
// (DefaultExpectedSizes when max <= 0).
func NewExpectedSizes(max int) *ExpectedSizes {
	if max <= 0 {
		max = DefaultExpectedSizes
	}
	return &ExpectedSizes{sizes: NewBounded[digest.Digest, expected](max)}
}

// Size returns the size the last manifest naming dgst gave it.
func (e *ExpectedSizes) Size(dgst digest.Digest) (int64, bool) {
	if e == nil {
		return 0, false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	x, ok := e.sizes.Get(dgst)
	return x.size, ok
}

// Parent returns the manifest or index that last named dgst.
func (e *ExpectedSizes) Parent(dgst digest.Digest) (digest.Digest, bool) {
	if e == nil {
		return "", false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	x, ok := e.sizes.Get(dgst)
	return x.parent, ok && x.parent != ""
}

// ExpectedSize is Size, for the mirror.
func (e *ExpectedSizes) ExpectedSize(_ context.Context, dgst digest.Digest) (int64, bool) {
	return e.Size(dgst)
}

// Len returns how many sizes are kept.
func (e *ExpectedSizes) Len() int {
	if e == nil {
		return 0
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sizes.Len()
}

// Learn reads b, the blob parent, as an OCI or Docker image manifest or
// index and remembers the size of every blob it names (config, layers,
// manifests), and that parent named it. Anything else (a layer, a config,
// JSON of another shape, more than MaxManifestSize bytes) teaches nothing.
// It returns how many sizes it learned.
func (e *ExpectedSizes) Learn(parent digest.Digest, b []byte) int {
	ds := ManifestChildren(b)
	if len(ds) == 0 {
		return 0
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, d := range ds {
		e.sizes.Put(d.Digest, expected{size: d.Size, parent: parent})
	}
	return len(ds)
}

// LearnBlob learns from the blob parent of size bytes read through ra, if it
// may be a manifest or an index: a blob not starting like JSON costs one
// small read.
func (e *ExpectedSizes) LearnBlob(parent digest.Digest, ra io.ReaderAt, size int64) int {
	if size <= 0 || size > MaxManifestSize {
		return 0
	}
	head := make([]byte, min(64, size))
	if _, err := ra.ReadAt(head, 0); (err != nil && !errors.Is(err, io.EOF)) || !LooksLikeManifest(head, size) {
		return 0
	}
	b := make([]byte, size)
	if n, err := ra.ReadAt(b, 0); int64(n) != size || (err != nil && !errors.Is(err, io.EOF)) {
		return 0
	}
	return e.Learn(parent, b)
}

// LooksLikeManifest says whether a blob whose first bytes are head and whose
// size is size may be a manifest or an index (JSON of at most
// MaxManifestSize bytes): the cheap test before reading it whole.
func LooksLikeManifest(head []byte, size int64) bool {
	if size <= 0 || size > MaxManifestSize {
		return false
	}
	head = bytes.TrimLeft(head, " \t\r\n")
	return len(head) > 0 && head[0] == '{'
}

// ManifestChildren returns the descriptors an OCI or Docker image manifest or
// index names (config, layers, manifests), with a valid digest and a positive
// size each, or nil when b is not one of those.
func ManifestChildren(b []byte) []ocispec.Descriptor {
	if !LooksLikeManifest(b, int64(len(b))) {
		return nil
	}
	var m struct {
		SchemaVersion int                  `json:"schemaVersion"`
		MediaType     string               `json:"mediaType"`
		Config        *ocispec.Descriptor  `json:"config"`
		Layers        []ocispec.Descriptor `json:"layers"`
		Manifests     []ocispec.Descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(b, &m); err != nil || m.SchemaVersion != 2 {
		return nil
	}
	var all []ocispec.Descriptor
	switch m.MediaType {
	case ocispec.MediaTypeImageManifest, mediaTypeDockerManifest:
		if m.Config == nil || len(m.Manifests) > 0 {
			return nil
		}
		all = append([]ocispec.Descriptor{*m.Config}, m.Layers...)
	case ocispec.MediaTypeImageIndex, mediaTypeDockerList:
		if m.Config != nil || len(m.Layers) > 0 {
			return nil
		}
		all = m.Manifests
	case "": // OCI allows a manifest or an index without its media type
		switch {
		case m.Config != nil && len(m.Manifests) == 0:
			all = append([]ocispec.Descriptor{*m.Config}, m.Layers...)
		case m.Config == nil && len(m.Layers) == 0:
			all = m.Manifests
		}
	default:
		return nil
	}
	var out []ocispec.Descriptor
	for _, d := range all {
		if d.Size > 0 && d.Digest.Validate() == nil {
			out = append(out, ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size})
		}
	}
	return out
}
