package mirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/upstream"
	digest "github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeUpstream is a registry coop may (reach Usable) or may not pull from.
// With checked set, Reach says Checking until it is closed, then reach.
type fakeUpstream struct {
	checked chan struct{}
	reach   upstream.Reach
	blobs   map[digest.Digest][]byte
	corrupt bool // serve every byte flipped

	mu      sync.Mutex
	offsets []int64
	seen    []string
}

func (u *fakeUpstream) Seen(_ context.Context, host, repo, ref string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.seen = append(u.seen, host+" "+repo+" "+ref)
}

func (u *fakeUpstream) Reach(digest.Digest) upstream.Reach {
	if u.checked != nil {
		select {
		case <-u.checked:
		default:
			return upstream.Checking
		}
	}
	return u.reach
}

func (u *fakeUpstream) Fetch(_ context.Context, d digest.Digest, size, offset int64) (io.ReadCloser, error) {
	b, ok := u.blobs[d]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", d, errdefs.ErrNotFound)
	}
	u.mu.Lock()
	u.offsets = append(u.offsets, offset)
	u.mu.Unlock()
	body := bytes.Clone(b[offset:size])
	if u.corrupt {
		for i := range body {
			body[i] ^= 0xff
		}
	}
	return io.NopCloser(bytes.NewReader(body)), nil
}

func (u *fakeUpstream) asked() []int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]int64(nil), u.offsets...)
}

// fixedSizes are the sizes manifests gave.
type fixedSizes map[digest.Digest]int64

func (s fixedSizes) ExpectedSize(_ context.Context, d digest.Digest) (int64, bool) {
	v, ok := s[d]
	return v, ok
}

// rewindingWriter is a claim's writer: it verifies and rewinds.
type rewindingWriter struct {
	want    digest.Digest
	buf     bytes.Buffer
	rewinds int
}

func (w *rewindingWriter) Write(p []byte) (int, error) { return w.buf.Write(p) }
func (w *rewindingWriter) Verify() error {
	if digest.FromBytes(w.buf.Bytes()) != w.want {
		return fmt.Errorf("does not verify: %w", errdefs.ErrDataLoss)
	}
	return nil
}
func (w *rewindingWriter) Rewind() error { w.buf.Reset(); w.rewinds++; return nil }

func newUpstreamMirror(t *testing.T, res staticResolver, up Upstream, sizes Sizes) *Mirror {
	t.Helper()
	store, err := content.NewStore(t.Context(), t.TempDir(), content.NewInventory())
	if err != nil {
		t.Fatal(err)
	}
	o := Options{
		Resolver: res, Peers: &peers.Client{HTTP: &http.Client{}, Node: "test"}, Store: store,
		StallTimeout: 200 * time.Millisecond, HeaderDelay: 50 * time.Millisecond, Sizes: sizes,
	}
	if up != nil {
		o.Upstream = up
	}
	m, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func TestClaimableFallbacks(t *testing.T) {
	b := make([]byte, 2<<20)
	_, _ = rand.Read(b)
	d, size := digest.FromBytes(b), int64(len(b))
	one := []peers.Candidate{{Node: "a", URL: "http://a", Size: size}}
	two := []peers.Candidate{one[0], {Node: "b", URL: "http://b", Size: size}}
	partial := []peers.Candidate{{Node: "a", URL: "http://a", Size: size, Partial: true}}
	for _, tc := range []struct {
		name     string
		cands    []peers.Candidate
		upstream bool // an Upstream at all
		reach    upstream.Reach
		sized    bool // a manifest gave the size
		want     bool
		decision string
	}{
		{"no upstream, one peer", one, false, upstream.Unknown, false, true, ""},
		{"no upstream, no peer", nil, false, upstream.Unknown, true, false, ""},
		{"one peer, registry", one, true, upstream.Usable, false, true, claimPeersRegistry},
		{"one peer, registry denies coop", one, true, upstream.Denied, false, false, claimNoFallback},
		{"one peer, registry not named by a pull", one, true, upstream.Unknown, false, true, claimPeers},
		{"one peer, registry being checked", one, true, upstream.Checking, false, true, claimPeers},
		{"one peer, registry down", one, true, upstream.Down, false, true, claimPeers},
		{"two peers, registry denies coop", two, true, upstream.Denied, false, true, claimPeers},
		{"no peer, registry, size known", nil, true, upstream.Usable, true, true, claimRegistry},
		{"no peer, registry, size unknown", nil, true, upstream.Usable, false, false, ""},
		{"no peer, registry down", nil, true, upstream.Down, true, false, ""},
		{"a partial peer only, registry denies coop", partial, true, upstream.Denied, true, false, ""},
		{"a partial peer only, registry", partial, true, upstream.Usable, true, true, claimRegistry},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var up Upstream
			if tc.upstream {
				up = &fakeUpstream{reach: tc.reach}
			}
			sizes := fixedSizes{}
			if tc.sized {
				sizes[d] = size
			}
			m := newUpstreamMirror(t, staticResolver{d: tc.cands}, up, sizes)
			got, ok := m.Claimable(d)
			if ok != tc.want || (ok && got != size) {
				t.Fatalf("Claimable = %d, %v; want %v", got, ok, tc.want)
			}
			if tc.decision != "" {
				if v := testutil.ToFloat64(m.claimChoices.WithLabelValues(tc.decision)); v != 1 {
					t.Fatalf("decision %s counted %g times; want 1", tc.decision, v)
				}
			}
		})
	}
}

func TestFetchClaimFallsBackToRegistry(t *testing.T) {
	b := make([]byte, 6<<20+5)
	_, _ = rand.Read(b)
	d, size := digest.FromBytes(b), int64(len(b))
	for _, tc := range []struct {
		name    string
		mode    string // the only peer's; "" none
		reach   upstream.Reach
		rewinds int
		reason  string // the fallback counted; "" none
		wantErr bool
	}{
		{"peer fine", "good", upstream.Usable, 0, "", false},
		{"peer dead", "dead", upstream.Usable, 0, "failed", false},
		{"peer stalls", "stall", upstream.Usable, 0, "failed", false},
		{"peer short", "short", upstream.Usable, 0, "failed", false},
		{"peer corrupt", "corrupt", upstream.Usable, 1, "corrupt", false},
		{"no peer left", "", upstream.Usable, 0, "failed", false},
		{"peer corrupt, registry denies coop", "corrupt", upstream.Denied, 0, "", true},
		{"peer dead, registry down", "dead", upstream.Down, 0, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := staticResolver{}
			if tc.mode != "" {
				res[d] = []peers.Candidate{{Node: "a", URL: blobPeer(t, b, tc.mode).URL, Size: size}}
			}
			up := &fakeUpstream{reach: tc.reach, blobs: map[digest.Digest][]byte{d: b}}
			m := newUpstreamMirror(t, res, up, fixedSizes{d: size})
			w := &rewindingWriter{want: d}
			err := m.FetchClaim(context.Background(), d, size, w)
			if tc.wantErr {
				if err == nil {
					t.Fatal("the claim completed with nothing to complete it")
				}
				return
			}
			if err != nil {
				t.Fatalf("claim: %v", err)
			}
			if !bytes.Equal(w.buf.Bytes(), b) {
				t.Fatal("the claim's bytes are not the blob's")
			}
			if w.rewinds != tc.rewinds {
				t.Fatalf("%d rewinds; want %d", w.rewinds, tc.rewinds)
			}
			asked := up.asked()
			if (tc.reason != "") != (len(asked) > 0) {
				t.Fatalf("registry asked from %v", asked)
			}
			if tc.reason != "" {
				if v := testutil.ToFloat64(m.claimFallbacks.WithLabelValues(tc.reason)); v != 1 {
					t.Fatalf("fallbacks %s = %g; want 1", tc.reason, v)
				}
				dl := m.downloads.get([]digest.Digest{d})
				if len(dl) != 1 || dl[0].BytesByNode[RegistryNode] == 0 || dl[0].Failed {
					t.Fatalf("download record %+v: want registry bytes, not failed", dl)
				}
			}
		})
	}
}

// TestFetchClaimRegistryLies: the peer and the registry both send bad
// bytes: the claim fails with data loss after one rewind and one fetch from
// the registry, not in a loop.
func TestFetchClaimRegistryLies(t *testing.T) {
	b := make([]byte, 2<<20)
	_, _ = rand.Read(b)
	d, size := digest.FromBytes(b), int64(len(b))
	res := staticResolver{d: {{Node: "a", URL: blobPeer(t, b, "corrupt").URL, Size: size}}}
	up := &fakeUpstream{reach: upstream.Usable, blobs: map[digest.Digest][]byte{d: b}, corrupt: true}
	m := newUpstreamMirror(t, res, up, fixedSizes{d: size})
	w := &rewindingWriter{want: d}
	if err := m.FetchClaim(context.Background(), d, size, w); !errdefs.IsDataLoss(err) {
		t.Fatalf("claim from liars: %v; want data loss", err)
	}
	if got := up.asked(); len(got) != 1 || got[0] != 0 {
		t.Fatalf("registry asked from %v; want once, from 0", got)
	}
	if w.rewinds != 1 {
		t.Fatalf("%d rewinds; want 1", w.rewinds)
	}
}

// TestFetchClaimAwaitsCheck: the only peer fails while the registry's check
// still runs: the claim waits for the check, then completes from the
// registry.
func TestFetchClaimAwaitsCheck(t *testing.T) {
	b := make([]byte, 2<<20)
	_, _ = rand.Read(b)
	d, size := digest.FromBytes(b), int64(len(b))
	res := staticResolver{d: {{Node: "a", URL: blobPeer(t, b, "dead").URL, Size: size}}}
	up := &fakeUpstream{checked: make(chan struct{}), reach: upstream.Usable, blobs: map[digest.Digest][]byte{d: b}}
	m := newUpstreamMirror(t, res, up, fixedSizes{d: size})
	time.AfterFunc(300*time.Millisecond, func() { close(up.checked) })
	w := &rewindingWriter{want: d}
	if err := m.FetchClaim(context.Background(), d, size, w); err != nil {
		t.Fatalf("claim: %v", err)
	}
	if !bytes.Equal(w.buf.Bytes(), b) || len(up.asked()) != 1 {
		t.Fatalf("registry asked from %v", up.asked())
	}
}

// TestMirrorNotesOrigins: manifest requests tell the upstream the registry
// and repository of the pull; blob requests and other coop nodes' do not.
func TestMirrorNotesOrigins(t *testing.T) {
	up := &fakeUpstream{}
	m := newUpstreamMirror(t, staticResolver{}, up, nil)
	d := digest.FromString("m")
	for _, tc := range []struct {
		path string
		fwd  bool
	}{
		{"/v2/lib/app/manifests/latest?ns=reg.example", false},
		{"/v2/lib/app/manifests/" + d.String() + "?ns=reg.example", false},
		{"/v2/lib/app/blobs/" + d.String() + "?ns=reg.example", false},
		{"/v2/lib/app/manifests/latest", false},
		{"/v2/lib/app/manifests/latest?ns=other.example", true},
	} {
		req := httptest.NewRequest(http.MethodGet, tc.path, nil)
		if tc.fwd {
			req.Header.Set(peers.ForwardedHeader, "1")
		}
		m.ServeHTTP(httptest.NewRecorder(), req)
	}
	want := []string{"reg.example lib/app latest", "reg.example lib/app " + d.String()}
	up.mu.Lock()
	defer up.mu.Unlock()
	if fmt.Sprint(up.seen) != fmt.Sprint(want) {
		t.Fatalf("seen %q; want %q", up.seen, want)
	}
}
