package plugin

import (
	"context"
	"fmt"
	"sync"
	"time"

	eventsapi "github.com/containerd/containerd/api/events"
	containerd "github.com/containerd/containerd/v2/client"
	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Observer learns the blobs of a containerd that keeps its built-in content
// store, from its /content/create and /content/delete events (subscribed
// before listing, so nothing is missed), and reads them through containerd's
// content API for peers. If coop is down, containerd is untouched. A blob is
// held while any namespace holds it — any of the shared namespaces, when
// they are listed (ObserverOptions.Namespaces).
type Observer struct {
	client *containerd.Client
	rec    content.Recorder
	onHeld func(context.Context, digest.Digest)
	onNew  func(context.Context, digest.Digest, int64)
	shared map[string]bool // nil: every namespace
	sizes  *content.ExpectedSizes

	mu  sync.RWMutex
	nss map[digest.Digest]map[string]int64 // digest → shared namespace → size
}

// ObserverOptions configure an Observer.
type ObserverOptions struct {
	// Address is containerd's socket. Required.
	Address string
	// Recorder receives the blobs containerd holds. Required.
	Recorder content.Recorder
	// OnHeld, when set, is called for each blob containerd commits (and for
	// each it holds when the observer lists its store): the node then
	// drops its own copy of it, so that every blob is on disk once.
	OnHeld func(ctx context.Context, d digest.Digest)
	// Namespaces, when set, are the only namespaces whose blobs are
	// recorded and read for peers (coop node --share-namespaces): a blob
	// only other namespaces hold is neither listed nor served. OnHeld is
	// still called for every namespace. Empty: every namespace.
	Namespaces []string
	// OnCommitted, when set, is called for each blob containerd commits
	// while the observer follows it (not for those it lists at start),
	// before OnHeld.
	OnCommitted func(ctx context.Context, d digest.Digest, size int64)
	// Sizes, when set, learns the sizes of their blobs from the manifests
	// and indexes containerd commits (in any namespace): a pull commits the
	// manifest before it asks the mirror for the blobs.
	Sizes *content.ExpectedSizes
}

// NewObserver returns an observer of the containerd at o.Address.
func NewObserver(o ObserverOptions) (*Observer, error) {
	if o.Recorder == nil || o.Address == "" {
		return nil, fmt.Errorf("observer needs containerd's address and a recorder: %w", errdefs.ErrInvalidArgument)
	}
	for _, ns := range o.Namespaces {
		if ns == "" {
			return nil, fmt.Errorf("observer namespaces %q: an empty name: %w", o.Namespaces, errdefs.ErrInvalidArgument)
		}
	}
	c, err := containerd.New(o.Address)
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", o.Address, err)
	}
	return newObserver(c, o), nil
}

// newObserver returns an observer reading through c.
func newObserver(c *containerd.Client, o ObserverOptions) *Observer {
	obs := &Observer{client: c, rec: o.Recorder, onHeld: o.OnHeld, onNew: o.OnCommitted, sizes: o.Sizes, nss: map[digest.Digest]map[string]int64{}}
	if len(o.Namespaces) > 0 {
		obs.shared = map[string]bool{}
		for _, ns := range o.Namespaces {
			obs.shared[ns] = true
		}
	}
	return obs
}

// shares reports whether the blobs of namespace ns are recorded and served.
func (o *Observer) shares(ns string) bool { return o.shared == nil || o.shared[ns] }

// Close closes the containerd connection.
func (o *Observer) Close() error { return o.client.Close() }

// Run follows containerd until ctx ends, resubscribing and relisting after
// every break (containerd restarted).
func (o *Observer) Run(ctx context.Context) error {
	for {
		err := o.follow(ctx)
		if ctx.Err() != nil {
			return nil
		}
		log.G(ctx).WithError(err).Warn("lost containerd's events; resubscribing")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// follow subscribes, lists, then applies events until the stream breaks.
func (o *Observer) follow(ctx context.Context) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, errs := o.client.Subscribe(sctx, `topic=="/content/create"`, `topic=="/content/delete"`)
	if err := o.relist(ctx); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errs:
			return err
		case env := <-events:
			if env == nil || env.Event == nil {
				continue
			}
			v, err := typeurl.UnmarshalAny(env.Event)
			if err != nil {
				log.G(ctx).WithError(err).Debug("unreadable containerd event")
				continue
			}
			switch e := v.(type) {
			case *eventsapi.ContentCreate:
				if d, err := digest.Parse(e.Digest); err == nil {
					o.learn(ctx, d, env.Namespace, e.Size)
					if o.onNew != nil {
						o.onNew(ctx, d, e.Size)
					}
					o.add(ctx, d, env.Namespace, e.Size)
				}
			case *eventsapi.ContentDelete:
				if d, err := digest.Parse(e.Digest); err == nil {
					o.remove(d, env.Namespace)
				}
			}
		}
	}
}

// relist walks every namespace's content and makes the inventory match.
func (o *Observer) relist(ctx context.Context) error {
	nsList, err := o.client.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("list namespaces: %w", err)
	}
	seen := map[digest.Digest]map[string]int64{} // in the shared namespaces
	held := map[digest.Digest]bool{}             // in any namespace
	for _, ns := range nsList {
		nctx := namespaces.WithNamespace(ctx, ns)
		if err := o.client.ContentStore().Walk(nctx, func(info ctdcontent.Info) error {
			held[info.Digest] = true
			if !o.shares(ns) {
				return nil
			}
			if seen[info.Digest] == nil {
				seen[info.Digest] = map[string]int64{}
			}
			seen[info.Digest][ns] = info.Size
			return nil
		}); err != nil {
			return fmt.Errorf("walk content of %s: %w", ns, err)
		}
	}
	o.mu.Lock()
	var gone []digest.Digest
	for d := range o.nss {
		if seen[d] == nil {
			gone = append(gone, d)
		}
	}
	o.nss = seen
	o.mu.Unlock()
	for _, d := range gone {
		o.rec.Remove(d)
	}
	for d, m := range seen {
		for _, size := range m {
			o.rec.Add(d, size)
			break
		}
	}
	for d := range held {
		o.held(ctx, d)
	}
	return nil
}

func (o *Observer) add(ctx context.Context, d digest.Digest, ns string, size int64) {
	if !o.shares(ns) {
		o.held(ctx, d)
		return
	}
	o.mu.Lock()
	if o.nss[d] == nil {
		o.nss[d] = map[string]int64{}
	}
	o.nss[d][ns] = size
	o.mu.Unlock()
	o.rec.Add(d, size)
	o.held(ctx, d)
}

// childLabels are the label keys containerd gives a manifest or an index,
// before it fetches their children, naming each child (ChildGCLabels): the
// config, the layers l.0, l.1, ... and an index's manifests m.0, m.1, ...
func childLabelFilters(d digest.Digest) []string {
	fs := []string{fmt.Sprintf(`labels."containerd.io/gc.ref.content.config"==%q`, d.String())}
	for i := range maxChildLabels {
		fs = append(fs,
			fmt.Sprintf(`labels."containerd.io/gc.ref.content.l.%d"==%q`, i, d.String()),
			fmt.Sprintf(`labels."containerd.io/gc.ref.content.m.%d"==%q`, i, d.String()))
	}
	return fs
}

// maxChildLabels bounds the child labels looked up: layers of an image, or
// manifests of an index, beyond it are not found this way (their sizes still
// come from containerd's events).
const maxChildLabels = 128

// ExpectedSize returns the size the manifest being pulled gives d: from the
// manifests containerd's events brought, else from a manifest in
// containerd's store that names d. containerd labels a manifest with its
// children before it fetches them, so a blob requested during a pull is
// found even when the manifest's event has not arrived yet.
func (o *Observer) ExpectedSize(ctx context.Context, d digest.Digest) (int64, bool) {
	if o.sizes == nil {
		return 0, false
	}
	if s, ok := o.sizes.Size(d); ok {
		return s, true
	}
	nsList, err := o.client.NamespaceService().List(ctx)
	if err != nil {
		return 0, false
	}
	filters := childLabelFilters(d)
	for _, ns := range nsList {
		nctx := namespaces.WithNamespace(ctx, ns)
		var parents []ctdcontent.Info
		if err := o.client.ContentStore().Walk(nctx, func(info ctdcontent.Info) error {
			parents = append(parents, info)
			return nil
		}, filters...); err != nil {
			log.G(ctx).WithError(err).WithField("digest", d).Debug("cannot look up the manifests naming a blob")
			continue
		}
		for _, p := range parents {
			o.learn(nctx, p.Digest, ns, p.Size)
		}
		if s, ok := o.sizes.Size(d); ok {
			return s, true
		}
	}
	return 0, false
}

// learn reads a blob containerd committed to ns that may be a manifest or an
// index and teaches the observer's sizes its children.
func (o *Observer) learn(ctx context.Context, d digest.Digest, ns string, size int64) {
	if o.sizes == nil || size <= 0 || size > content.MaxManifestSize {
		return
	}
	nctx := namespaces.WithNamespace(ctx, ns)
	ra, err := o.client.ContentStore().ReaderAt(nctx, ocispec.Descriptor{Digest: d, Size: size})
	if err != nil {
		log.G(ctx).WithError(err).WithField("digest", d).Debug("cannot read a committed blob")
		return
	}
	defer ra.Close()
	if n := o.sizes.LearnBlob(d, ra, size); n > 0 {
		log.G(ctx).WithField("digest", d).WithField("blobs", n).Debug("sizes learned from a manifest")
	}
}

func (o *Observer) held(ctx context.Context, d digest.Digest) {
	if o.onHeld != nil {
		o.onHeld(ctx, d)
	}
}

func (o *Observer) remove(d digest.Digest, ns string) {
	if !o.shares(ns) {
		return
	}
	o.mu.Lock()
	m := o.nss[d]
	delete(m, ns)
	last := len(m) == 0
	if last {
		delete(o.nss, d)
	}
	o.mu.Unlock()
	if last {
		o.rec.Remove(d)
	}
}

// namespace returns a shared namespace holding d.
func (o *Observer) namespace(d digest.Digest) (string, bool) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	for ns := range o.nss[d] {
		return ns, true
	}
	return "", false
}

// Info returns d's info from containerd, if a shared namespace holds d;
// ErrNotFound otherwise.
func (o *Observer) Info(ctx context.Context, d digest.Digest) (ctdcontent.Info, error) {
	ns, ok := o.namespace(d)
	if !ok {
		return ctdcontent.Info{}, fmt.Errorf("blob %s: %w", d, errdefs.ErrNotFound)
	}
	return o.client.ContentStore().Info(namespaces.WithNamespace(ctx, ns), d)
}

// ReaderAt opens d through containerd's content API, if a shared namespace
// holds d; ErrNotFound otherwise.
func (o *Observer) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (ctdcontent.ReaderAt, error) {
	ns, ok := o.namespace(desc.Digest)
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", desc.Digest, errdefs.ErrNotFound)
	}
	return o.client.ContentStore().ReaderAt(namespaces.WithNamespace(ctx, ns), desc)
}

// unionStore reads from the first store that has the blob: coop's own
// (blobs the mirror landed) and containerd's, through the observer.
type unionStore struct {
	stores []blobReader
}

type blobReader interface {
	Info(ctx context.Context, d digest.Digest) (ctdcontent.Info, error)
	ReaderAt(ctx context.Context, desc ocispec.Descriptor) (ctdcontent.ReaderAt, error)
}

// NewUnionStore returns a store reading from stores in order.
func NewUnionStore(stores ...blobReader) interface {
	blobReader
} {
	return unionStore{stores: stores}
}

func (u unionStore) Info(ctx context.Context, d digest.Digest) (ctdcontent.Info, error) {
	for _, s := range u.stores {
		if info, err := s.Info(ctx, d); err == nil {
			return info, nil
		}
	}
	return ctdcontent.Info{}, fmt.Errorf("blob %s: %w", d, errdefs.ErrNotFound)
}

func (u unionStore) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (ctdcontent.ReaderAt, error) {
	for _, s := range u.stores {
		if _, err := s.Info(ctx, desc.Digest); err == nil {
			return s.ReaderAt(ctx, desc)
		}
	}
	return nil, fmt.Errorf("blob %s: %w", desc.Digest, errdefs.ErrNotFound)
}
