// Package resolvertest is the conformance suite every index mode passes,
// in the manner of containerd's core/content/testsuite: a mode provides a
// Cluster (nodes that gain and lose blobs, and a destination that locates
// them), and Run checks what every mode must guarantee within the mode's
// staleness bound.
package resolvertest

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
)

// Holder is a node of the cluster under test.
type Holder interface {
	// Name is the node's name; URL its peer endpoint.
	Name() string
	URL() string
	// Commit makes the node hold a blob of size bytes with digest d (a real
	// node commits real content; d is then the content's digest) and
	// returns d.
	Commit(ctx context.Context, size int64) (digest.Digest, error)
	// Delete makes the node drop d.
	Delete(ctx context.Context, d digest.Digest) error
	// Kill stops the node for good, without a goodbye.
	Kill(ctx context.Context) error
}

// Cluster is one index mode set up for the suite.
type Cluster interface {
	// Holder starts a new node that the destination counts as a neighbour.
	Holder(ctx context.Context, t *testing.T, name string) Holder
	// Resolver is the destination's resolver.
	Resolver() resolver.Resolver
	// Bound is how long a change at a holder may take to show at the
	// destination; Dead is how long a dead holder may stay a candidate.
	Bound() time.Duration
	Dead() time.Duration
}

// Run runs the suite; newCluster sets up a fresh cluster for each case.
func Run(t *testing.T, newCluster func(t *testing.T) Cluster) {
	for _, tc := range []struct {
		name string
		fn   func(ctx context.Context, t *testing.T, c Cluster)
	}{
		{"CommitShows", testCommitShows},
		{"DeleteDrops", testDeleteDrops},
		{"UnknownDigest", testUnknown},
		{"DeadDropped", testDead},
		{"SourceAlwaysCandidate", testSource},
		{"BadDigestRefused", testBadDigest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			tc.fn(ctx, t, newCluster(t))
		})
	}
}

// Eventually polls the resolver until cond holds for d's candidates, or the
// bound passes.
func Eventually(ctx context.Context, t *testing.T, r resolver.Resolver, d digest.Digest, bound time.Duration, what string, cond func([]peers.Candidate) bool) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(bound)
	var last []peers.Candidate
	for {
		got, err := r.Locate(ctx, []digest.Digest{d})
		if err == nil {
			last = got[d]
			if cond(last) {
				return time.Since(start)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last candidates %v (err %v)", what, bound, last, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Has reports whether node is among cs, at url with size.
func Has(cs []peers.Candidate, node, url string, size int64) bool {
	for _, c := range cs {
		if c.Node == node && c.URL == url && c.Size == size {
			return true
		}
	}
	return false
}

func hasNode(cs []peers.Candidate, node string) bool {
	for _, c := range cs {
		if c.Node == node {
			return true
		}
	}
	return false
}

func testCommitShows(ctx context.Context, t *testing.T, c Cluster) {
	x := c.Holder(ctx, t, "x")
	d, err := x.Commit(ctx, 1234)
	if err != nil {
		t.Fatal(err)
	}
	Eventually(ctx, t, c.Resolver(), d, c.Bound(), "commit at x shows at the destination", func(cs []peers.Candidate) bool {
		return Has(cs, x.Name(), x.URL(), 1234)
	})
}

func testDeleteDrops(ctx context.Context, t *testing.T, c Cluster) {
	x := c.Holder(ctx, t, "x")
	y := c.Holder(ctx, t, "y")
	d, err := x.Commit(ctx, 4096)
	if err != nil {
		t.Fatal(err)
	}
	keep, err := y.Commit(ctx, 100)
	if err != nil {
		t.Fatal(err)
	}
	Eventually(ctx, t, c.Resolver(), d, c.Bound(), "commit shows", func(cs []peers.Candidate) bool { return hasNode(cs, x.Name()) })
	if err := x.Delete(ctx, d); err != nil {
		t.Fatal(err)
	}
	Eventually(ctx, t, c.Resolver(), d, c.Bound(), "delete at x drops x", func(cs []peers.Candidate) bool { return !hasNode(cs, x.Name()) })
	// The other node's blob is untouched.
	Eventually(ctx, t, c.Resolver(), keep, c.Bound(), "y keeps its blob", func(cs []peers.Candidate) bool { return hasNode(cs, y.Name()) })
}

func testUnknown(ctx context.Context, t *testing.T, c Cluster) {
	x := c.Holder(ctx, t, "x")
	d, err := x.Commit(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	Eventually(ctx, t, c.Resolver(), d, c.Bound(), "commit shows", func(cs []peers.Candidate) bool { return hasNode(cs, x.Name()) })
	unknown := randomDigest()
	got, err := c.Resolver().Locate(ctx, []digest.Digest{unknown, d})
	if err != nil {
		t.Fatal(err)
	}
	if cs, ok := got[unknown]; ok {
		t.Fatalf("unknown digest has candidates %v", cs)
	}
	if !hasNode(got[d], x.Name()) {
		t.Fatalf("known digest lost in a batch: %v", got)
	}
}

func testDead(ctx context.Context, t *testing.T, c Cluster) {
	x := c.Holder(ctx, t, "x")
	y := c.Holder(ctx, t, "y")
	d, err := x.Commit(ctx, 77)
	if err != nil {
		t.Fatal(err)
	}
	e, err := y.Commit(ctx, 78)
	if err != nil {
		t.Fatal(err)
	}
	Eventually(ctx, t, c.Resolver(), d, c.Bound(), "commit shows", func(cs []peers.Candidate) bool { return hasNode(cs, x.Name()) })
	if err := x.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	Eventually(ctx, t, c.Resolver(), d, c.Dead(), "dead x dropped", func(cs []peers.Candidate) bool { return !hasNode(cs, x.Name()) })
	Eventually(ctx, t, c.Resolver(), e, c.Bound(), "live y kept", func(cs []peers.Candidate) bool { return hasNode(cs, y.Name()) })
}

func testSource(ctx context.Context, t *testing.T, c Cluster) {
	x := c.Holder(ctx, t, "x")
	d, err := x.Commit(ctx, 555)
	if err != nil {
		t.Fatal(err)
	}
	src := peers.Candidate{Node: "migration-source", URL: "http://198.18.255.1:5050", Size: 555}
	sources := resolver.NewSources()
	r := resolver.WithSources(c.Resolver(), sources)
	// At once: the source needs no index.
	cancel := sources.Add(src, map[digest.Digest]int64{d: 555})
	got, err := r.Locate(ctx, []digest.Digest{d})
	if err != nil {
		t.Fatal(err)
	}
	if !Has(got[d], src.Node, src.URL, 555) {
		t.Fatalf("migration source is not a candidate: %v", got[d])
	}
	if len(got[d]) == 0 || got[d][0].Node != src.Node {
		t.Fatalf("migration source is not the first candidate: %v", got[d])
	}
	// Neighbours are still found alongside it.
	Eventually(ctx, t, r, d, c.Bound(), "neighbour alongside the source", func(cs []peers.Candidate) bool {
		return hasNode(cs, x.Name()) && hasNode(cs, src.Node)
	})
	cancel()
	got, err = r.Locate(ctx, []digest.Digest{d})
	if err != nil {
		t.Fatal(err)
	}
	if hasNode(got[d], src.Node) {
		t.Fatal("source still a candidate after the migration ended")
	}
}

func testBadDigest(ctx context.Context, t *testing.T, c Cluster) {
	for _, bad := range []digest.Digest{"", "sha256:zz", "md5:00", digest.Digest("sha256:" + string(make([]byte, 64)))} {
		if _, err := c.Resolver().Locate(ctx, []digest.Digest{bad}); err == nil {
			t.Fatalf("locate of %q: no error", bad)
		}
	}
}

func randomDigest() digest.Digest {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return digest.FromBytes(b[:])
}

// RandomDigest returns the digest of random bytes, for fake holders.
func RandomDigest() digest.Digest { return randomDigest() }
