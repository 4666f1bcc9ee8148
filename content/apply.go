package content

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// maxApplyTries bounds the unpacks of one layer: the first, and one after
// each rewind of its claim (a rewound claim is fetched again from the
// registry, once).
const maxApplyTries = 3

// applyStateKey is the context key of an unpack's applyState.
type applyStateKey struct{}

// applyState is what an unpack learns of the claimed blobs it reads.
type applyState struct {
	mu    sync.Mutex
	reads []claimRead
}

// claimRead is a claim of cs an unpack read, at its gen then.
type claimRead struct {
	cs  *ClaimStore
	c   *claim
	gen int
}

// read records that the unpack opened c of cs at gen (nil: no unpack to
// tell).
func (s *applyState) read(cs *ClaimStore, c *claim, gen int) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reads = append(s.reads, claimRead{cs, c, gen})
}

// settle waits until every claim the unpack read is verified, failed or
// rewound, and says whether one was rewound: its bytes were bad, and it is
// being fetched again. A failed one is forgotten by containerd before
// settle returns, so that the pull's error finds no record of it.
func (s *applyState) settle(ctx context.Context) bool {
	s.mu.Lock()
	reads := slices.Clone(s.reads)
	s.mu.Unlock()
	rewound := false
	for _, r := range reads {
		if r.c.settle(ctx, r.gen) {
			rewound = true
			continue
		}
		r.c.mu.Lock()
		failed := r.c.err != nil
		r.c.mu.Unlock()
		if failed {
			r.cs.forgetFailed(ctx, r.c)
		}
	}
	return rewound
}

// restartingApplier is containerd's file-system applier, which starts an
// unpack over when the claimed layer it read is rewound (its source found
// the bytes bad, and fetches the blob again from the registry). An unpack
// of a claimed layer that fails before the layer is verified waits until it
// is: verified, the error stands (the layer itself is broken); failed, the
// claim's error ends the pull; rewound, the snapshot's directory is emptied
// and the layer applied again. It does so only when that directory was
// empty before the unpack (overlay's upperdir, or the bind mount of a first
// layer), so that emptying it drops exactly what the unpack wrote.
type restartingApplier struct {
	diff.Applier
}

// Apply applies the layer desc to mounts.
func (a restartingApplier) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	dir := emptyTarget(mounts)
	for try := 1; ; try++ {
		st := &applyState{}
		d, err := a.Applier.Apply(context.WithValue(ctx, applyStateKey{}, st), desc, mounts, opts...)
		if err == nil || dir == "" || try == maxApplyTries || !st.settle(ctx) {
			return d, err
		}
		log.G(ctx).WithError(err).WithField("digest", desc.Digest).WithField("dir", dir).Warn("the claimed layer was fetched again: unpacking it over")
		if cerr := emptyDir(dir); cerr != nil {
			return d, errors.Join(err, fmt.Errorf("empty %s to unpack again: %w", dir, cerr))
		}
	}
}

// emptyTarget returns the directory an unpack into mounts writes, when it
// is empty now; otherwise "".
func emptyTarget(mounts []mount.Mount) string {
	if len(mounts) != 1 {
		return ""
	}
	m := mounts[0]
	var dir string
	switch m.Type {
	case "overlay":
		for _, o := range m.Options {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				dir = v
			}
		}
	case "bind":
		dir = m.Source
	}
	if dir == "" || !filepath.IsAbs(dir) {
		return ""
	}
	f, err := os.Open(dir)
	if err != nil {
		return ""
	}
	defer f.Close()
	if names, err := f.Readdirnames(1); len(names) > 0 || err == nil {
		return ""
	}
	return dir
}

// emptyDir removes everything in dir.
func emptyDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}
