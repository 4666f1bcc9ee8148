// Package migrate recreates a container of another coop node here: it reads
// the source's container record, refuses a spec that asks for more than a
// new container gets here (policy.go), pulls the image by digest through the
// local mirror with the source as a candidate besides the neighbours, and
// creates (and starts) the same container. It never re-points an image
// name that exists here.
package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/api/types/runc/options"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/mirror"
	"github.com/distribution/reference"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Options configure a migration, run at the destination.
type Options struct {
	// From is the source node's peer URL. Required.
	From string
	// Namespace and ID name the container. Required.
	Namespace, ID string
	// Containerd is the destination's containerd socket. Required.
	Containerd string
	// Mirror calls the destination coop node's mirror API. Required.
	Mirror *mirror.Client
	// HostsDir is containerd's hosts.toml directory (the mirror first).
	// Required.
	HostsDir string
	// Snapshotter overrides the source's snapshotter.
	Snapshotter string
	// CgroupsPath overrides the spec's cgroups path (several nodes on one
	// host need distinct ones).
	CgroupsPath string
	// RuncRoot sets runc's state directory (several nodes on one host).
	RuncRoot string
	// Start starts the container; StopSource then stops the source's.
	Start, StopSource bool
	// AllowPrivileged recreates a spec CheckSpec refuses (capabilities,
	// host mounts, host namespaces, devices, hooks beyond the defaults) and
	// a runtime named by a path.
	AllowPrivileged bool
	// Peers reads from the source. Required.
	Peers *peers.Client
	// Progress, when set, is called as the pull starts with the image's
	// layers and those already here; the pull calls stop when it ends.
	Progress func(ctx context.Context, layers []ocispec.Descriptor, local map[digest.Digest]bool) (stop func())
}

// LayerProvenance says where one blob came from.
type LayerProvenance struct {
	Digest      digest.Digest    `json:"digest"`
	Size        int64            `json:"size"`
	BytesByNode map[string]int64 `json:"bytes_by_node"`
	Seconds     float64          `json:"seconds"`
}

// Result is the outcome of a migration.
type Result struct {
	Container   string            `json:"container"`
	Source      string            `json:"source"`
	Seconds     float64           `json:"seconds"`
	PullSeconds float64           `json:"pull_seconds"`
	Started     bool              `json:"started"`
	Layers      []LayerProvenance `json:"layers"`
	BytesByNode map[string]int64  `json:"bytes_by_node"`
}

// Provenance names in bytes_by_node for bytes that came from no peer.
const (
	FromRegistry = "registry"
	FromLocal    = "local"
)

// Run recreates container ID of the source at this node: it reads the
// source's record, checks its spec (CheckSpec, CheckRuntime: an error of
// class errdefs.ErrPermissionDenied unless o.AllowPrivileged) and that no
// image of the same name with another target exists here
// (errdefs.ErrAlreadyExists), pulls the image by digest through the local
// mirror with the source as a candidate besides the neighbours, creates the
// container with the same spec, labels and image, and starts it when asked.
// On error nothing it created is left behind.
func Run(ctx context.Context, o Options) (_ *Result, retErr error) {
	start := time.Now()
	if o.From == "" || o.ID == "" || o.Namespace == "" || o.Containerd == "" || o.Mirror == nil || o.Peers == nil {
		return nil, fmt.Errorf("migrate needs a source, a container, containerd and the mirror: %w", errdefs.ErrInvalidArgument)
	}
	rec, err := o.Peers.Container(ctx, o.From, o.Namespace, o.ID)
	if err != nil {
		return nil, err
	}
	ctx = namespaces.WithNamespace(ctx, o.Namespace)
	spec, err := checkRecord(ctx, rec, o.ID, o.AllowPrivileged)
	if err != nil {
		return nil, fmt.Errorf("container %s/%s of %s: %w", o.Namespace, o.ID, rec.Node, err)
	}
	client, err := containerd.New(o.Containerd)
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", o.Containerd, err)
	}
	defer client.Close()
	if _, err := client.LoadContainer(ctx, o.ID); err == nil {
		return nil, fmt.Errorf("container %s/%s already exists here: %w", o.Namespace, o.ID, errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("containerd at %s: %w", o.Containerd, err)
	}
	// An image name here is never re-pointed: the same target is reused,
	// another is an error, before anything is fetched.
	if err := sameImage(ctx, client.ImageService(), rec.Image, rec.Target); err != nil {
		return nil, err
	}
	byDigest, err := digestRef(rec.Image, rec.Target.Digest)
	if err != nil {
		return nil, err
	}
	_, err = client.ImageService().Get(ctx, byDigest)
	byDigestExisted := !errdefs.IsNotFound(err) // the pull creates it

	blobs, layers, err := imageBlobs(ctx, o.Peers, o.From, rec.Target)
	if err != nil {
		return nil, fmt.Errorf("image %s at the source: %w", rec.Image, err)
	}
	// What this node already holds is not downloaded.
	local := map[digest.Digest]bool{}
	for d := range blobs {
		if _, err := client.ContentStore().Info(ctx, d); err == nil {
			local[d] = true
		}
	}
	srcID, err := o.Mirror.AddSource(ctx, mirror.SourceRequest{Node: rec.Node, URL: o.From, Blobs: blobs})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err := o.Mirror.DropSource(context.WithoutCancel(ctx), srcID); err != nil {
			log.G(ctx).WithError(err).Warn("could not drop the migration's source from the mirror; its TTL will")
		}
	}()

	var (
		created containerd.Container
		named   bool // rec.Image named by this migration
	)
	defer func() {
		if retErr == nil {
			return
		}
		cctx := context.WithoutCancel(ctx)
		if created != nil {
			if task, err := created.Task(cctx, nil); err == nil {
				_, _ = task.Delete(cctx, containerd.WithProcessKill)
			}
			if err := created.Delete(cctx, containerd.WithSnapshotCleanup); err != nil {
				log.G(ctx).WithError(err).Warn("could not remove the half-created container")
			}
		}
		if named {
			_ = client.ImageService().Delete(cctx, rec.Image)
		}
		if !byDigestExisted {
			_ = client.ImageService().Delete(cctx, byDigest)
		}
	}()

	snapshotter := rec.Snapshotter
	if o.Snapshotter != "" {
		snapshotter = o.Snapshotter
	}
	pullStart := time.Now()
	stopProgress := func() {}
	if o.Progress != nil {
		stopProgress = o.Progress(ctx, layers, local)
	}
	img, err := pullByDigest(ctx, client, rec, byDigest, snapshotter, o.HostsDir, &named)
	stopProgress()
	if err != nil {
		return nil, err
	}
	pullSeconds := time.Since(pullStart).Seconds()

	if o.CgroupsPath != "" && spec.Linux != nil {
		spec.Linux.CgroupsPath = o.CgroupsPath
	}
	var runtimeOpts any
	if o.RuncRoot != "" {
		runtimeOpts = &options.Options{Root: o.RuncRoot}
	}
	created, err = client.NewContainer(ctx, o.ID,
		containerd.WithImage(img),
		containerd.WithSnapshotter(snapshotter),
		containerd.WithNewSnapshot(o.ID, img),
		containerd.WithSpec(spec),
		containerd.WithContainerLabels(rec.Labels),
		containerd.WithRuntime(rec.Runtime, runtimeOpts),
	)
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	}
	res := &Result{Container: o.Namespace + "/" + o.ID, Source: rec.Node, PullSeconds: pullSeconds}
	if o.Start {
		task, err := created.NewTask(ctx, cio.NullIO)
		if err != nil {
			return nil, fmt.Errorf("create task %s: %w", o.ID, err)
		}
		if err := task.Start(ctx); err != nil {
			return nil, fmt.Errorf("start %s: %w", o.ID, err)
		}
		res.Started = true
	}
	// The migration is done when the container runs here; stopping the
	// source (which may wait out its grace period) is not counted.
	res.Seconds = time.Since(start).Seconds()
	if o.Start {
		if o.StopSource {
			if err := o.Peers.StopContainer(ctx, o.From, o.Namespace, o.ID); err != nil {
				// The destination runs: report, do not undo.
				log.G(ctx).WithError(err).Warn("container runs here, but the source's could not be stopped")
			}
		}
	}
	res.Layers, res.BytesByNode = provenance(ctx, o.Mirror, blobs, layers, local)
	return res, nil
}

// imageBlobs reads the image's index (if any), manifest and config
// descriptors from the source, verified, for this platform. It returns every
// blob (digest → size) and the layers in order.
func imageBlobs(ctx context.Context, pc *peers.Client, from string, target ocispec.Descriptor) (map[digest.Digest]int64, []ocispec.Descriptor, error) {
	blobs := map[digest.Digest]int64{target.Digest: target.Size}
	desc := target
	for range 2 {
		b, _, err := pc.FetchManifest(ctx, from, desc.Digest)
		if err != nil {
			return nil, nil, err
		}
		var probe struct {
			Manifests []ocispec.Descriptor `json:"manifests"`
			Config    ocispec.Descriptor   `json:"config"`
			Layers    []ocispec.Descriptor `json:"layers"`
		}
		if err := json.Unmarshal(b, &probe); err != nil {
			return nil, nil, fmt.Errorf("manifest %s: %v: %w", desc.Digest, err, errdefs.ErrDataLoss)
		}
		if probe.Manifests == nil {
			blobs[probe.Config.Digest] = probe.Config.Size
			for _, l := range probe.Layers {
				blobs[l.Digest] = l.Size
			}
			return blobs, probe.Layers, nil
		}
		match := platforms.Default()
		found := false
		for _, m := range probe.Manifests {
			if m.Platform == nil || match.Match(*m.Platform) {
				desc, found = m, true
				break
			}
		}
		if !found {
			return nil, nil, fmt.Errorf("index %s has no manifest for %s: %w", target.Digest, platforms.DefaultString(), errdefs.ErrNotFound)
		}
		blobs[desc.Digest] = desc.Size
	}
	return nil, nil, fmt.Errorf("nested index at %s: %w", target.Digest, errdefs.ErrNotImplemented)
}

// checkRecord decodes rec's spec and refuses, unless allowPrivileged, a
// spec that asks for more than a new container id gets here and a runtime
// named by a path.
func checkRecord(ctx context.Context, rec *peers.ContainerRecord, id string, allowPrivileged bool) (*oci.Spec, error) {
	var spec oci.Spec
	if err := json.Unmarshal(rec.Spec, &spec); err != nil {
		return nil, fmt.Errorf("container spec from the source: %v: %w", err, errdefs.ErrDataLoss)
	}
	def, err := DefaultSpec(ctx, id)
	if err != nil {
		return nil, err
	}
	errs := errors.Join(CheckRuntime(rec.Runtime), CheckSpec(&spec, def))
	if errs == nil {
		return &spec, nil
	}
	if !allowPrivileged {
		return nil, errs
	}
	log.G(ctx).WithError(errs).Warn("recreating a privileged container (--allow-privileged)")
	return &spec, nil
}

// sameImage returns nil when no image named name exists here or it has
// target; one with another target is an error of class
// errdefs.ErrAlreadyExists naming both digests.
func sameImage(ctx context.Context, is images.Store, name string, target ocispec.Descriptor) error {
	img, err := is.Get(ctx, name)
	switch {
	case errdefs.IsNotFound(err):
		return nil
	case err != nil:
		return fmt.Errorf("image %s here: %w", name, err)
	case img.Target.Digest != target.Digest:
		return fmt.Errorf("image %s exists here with target %s, the source's is %s: not re-pointed (remove or rename it here first): %w",
			name, img.Target.Digest, target.Digest, errdefs.ErrAlreadyExists)
	}
	return nil
}

// digestRef returns name's repository at dgst (registry.example/repo@sha256:...).
func digestRef(name string, dgst digest.Digest) (string, error) {
	named, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return "", fmt.Errorf("image name %q: %v: %w", name, err, errdefs.ErrInvalidArgument)
	}
	return reference.TrimNamed(named).String() + "@" + dgst.String(), nil
}

// pullByDigest pulls rec's image by digest (byDigest) through the hosts.toml
// tree (the mirror first), unpacks it, and names it as on the source, unless
// an image of that name exists with another target (errdefs.ErrAlreadyExists).
// It sets *named when it created the name.
func pullByDigest(ctx context.Context, client *containerd.Client, rec *peers.ContainerRecord, byDigest, snapshotter, hostsDir string, named *bool) (containerd.Image, error) {
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: config.ConfigureHosts(ctx, config.HostOptions{HostDir: config.HostDirFromRoot(hostsDir)}),
	})
	img, err := client.Pull(ctx, byDigest,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithPlatformMatcher(platforms.Default()),
	)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", byDigest, err)
	}
	is := client.ImageService()
	_, err = is.Create(ctx, images.Image{Name: rec.Image, Target: rec.Target, Labels: img.Labels()})
	switch {
	case err == nil:
		*named = true
	case errdefs.IsAlreadyExists(err):
		// There before (checked) or named meanwhile: only the same target
		// will do.
		if err := sameImage(ctx, is, rec.Image, rec.Target); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("name image %s: %w", rec.Image, err)
	}
	return client.GetImage(ctx, rec.Image)
}

// provenance builds the per-layer table and the totals: bytes the mirror
// took from each peer, the rest of a blob from the registry, and blobs held
// before the migration as local.
func provenance(ctx context.Context, mc *mirror.Client, blobs map[digest.Digest]int64, layers []ocispec.Descriptor, local map[digest.Digest]bool) ([]LayerProvenance, map[string]int64) {
	var all []digest.Digest
	for d := range blobs {
		all = append(all, d)
	}
	dls, err := mc.Downloads(ctx, all)
	if err != nil {
		log.G(ctx).WithError(err).Warn("no provenance from the mirror")
	}
	row := func(d digest.Digest, size int64) LayerProvenance {
		p := LayerProvenance{Digest: d, Size: size, BytesByNode: map[string]int64{}}
		if local[d] {
			p.BytesByNode[FromLocal] = size
			return p
		}
		var fromPeers int64
		if dl, ok := dls[d]; ok && !dl.Failed {
			for n, b := range dl.BytesByNode {
				p.BytesByNode[n] = b
				fromPeers += b
			}
			p.Seconds = dl.Seconds
		}
		if rest := size - fromPeers; rest > 0 {
			p.BytesByNode[FromRegistry] = rest
		}
		return p
	}
	totals := map[string]int64{}
	for d, size := range blobs {
		for n, b := range row(d, size).BytesByNode {
			totals[n] += b
		}
	}
	var rows []LayerProvenance
	for _, l := range layers {
		rows = append(rows, row(l.Digest, l.Size))
	}
	return rows, totals
}
