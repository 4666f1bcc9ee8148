package clusterkb_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	digest "github.com/opencontainers/go-digest"
)

// The figures of test/bench's index section for ClusterKB, as Go
// benchmarks: go test -run '^$' -bench . ./resolver/clusterkb/
// Inventories are drawn uniformly from a shared pool of digests.

const (
	benchBlobs = 1000
	benchPool  = 50000
	benchBatch = 8
)

func benchDigests(n int) []digest.Digest {
	out := make([]digest.Digest, n)
	var b [8]byte
	for i := range out {
		binary.BigEndian.PutUint64(b[:], uint64(i))
		out[i] = digest.FromBytes(b[:])
	}
	return out
}

func benchInventory(rng *rand.Rand, pool []digest.Digest) []content.Blob {
	seen := make(map[int]bool, benchBlobs)
	blobs := make([]content.Blob, 0, benchBlobs)
	for len(blobs) < benchBlobs {
		if i := rng.IntN(len(pool)); !seen[i] {
			seen[i] = true
			blobs = append(blobs, content.Blob{Digest: pool[i], Size: 1 + rng.Int64N(64<<20)})
		}
	}
	return blobs
}

// loadKB returns a KB holding nodes inventories, the names of its first 16
// nodes and the digests they hold, and the heap the KB took.
func loadKB(b *testing.B, nodes int, pool []digest.Digest) (kb *clusterkb.KB, neighbors []string, nearby []digest.Digest, heap uint64) {
	b.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	kb, err := clusterkb.New(clusterkb.Options{Feed: clusterkb.FeedPull, Reader: peerClient("kb")})
	if err != nil {
		b.Fatal(err)
	}
	for i := range nodes {
		name := fmt.Sprintf("node-%05d", i)
		blobs := benchInventory(rng, pool)
		if err := kb.Index().Full(name, fmt.Sprintf("http://10.0.%d.%d:5050", i>>8, i&255), "e", benchBlobs, blobs, time.Now()); err != nil {
			b.Fatal(err)
		}
		kb.Index().SetLoad(name, &peers.Load{MaxUploads: 8})
		if i < 16 {
			neighbors = append(neighbors, name)
			for _, bl := range blobs {
				nearby = append(nearby, bl.Digest)
			}
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	return kb, neighbors, nearby, after.HeapInuse - before.HeapInuse
}

// BenchmarkKBLocate locates batches of 8 digests in a ClusterKB of 1,000 and
// 5,000 nodes × 1,000 blobs: through the HTTP API and in-process, for any
// node and for a node restricted to 16 neighbours.
func BenchmarkKBLocate(b *testing.B) {
	pool := benchDigests(benchPool)
	for _, nodes := range []int{1000, 5000} {
		b.Run(fmt.Sprintf("nodes=%d", nodes), func(b *testing.B) {
			kb, neighbors, nearby, heap := loadKB(b, nodes, pool)
			srv := httptest.NewServer(kb)
			defer srv.Close()
			ctx := context.Background()
			if err := kb.Register(ctx, clusterkb.RegisterRequest{Name: "dest", URL: "http://127.0.0.1:9", Neighbors: neighbors}); err != nil {
				b.Fatal(err)
			}
			for _, tc := range []struct {
				name string
				node string
				from []digest.Digest
			}{
				{"every-node", "", pool},
				{"16-neighbours", "dest", nearby},
			} {
				rng := rand.New(rand.NewPCG(3, 4))
				batch := func() []digest.Digest {
					out := make([]digest.Digest, benchBatch)
					for i := range out {
						out[i] = tc.from[rng.IntN(len(tc.from))]
					}
					return out
				}
				b.Run(tc.name+"/http", func(b *testing.B) {
					c, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: []string{srv.URL}, Node: tc.node})
					if err != nil {
						b.Fatal(err)
					}
					for b.Loop() {
						if _, err := c.Locate(ctx, batch()); err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric(float64(heap)/(1<<20), "heap-MiB")
				})
				b.Run(tc.name+"/in-process", func(b *testing.B) {
					for b.Loop() {
						if _, err := kb.Locate(resolver.LocateRequest{Node: tc.node, Digests: batch()}); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		})
	}
}

// BenchmarkIndexFull applies a node's full inventory of 1,000 blobs to an
// index holding 1,000 nodes: what a KB or a push destination does for each
// node every period.
func BenchmarkIndexFull(b *testing.B) {
	pool := benchDigests(benchPool)
	rng := rand.New(rand.NewPCG(5, 6))
	idx := resolver.NewIndex()
	invs := make([][]content.Blob, 1000)
	for i := range invs {
		invs[i] = benchInventory(rng, pool)
		if err := idx.Full(fmt.Sprintf("node-%04d", i), "http://n:5050", "e", 1, invs[i], time.Now()); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("unchanged", func(b *testing.B) {
		i := 0
		for b.Loop() {
			if err := idx.Full(fmt.Sprintf("node-%04d", i%len(invs)), "http://n:5050", "e", 1, invs[i%len(invs)], time.Now()); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	b.Run("new-epoch", func(b *testing.B) {
		i := 0
		for b.Loop() {
			// Another node's inventory: every blob changes.
			if err := idx.Full(fmt.Sprintf("node-%04d", i%len(invs)), "http://n:5050", fmt.Sprint(i), 1, invs[(i+1)%len(invs)], time.Now()); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}
