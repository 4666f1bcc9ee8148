package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
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
	"github.com/distribution/reference"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// MigrateOptions configure a migration, run at the destination.
type MigrateOptions struct {
	// From is the source node's peer URL. Required.
	From string
	// Namespace and ID name the container. Required.
	Namespace, ID string
	// Containerd is the destination's containerd socket. Required.
	Containerd string
	// Mirror is the destination coop node's mirror URL. Required.
	Mirror string
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
	// Peers reads from the source. Required.
	Peers *peers.Client
	// Progress, when set, receives a live per-layer progress display.
	Progress io.Writer
}

// LayerProvenance says where one blob came from.
type LayerProvenance struct {
	Digest      digest.Digest    `json:"digest"`
	Size        int64            `json:"size"`
	BytesByNode map[string]int64 `json:"bytes_by_node"`
	Seconds     float64          `json:"seconds"`
}

// MigrateResult is the outcome of a migration.
type MigrateResult struct {
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

// Migrate recreates container ID of the source at this node: it reads the
// source's record, pulls the image by digest through the local mirror with
// the source as a candidate besides the neighbours, creates the container
// with the same spec, labels and image, and starts it when asked. On error
// nothing it created is left behind.
func Migrate(ctx context.Context, o MigrateOptions) (_ *MigrateResult, retErr error) {
	start := time.Now()
	if o.From == "" || o.ID == "" || o.Namespace == "" || o.Containerd == "" || o.Mirror == "" || o.Peers == nil {
		return nil, fmt.Errorf("migrate needs a source, a container, containerd and the mirror: %w", errdefs.ErrInvalidArgument)
	}
	rec, err := o.Peers.Container(ctx, o.From, o.Namespace, o.ID)
	if err != nil {
		return nil, err
	}
	client, err := containerd.New(o.Containerd)
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", o.Containerd, err)
	}
	defer client.Close()
	ctx = namespaces.WithNamespace(ctx, o.Namespace)
	if _, err := client.LoadContainer(ctx, o.ID); err == nil {
		return nil, fmt.Errorf("container %s/%s already exists here: %w", o.Namespace, o.ID, errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("containerd at %s: %w", o.Containerd, err)
	}

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
	srcID, err := addSource(ctx, o.Mirror, SourceRequest{Node: rec.Node, URL: o.From, Blobs: blobs})
	if err != nil {
		return nil, err
	}
	defer dropSourceAt(context.WithoutCancel(ctx), o.Mirror, srcID)

	_, imgErr := client.GetImage(ctx, rec.Image)
	imageExisted := imgErr == nil
	var created containerd.Container
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
		if !imageExisted {
			_ = client.ImageService().Delete(cctx, rec.Image)
		}
	}()

	snapshotter := rec.Snapshotter
	if o.Snapshotter != "" {
		snapshotter = o.Snapshotter
	}
	pullStart := time.Now()
	stopProgress := func() {}
	if o.Progress != nil {
		stopProgress = showProgress(ctx, o.Progress, o.Mirror, layers, local)
	}
	img, err := pullByDigest(ctx, client, rec, snapshotter, o.HostsDir)
	stopProgress()
	if err != nil {
		return nil, err
	}
	pullSeconds := time.Since(pullStart).Seconds()

	var spec oci.Spec
	if err := json.Unmarshal(rec.Spec, &spec); err != nil {
		return nil, fmt.Errorf("container spec from the source: %v: %w", err, errdefs.ErrDataLoss)
	}
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
		containerd.WithSpec(&spec),
		containerd.WithContainerLabels(rec.Labels),
		containerd.WithRuntime(rec.Runtime, runtimeOpts),
	)
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", o.ID, err)
	}
	res := &MigrateResult{Container: o.Namespace + "/" + o.ID, Source: rec.Node, PullSeconds: pullSeconds}
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

// pullByDigest pulls rec's image by digest through the hosts.toml tree (the
// mirror first), unpacks it, and names it as on the source.
func pullByDigest(ctx context.Context, client *containerd.Client, rec *peers.ContainerRecord, snapshotter, hostsDir string) (containerd.Image, error) {
	named, err := reference.ParseNormalizedNamed(rec.Image)
	if err != nil {
		return nil, fmt.Errorf("image name %q: %v: %w", rec.Image, err, errdefs.ErrInvalidArgument)
	}
	byDigest := reference.TrimNamed(named).String() + "@" + rec.Target.Digest.String()
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
	want := images.Image{Name: rec.Image, Target: rec.Target, Labels: img.Labels()}
	if _, err := is.Create(ctx, want); errdefs.IsAlreadyExists(err) {
		_, err = is.Update(ctx, want, "target")
		if err != nil {
			return nil, fmt.Errorf("name image %s: %w", rec.Image, err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("name image %s: %w", rec.Image, err)
	}
	named2, err := client.GetImage(ctx, rec.Image)
	if err != nil {
		return nil, err
	}
	return named2, nil
}

func addSource(ctx context.Context, mirror string, req SourceRequest) (string, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return "", err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(mirror, "/")+SourcesPath, bytes.NewReader(b))
	if err != nil {
		return "", err
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(hreq)
	if err != nil {
		return "", fmt.Errorf("local coop node at %s: %v: %w", mirror, err, errdefs.ErrUnavailable)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return "", fmt.Errorf("local coop node at %s: add source: %s: %s", mirror, resp.Status, bytes.TrimSpace(body))
	}
	var sr SourceResponse
	if err := json.NewDecoder(resp.Body).Decode(&sr); err != nil {
		return "", fmt.Errorf("local coop node at %s: add source: %w", mirror, err)
	}
	return sr.ID, nil
}

func dropSourceAt(ctx context.Context, mirror, id string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, strings.TrimRight(mirror, "/")+SourcesPath+"/"+id, nil)
	if err != nil {
		return
	}
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
}

// mirrorDownloads reads the mirror's report for dgsts.
func mirrorDownloads(ctx context.Context, mirror string, dgsts []digest.Digest) (map[digest.Digest]Download, error) {
	q := make([]string, len(dgsts))
	for i, d := range dgsts {
		q[i] = "digest=" + d.String()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(mirror, "/")+DownloadsPath+"?"+strings.Join(q, "&"), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("downloads: %s", resp.Status)
	}
	var dls []Download
	if err := json.NewDecoder(resp.Body).Decode(&dls); err != nil {
		return nil, err
	}
	out := make(map[digest.Digest]Download, len(dls))
	for _, d := range dls {
		out[d.Digest] = d
	}
	return out, nil
}

// provenance builds the per-layer table and the totals: bytes the mirror
// took from each peer, the rest of a blob from the registry, and blobs held
// before the migration as local.
func provenance(ctx context.Context, mirror string, blobs map[digest.Digest]int64, layers []ocispec.Descriptor, local map[digest.Digest]bool) ([]LayerProvenance, map[string]int64) {
	var all []digest.Digest
	for d := range blobs {
		all = append(all, d)
	}
	dls, err := mirrorDownloads(ctx, mirror, all)
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

// showProgress prints, until stopped, one line per layer: bytes, rate and
// the peers it comes from.
func showProgress(ctx context.Context, w io.Writer, mirror string, layers []ocispec.Descriptor, local map[digest.Digest]bool) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	dgsts := make([]digest.Digest, len(layers))
	for i, l := range layers {
		dgsts[i] = l.Digest
	}
	lines := 0
	draw := func() {
		dls, err := mirrorDownloads(context.WithoutCancel(ctx), mirror, dgsts)
		if err != nil {
			return
		}
		var b strings.Builder
		if lines > 0 {
			fmt.Fprintf(&b, "\033[%dA", lines) // back over the last drawing
		}
		for _, l := range layers {
			status, got, rate, from := "waiting", int64(0), 0.0, ""
			switch dl, ok := dls[l.Digest]; {
			case local[l.Digest]:
				status, got = "exists", l.Size
			case ok:
				var names []string
				for n, v := range dl.BytesByNode {
					got += v
					names = append(names, n)
				}
				got = min(got, l.Size)
				if dl.Seconds > 0 {
					rate = float64(got) / dl.Seconds
				}
				status = "fetching"
				if dl.Done {
					status = "done"
				}
				from = strings.Join(names, ",")
			}
			fmt.Fprintf(&b, "\033[2K%-19s %-8s %8.1f/%-8.1f MiB %7.1f MiB/s  %s\n", shortDigest(l.Digest), status,
				float64(got)/(1<<20), float64(l.Size)/(1<<20), rate/(1<<20), from)
		}
		lines = len(layers)
		_, _ = io.WriteString(w, b.String())
	}
	if f, ok := w.(*os.File); !ok || !isTerminal(f) {
		// Not a terminal: no redrawing, one final picture.
		return func() { cancel(); draw() }
	}
	wg.Go(func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				draw()
				return
			case <-t.C:
				draw()
			}
		}
	})
	return func() { cancel(); wg.Wait() }
}

// isTerminal reports whether f is a character device (a terminal).
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func shortDigest(d digest.Digest) string {
	s := d.String()
	if len(s) > 19 {
		return s[:19]
	}
	return s
}
