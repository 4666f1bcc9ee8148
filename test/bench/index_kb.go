package main

// ClusterKB at scale: memory and locate latency of one KB holding 5,000
// nodes x 1,000 blobs (part of the "index" section).

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"runtime"
	"slices"
	"time"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	digest "github.com/opencontainers/go-digest"
)

// measureKBScale loads a ClusterKB with p.KBNodes inventories of p.KBBlobs
// digests drawn uniformly from a pool of p.KBPool, measures the heap it
// takes and times locates through its HTTP API.
func measureKBScale(ctx context.Context, p indexParams) (KBScale, error) {
	ks := KBScale{
		Nodes: p.KBNodes, BlobsPerNode: p.KBBlobs, Pool: p.KBPool, Distribution: "uniform",
		TargetHeapBytes: 1 << 30,
	}
	rng := rand.New(rand.NewPCG(42, 0x6b62))
	var base runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&base)

	pool := makePool("kb", p.KBPool)
	kb, err := clusterkb.New(clusterkb.Options{Feed: clusterkb.FeedPull, Reader: &peers.Client{Node: "kb", HTTP: &http.Client{Timeout: time.Second}}})
	if err != nil {
		return ks, err
	}
	idx := kb.Index()
	var neighbors []string
	var nearby []digest.Digest // what the 16 neighbours hold
	// full sends node i's full inventory: the same each time.
	full := func(i int) ([]content.Blob, error) {
		nrng := rand.New(rand.NewPCG(42, uint64(i)))
		blobs := make([]content.Blob, 0, p.KBBlobs)
		for _, d := range sample(nrng, pool, p.KBBlobs) {
			blobs = append(blobs, content.Blob{Digest: d, Size: 1 + nrng.Int64N(64<<20)})
		}
		url := fmt.Sprintf("http://10.%d.%d.%d:5050", i>>16&255, i>>8&255, i&255)
		return blobs, idx.Full(fmt.Sprintf("node-%05d", i), url, fmt.Sprintf("%016x", i), uint64(len(blobs)), blobs, time.Now())
	}
	start := time.Now()
	for i := range p.KBNodes {
		name := fmt.Sprintf("node-%05d", i)
		blobs, err := full(i)
		if err != nil {
			return ks, err
		}
		idx.SetLoad(name, &peers.Load{ActiveUploads: rng.IntN(3), MaxUploads: 8, UploadBytesPerSecond: rng.Float64() * 1e8})
		if i < 16 {
			neighbors = append(neighbors, name)
			for _, b := range blobs {
				nearby = append(nearby, b.Digest)
			}
		}
	}
	ks.LoadSeconds = time.Since(start).Seconds()
	ks.Entries = idx.Entries()
	var after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	ks.HeapInuseBytes = int64(after.HeapInuse) - int64(base.HeapInuse)
	ks.HeapAllocBytes = int64(after.HeapAlloc) - int64(base.HeapAlloc)

	// Locates through the HTTP API.
	c := &indexCluster{cancel: func() {}}
	defer c.close()
	url, err := c.serve(kb, &c.kbLocateBytes)
	if err != nil {
		return ks, err
	}
	// "dest" may fetch from its 16 neighbours only. The KB is not running
	// (its index is loaded by hand), so nobody reads "dest".
	reg, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: []string{url}, Node: "dest"})
	if err != nil {
		return ks, err
	}
	if err := reg.Register(ctx, clusterkb.RegisterRequest{Name: "dest", URL: "http://127.0.0.1:9", Neighbors: neighbors}); err != nil {
		return ks, err
	}
	all, err := clusterkb.NewClient(clusterkb.ClientOptions{URLs: []string{url}})
	if err != nil {
		return ks, err
	}
	count := max(p.Locates, 200)
	batches := func(from []digest.Digest) [][]digest.Digest {
		out := make([][]digest.Digest, count)
		for i := range out {
			out[i] = sample(rng, from, p.Batch)
		}
		return out
	}
	// fulls re-sends every node's full inventory once per push period, as
	// a push feed does, until stop is called; it returns the rate reached.
	fulls := func() (stop func() float64) {
		fctx, cancel := context.WithCancel(ctx)
		done := make(chan int)
		go func() {
			t := time.NewTicker(seconds(p.PushPeriod) / time.Duration(p.KBNodes))
			defer t.Stop()
			n := 0
			for {
				select {
				case <-fctx.Done():
					done <- n
					return
				case <-t.C:
					_, _ = full(n % p.KBNodes)
					n++
				}
			}
		}()
		st := time.Now()
		return func() float64 {
			cancel()
			return float64(<-done) / time.Since(st).Seconds()
		}
	}
	type locateFunc func([]digest.Digest) (map[digest.Digest][]peers.Candidate, error)
	viaHTTP := func(cl *clusterkb.Client) locateFunc {
		return func(ds []digest.Digest) (map[digest.Digest][]peers.Candidate, error) { return cl.Locate(ctx, ds) }
	}
	inProcess := func(node string) locateFunc {
		return func(ds []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
			r, err := kb.Locate(resolver.LocateRequest{Node: node, Digests: ds})
			return r.Candidates, err
		}
	}
	// timeLocates asks count batches drawn from from, one every 2 ms as in
	// the modes, while fulls arrive when busy.
	timeLocates := func(name string, ask locateFunc, overHTTP, busy bool, from []digest.Digest) error {
		c.kbLocateBytes.n.Store(0)
		l := KBLocate{Name: name, Via: "in-process KB.Locate (no HTTP, no JSON)", Locates: count}
		if overHTTP {
			l.Via, l.TargetP99Ms = "HTTP, clusterkb.Client", 1
		}
		var stop func() float64
		if busy {
			stop = fulls()
		}
		var lat []float64
		cands := 0
		next := time.Now()
		for _, b := range batches(from) {
			if d := time.Until(next); d > 0 {
				time.Sleep(d)
			}
			next = next.Add(2 * time.Millisecond)
			st := time.Now()
			res, err := ask(b)
			if err != nil {
				if stop != nil {
					stop()
				}
				return err
			}
			lat = append(lat, float64(time.Since(st).Nanoseconds())/1e6)
			for _, cs := range res {
				cands += len(cs)
			}
		}
		if stop != nil {
			l.Name += fmt.Sprintf(", while fulls arrive (%.0f/s)", stop())
		}
		slices.Sort(lat)
		l.P50Ms, l.P99Ms, l.MaxMs = percentile(lat, 50), percentile(lat, 99), percentile(lat, 100)
		l.Candidates = float64(cands) / float64(count)
		if overHTTP {
			l.ResponseBytes = float64(c.kbLocateBytes.n.Load()) / float64(count)
			met := l.P99Ms <= l.TargetP99Ms
			l.Met = &met
		}
		ks.Locates = append(ks.Locates, l)
		return nil
	}
	const near16 = "16 neighbours (node=dest)"
	for _, t := range []struct {
		name     string
		ask      locateFunc
		overHTTP bool
		busy     bool
		from     []digest.Digest
	}{
		{"every node", viaHTTP(all), true, false, pool},
		{near16, viaHTTP(reg), true, false, nearby},
		{"every node", viaHTTP(all), true, true, pool},
		{near16, viaHTTP(reg), true, true, nearby},
		{"every node", inProcess(""), false, false, pool},
		{near16, inProcess("dest"), false, false, nearby},
	} {
		if err := timeLocates(t.name, t.ask, t.overHTTP, t.busy, t.from); err != nil {
			return ks, err
		}
	}
	ks.Met = ks.HeapInuseBytes <= ks.TargetHeapBytes
	runtime.KeepAlive(pool)
	return ks, nil
}
