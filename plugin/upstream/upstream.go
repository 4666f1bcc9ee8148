// Package upstream fetches blobs from the registries pulls come from, so
// that a claim never has to fail its pull: it learns the registry and the
// repository of each pull from the manifest requests containerd sends the
// mirror (/v2/<repo>/manifests/<ref>?ns=<registry>), and the children of
// each manifest from the manifests committed on the node (Parents). It checks
// once per repository that coop may pull from it (the anonymous token flow,
// or the credentials the operator gives coop), and fetches blobs as
// containerd would: with containerd's own registry client, through the
// hosts.toml tree of containerd's config_path, coop's mirror left out.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/distribution/reference"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
)

// Parents tell the manifest or index a blob was named by (the last one
// committed on the node naming it): content.ExpectedSizes.
type Parents interface {
	Parent(dgst digest.Digest) (digest.Digest, bool)
}

// Defaults of Options.
const (
	DefaultMaxOrigins = 1 << 16
	DefaultMaxRepos   = 4096
	// DefaultProbeTTL is how long a repository coop may pull from stays
	// usable before it is checked again.
	DefaultProbeTTL = 10 * time.Minute
	// DefaultDeniedTTL is how long a repository coop could not pull from
	// (denied, or unreachable) stays unusable.
	DefaultDeniedTTL = 30 * time.Second
	// maxProbes bounds the checks running at once; more wait for the next
	// manifest request.
	maxProbes = 4
	// probeTimeout bounds one check.
	probeTimeout = 15 * time.Second
	// hostsTTL is how long the hosts of a registry (hosts.toml, and the
	// authorizer holding its tokens) are kept before hosts.toml is read
	// again.
	hostsTTL = time.Minute
	// maxParentDepth bounds the walk from a blob to the manifest request
	// that named its repository (layer → manifest → index).
	maxParentDepth = 3
)

// Options configure Registries.
type Options struct {
	// HostsDir is containerd's registry config_path (the hosts.toml tree).
	// Empty: each registry at https://<host> (docker.io:
	// registry-1.docker.io), as containerd does without one.
	HostsDir string
	// Skip are the host:port addresses never fetched from: coop's own
	// mirror, which hosts.toml lists first.
	Skip []string
	// Credentials give the user and secret for a registry host; nil: the
	// anonymous token flow only. See LoadCredentials.
	Credentials func(host string) (user, secret string, err error)
	// Parents link a blob to the manifest naming it. Required.
	Parents Parents
	// MaxOrigins bounds the manifests remembered with their repository.
	// Default DefaultMaxOrigins.
	MaxOrigins int
	// MaxRepos bounds the repositories remembered with their check.
	// Default DefaultMaxRepos.
	MaxRepos int
	// ProbeTTL and DeniedTTL: see DefaultProbeTTL and DefaultDeniedTTL.
	ProbeTTL, DeniedTTL time.Duration
	// Registerer receives the metrics; nil registers nothing.
	Registerer prometheus.Registerer
	// OnBytes, when set, is told the blob bytes coop fetched from
	// registries (the node's coop_registry_bytes_total).
	OnBytes func(n int)
	// UpdateClient, when set, adjusts each HTTP client made for a registry
	// (tests).
	UpdateClient func(*http.Client) error
}

// Origin is where a pull comes from: a registry host as containerd names
// it (docker.io, registry.example:5000) and a repository there.
type Origin struct {
	Host string
	Repo string
}

// Ref returns the origin as a reference name: host/repo.
func (o Origin) Ref() string { return o.Host + "/" + o.Repo }

// probe results (coop_registry_checks_total).
const (
	resultOK     = "ok"
	resultDenied = "denied"
	resultError  = "error"
)

// Reach is what coop knows of its access to a blob's registry.
type Reach int

const (
	// Unknown: no pull named the blob's repository, or its first check
	// is running.
	Unknown Reach = iota
	// Usable: coop may pull from the repository.
	Usable
	// Denied: the registry answers, but refuses coop (401, 403, 404):
	// containerd, with credentials of its own, may still pull.
	Denied
	// Down: the registry does not answer: nobody can pull from it now.
	Down
	// Checking: the repository's first check is running.
	Checking
)

func (r Reach) String() string {
	return [...]string{"unknown", "usable", "denied", "down", "checking"}[r]
}

type repoState struct {
	reach   Reach
	checked time.Time
	running bool
}

type hostsEntry struct {
	hosts []docker.RegistryHost
	at    time.Time
}

// Registries know the registry each blob being pulled comes from and fetch
// blobs from it. Close waits for the checks it runs.
type Registries struct {
	o       Options
	hostsFn docker.RegistryHosts
	skip    map[string]bool

	bg   context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	origins *content.Bounded[digest.Digest, Origin]
	repos   map[Origin]*repoState
	probes  int
	hosts   map[string]hostsEntry

	checks *prometheus.CounterVec
}

// New returns Registries. ctx lends its values (the logger) to the checks
// run in the background, not its lifetime: they run until Close.
func New(ctx context.Context, opts Options) (*Registries, error) {
	o := opts
	if o.Parents == nil {
		return nil, fmt.Errorf("upstream registries need the manifests' parents: %w", errdefs.ErrInvalidArgument)
	}
	if o.MaxOrigins == 0 {
		o.MaxOrigins = DefaultMaxOrigins
	}
	if o.MaxRepos == 0 {
		o.MaxRepos = DefaultMaxRepos
	}
	if o.ProbeTTL == 0 {
		o.ProbeTTL = DefaultProbeTTL
	}
	if o.DeniedTTL == 0 {
		o.DeniedTTL = DefaultDeniedTTL
	}
	if o.MaxOrigins < 0 || o.MaxRepos < 0 || o.ProbeTTL < 0 || o.DeniedTTL < 0 {
		return nil, fmt.Errorf("upstream bounds and TTLs must be positive: %w", errdefs.ErrInvalidArgument)
	}
	r := &Registries{
		o: o, skip: map[string]bool{},
		origins: content.NewBounded[digest.Digest, Origin](o.MaxOrigins), repos: map[Origin]*repoState{}, hosts: map[string]hostsEntry{},
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coop_registry_checks_total",
			Help: "Checks that coop may pull from a repository of a registry (anonymous token flow or the credentials given), by result: ok, denied (401/403: claims there need other peers as their fallback), error.",
		}, []string{"result"}),
	}
	for _, s := range o.Skip {
		r.skip[s] = true
	}
	hopts := config.HostOptions{Credentials: o.Credentials}
	if o.HostsDir != "" {
		hopts.HostDir = config.HostDirFromRoot(o.HostsDir)
	}
	if o.UpdateClient != nil {
		hopts.UpdateClient = o.UpdateClient
	}
	r.hostsFn = config.ConfigureHosts(ctx, hopts)
	if o.Registerer != nil {
		if err := o.Registerer.Register(r.checks); err != nil {
			return nil, fmt.Errorf("upstream metrics: %w", err)
		}
	}
	r.bg, r.stop = context.WithCancel(context.WithoutCancel(ctx))
	return r, nil
}

// Close stops the checks running and waits for them. It is safe to call
// twice.
func (r *Registries) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.stop()
	r.wg.Wait()
	return nil
}

// Seen records a manifest request containerd sent the mirror: repo at the
// registry host, reference ref (a tag or a digest). A digest is remembered
// with its origin; a repository not checked recently is checked in the
// background. Invalid names are ignored.
func (r *Registries) Seen(ctx context.Context, host, repo, ref string) {
	o, ok := parseOrigin(host, repo)
	if !ok {
		return
	}
	dgst, derr := digest.Parse(ref)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	if derr == nil {
		r.origins.Put(dgst, o)
	}
	st := r.repos[o]
	now := time.Now()
	if st != nil && (st.running || now.Sub(st.checked) < r.ttl(st.reach)) {
		return
	}
	if r.probes >= maxProbes {
		return
	}
	if st == nil {
		if len(r.repos) >= r.o.MaxRepos {
			r.evictRepoLocked(now)
			if len(r.repos) >= r.o.MaxRepos {
				return
			}
		}
		st = &repoState{}
		r.repos[o] = st
	}
	st.running = true
	r.probes++
	probeRef := o.Ref() + ":" + ref
	if derr == nil {
		probeRef = o.Ref() + "@" + ref
	}
	r.wg.Go(func() { r.probe(log.WithLogger(r.bg, log.G(ctx)), o, probeRef) })
}

func (r *Registries) ttl(reach Reach) time.Duration {
	if reach == Usable {
		return r.o.ProbeTTL
	}
	return r.o.DeniedTTL
}

// evictRepoLocked drops the repositories whose check expired.
func (r *Registries) evictRepoLocked(now time.Time) {
	for o, st := range r.repos {
		if !st.running && now.Sub(st.checked) >= r.ttl(st.reach) {
			delete(r.repos, o)
		}
	}
}

// probe checks that coop may pull from o: it resolves ref there, with the
// token flow and the credentials.
func (r *Registries) probe(ctx context.Context, o Origin, ref string) {
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("registry", o.Host).WithField("repository", o.Repo))
	pctx, cancel := context.WithTimeout(ctx, probeTimeout)
	_, _, err := r.resolver().Resolve(pctx, ref)
	cancel()
	result, reach := resultOK, Usable
	var status remoteerrors.ErrUnexpectedStatus
	switch {
	case err == nil:
	case errdefs.IsUnauthorized(err) || errdefs.IsPermissionDenied(err) || errdefs.IsNotFound(err):
		// A registry answers 404 as well to a repository it hides.
		result, reach = resultDenied, Denied
	case errors.As(err, &status) && (status.StatusCode == http.StatusUnauthorized || status.StatusCode == http.StatusForbidden):
		result, reach = resultDenied, Denied // the token service said no
	default:
		result, reach = resultError, Down
	}
	r.mu.Lock()
	if st := r.repos[o]; st != nil {
		st.reach, st.checked, st.running = reach, time.Now(), false
	}
	r.probes--
	r.mu.Unlock()
	r.checks.WithLabelValues(result).Inc()
	if err != nil {
		log.G(ctx).WithError(err).WithField("result", result).Info("coop cannot pull from this repository itself: its claims fall back to other peers only")
		return
	}
	log.G(ctx).Debug("coop may pull from this repository")
}

// Origin returns where dgst comes from: the origin of the manifest request
// that named it, or of the manifest (or index) naming it.
func (r *Registries) Origin(dgst digest.Digest) (Origin, bool) {
	for range maxParentDepth {
		r.mu.Lock()
		o, ok := r.origins.Get(dgst)
		r.mu.Unlock()
		if ok {
			return o, true
		}
		p, ok := r.o.Parents.Parent(dgst)
		if !ok || p == dgst {
			return Origin{}, false
		}
		dgst = p
	}
	return Origin{}, false
}

// Reach says, without a network round trip, what the last check of dgst's
// repository found: Unknown when no pull named it, Checking while its first
// check runs.
func (r *Registries) Reach(dgst digest.Digest) Reach {
	o, ok := r.Origin(dgst)
	if !ok {
		return Unknown
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.repos[o]
	switch {
	case st == nil:
		return Unknown
	case st.checked.IsZero() && st.running:
		return Checking
	case st.checked.IsZero():
		return Unknown
	}
	return st.reach
}

// Fetch opens dgst, of size bytes, at its registry from offset. If the
// origin of dgst is not known, ErrNotFound is returned.
func (r *Registries) Fetch(ctx context.Context, dgst digest.Digest, size, offset int64) (io.ReadCloser, error) {
	o, ok := r.Origin(dgst)
	if !ok {
		return nil, fmt.Errorf("blob %s: no pull named its registry: %w", dgst, errdefs.ErrNotFound)
	}
	if offset < 0 || offset > size {
		return nil, fmt.Errorf("blob %s: offset %d of %d bytes: %w", dgst, offset, size, errdefs.ErrInvalidArgument)
	}
	f, err := r.resolver().Fetcher(ctx, o.Ref())
	if err != nil {
		return nil, err
	}
	rc, err := f.Fetch(ctx, ocispec.Descriptor{MediaType: "application/octet-stream", Digest: dgst, Size: size})
	if err != nil {
		return nil, fmt.Errorf("blob %s from %s: %w", dgst, o.Ref(), err)
	}
	if offset > 0 {
		s, ok := rc.(io.Seeker)
		if !ok {
			rc.Close()
			return nil, fmt.Errorf("blob %s from %s: cannot resume at %d: %w", dgst, o.Ref(), offset, errdefs.ErrNotImplemented)
		}
		if _, err := s.Seek(offset, io.SeekStart); err != nil {
			rc.Close()
			return nil, fmt.Errorf("blob %s from %s: resume at %d: %w", dgst, o.Ref(), offset, err)
		}
	}
	if r.o.OnBytes == nil {
		return rc, nil
	}
	return &countingBody{ReadCloser: rc, on: r.o.OnBytes}, nil
}

type countingBody struct {
	io.ReadCloser
	on func(int)
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.on(n)
	}
	return n, err
}

// resolver returns containerd's registry client over the registry hosts.
func (r *Registries) resolver() remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{Hosts: r.registryHosts})
}

// registryHosts returns the hosts of a registry (hosts.toml; without it the
// registry itself), coop's mirror left out, kept for hostsTTL so that the
// authorizer's tokens are reused.
func (r *Registries) registryHosts(host string) ([]docker.RegistryHost, error) {
	r.mu.Lock()
	e, ok := r.hosts[host]
	r.mu.Unlock()
	if ok && time.Since(e.at) < hostsTTL {
		return e.hosts, nil
	}
	all, err := r.hostsFn(host)
	if err != nil {
		return nil, err
	}
	var hosts []docker.RegistryHost
	for _, h := range all {
		if r.skip[h.Host] || r.skip[canonicalHost(h.Host)] {
			continue
		}
		hosts = append(hosts, h)
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("registry %s: no host but coop's mirror: %w", host, errdefs.ErrNotFound)
	}
	r.mu.Lock()
	if len(r.hosts) >= r.o.MaxRepos {
		clear(r.hosts)
	}
	r.hosts[host] = hostsEntry{hosts: hosts, at: time.Now()}
	r.mu.Unlock()
	return hosts, nil
}

// canonicalHost writes localhost as 127.0.0.1, the mirror's usual address.
func canonicalHost(h string) string {
	host, port, err := net.SplitHostPort(h)
	if err != nil || host != "localhost" {
		return h
	}
	return net.JoinHostPort("127.0.0.1", port)
}

// parseOrigin checks host and repo as the host and path of a reference
// name.
func parseOrigin(host, repo string) (Origin, bool) {
	if host == "" || repo == "" || len(host)+len(repo) > 255 || strings.ContainsAny(host, "/@") {
		return Origin{}, false
	}
	named, err := reference.ParseNamed(host + "/" + repo)
	if err != nil || reference.Domain(named) != host || reference.Path(named) != repo {
		return Origin{}, false
	}
	return Origin{Host: host, Repo: repo}, true
}
