package plugin

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// recorded is a content.Recorder remembering what it holds.
type recorded struct {
	mu    sync.Mutex
	blobs map[digest.Digest]int64
}

var _ content.Recorder = (*recorded)(nil)

func (r *recorded) Add(d digest.Digest, size int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.blobs[d] = size
}

func (r *recorded) Remove(d digest.Digest) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.blobs, d)
}

func (r *recorded) has(d digest.Digest) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.blobs[d]
	return ok
}

// TestObserverSharedNamespaces: with Namespaces, a blob is recorded and
// read only while a listed namespace holds it; OnHeld still hears of every
// namespace's blobs (coop's landed copy is dropped whoever pulled it).
func TestObserverSharedNamespaces(t *testing.T) {
	ctx := context.Background()
	pub, priv := digest.FromString("public"), digest.FromString("private")
	for _, tc := range []struct {
		name       string
		namespaces []string
		// after the events below: whether pub and priv are listed
		pub, priv bool
	}{
		{"every namespace", nil, true, true},
		{"listed only", []string{"k8s.io"}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorded{blobs: map[digest.Digest]int64{}}
			var held []digest.Digest
			o := newObserver(nil, ObserverOptions{Recorder: rec, Namespaces: tc.namespaces,
				OnHeld: func(_ context.Context, d digest.Digest) { held = append(held, d) }})
			o.add(ctx, pub, "k8s.io", 6)
			o.add(ctx, priv, "tenant-a", 7)
			o.add(ctx, pub, "tenant-a", 6)
			if rec.has(pub) != tc.pub || rec.has(priv) != tc.priv {
				t.Fatalf("listed %v, want public %v, private %v", rec.blobs, tc.pub, tc.priv)
			}
			if !slices.Contains(held, pub) || !slices.Contains(held, priv) {
				t.Fatalf("OnHeld heard of %v, want both blobs", held)
			}
			if !tc.priv {
				if _, err := o.Info(ctx, priv); !errdefs.IsNotFound(err) {
					t.Fatalf("Info of an unshared blob: %v, want not found", err)
				}
				if _, err := o.ReaderAt(ctx, ocispec.Descriptor{Digest: priv, Size: 7}); !errdefs.IsNotFound(err) {
					t.Fatalf("ReaderAt of an unshared blob: %v, want not found", err)
				}
			}
			// The unshared namespace's delete leaves the shared copy listed.
			o.remove(pub, "tenant-a")
			if !rec.has(pub) {
				t.Fatal("public blob unlisted when another namespace dropped it")
			}
			if ns, ok := o.namespace(pub); !ok || ns != "k8s.io" {
				t.Fatalf("public blob read from %q (%v), want k8s.io", ns, ok)
			}
			o.remove(pub, "k8s.io")
			o.remove(priv, "tenant-a")
			if rec.has(pub) || rec.has(priv) {
				t.Fatalf("still listed after every namespace dropped them: %v", rec.blobs)
			}
		})
	}
}
