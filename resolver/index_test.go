package resolver

import (
	"errors"
	"testing"
	"time"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

func blobs(ds ...digest.Digest) []content.Blob {
	out := make([]content.Blob, len(ds))
	for i, d := range ds {
		out[i] = content.Blob{Digest: d, Size: int64(10 + i)}
	}
	return out
}

func holders(x *Index, d digest.Digest, opts LocateOptions) []string {
	var out []string
	for _, c := range x.Locate([]digest.Digest{d}, opts)[d] {
		out = append(out, c.Node)
	}
	return out
}

func TestIndex(t *testing.T) {
	a, b, c := digest.FromString("a"), digest.FromString("b"), digest.FromString("c")
	now := time.Now()
	for _, tc := range []struct {
		name string
		ops  func(x *Index) error
		want map[digest.Digest][]string
		err  error
	}{
		{"full", func(x *Index) error { return x.Full("n1", "http://n1", "e", 3, blobs(a, b), now) },
			map[digest.Digest][]string{a: {"n1"}, b: {"n1"}}, nil},
		{"full replaces", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 3, blobs(a, b), now)
			return x.Full("n1", "http://n1", "e", 4, blobs(b, c), now)
		}, map[digest.Digest][]string{b: {"n1"}, c: {"n1"}}, nil},
		{"older full refused", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 4, blobs(a), now)
			return x.Full("n1", "http://n1", "e", 3, blobs(b), now)
		}, map[digest.Digest][]string{a: {"n1"}}, ErrStale},
		{"new epoch full accepted at any seq", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 40, blobs(a), now)
			return x.Full("n1", "http://n1", "f", 1, blobs(b), now)
		}, map[digest.Digest][]string{b: {"n1"}}, nil},
		{"delta in order", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 1, blobs(a), now)
			return x.Delta("n1", "e", 1, 2, blobs(b), []digest.Digest{a}, now)
		}, map[digest.Digest][]string{b: {"n1"}}, nil},
		{"delta gap", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 1, blobs(a), now)
			return x.Delta("n1", "e", 2, 3, blobs(b), nil, now)
		}, map[digest.Digest][]string{a: {"n1"}}, ErrGap},
		{"delta other epoch", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 1, blobs(a), now)
			return x.Delta("n1", "f", 1, 2, blobs(b), nil, now)
		}, map[digest.Digest][]string{a: {"n1"}}, ErrGap},
		{"delta for unknown node", func(x *Index) error {
			return x.Delta("n9", "e", 0, 1, blobs(b), nil, now)
		}, map[digest.Digest][]string{}, ErrGap},
		{"seq going backwards", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 5, blobs(a), now)
			return x.Delta("n1", "e", 3, 4, blobs(b), nil, now)
		}, map[digest.Digest][]string{a: {"n1"}}, ErrStale},
		{"two holders, drop one", func(x *Index) error {
			_ = x.Full("n1", "http://n1", "e", 1, blobs(a), now)
			_ = x.Full("n2", "http://n2", "e", 1, blobs(a, b), now)
			x.Drop("n1")
			return nil
		}, map[digest.Digest][]string{a: {"n2"}, b: {"n2"}}, nil},
		{"garbage entries skipped", func(x *Index) error {
			return x.Full("n1", "http://n1", "e", 1, []content.Blob{{Digest: "sha256:zz", Size: 1}, {Digest: a, Size: -1}, {Digest: b, Size: 2}}, now)
		}, map[digest.Digest][]string{b: {"n1"}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := NewIndex()
			err := tc.ops(x)
			if (tc.err == nil) != (err == nil) || (tc.err != nil && !errors.Is(err, tc.err)) {
				t.Fatalf("err %v, want %v", err, tc.err)
			}
			for _, d := range []digest.Digest{a, b, c} {
				got := holders(x, d, LocateOptions{})
				if len(got) != len(tc.want[d]) {
					t.Fatalf("%s: holders %v, want %v", d, got, tc.want[d])
				}
				for i := range got {
					if got[i] != tc.want[d][i] {
						t.Fatalf("%s: holders %v, want %v", d, got, tc.want[d])
					}
				}
			}
		})
	}
}

func TestIndexLocateOptionsAndExpire(t *testing.T) {
	x := NewIndex()
	d := digest.FromString("d")
	old := time.Now().Add(-time.Hour)
	_ = x.Full("n1", "http://n1", "e", 1, blobs(d), old)
	_ = x.Full("n2", "http://n2", "e", 1, blobs(d), time.Now())
	_ = x.Full("n3", "http://n3", "e", 1, blobs(d), time.Now())
	if got := holders(x, d, LocateOptions{Exclude: "n2"}); len(got) != 2 || got[0] != "n1" || got[1] != "n3" {
		t.Fatalf("exclude: %v", got)
	}
	if got := holders(x, d, LocateOptions{Only: map[string]bool{"n3": true}}); len(got) != 1 || got[0] != "n3" {
		t.Fatalf("only: %v", got)
	}
	if gone := x.Expire(time.Now().Add(-time.Minute)); len(gone) != 1 || gone[0] != "n1" {
		t.Fatalf("expired %v, want [n1]", gone)
	}
	if got := holders(x, d, LocateOptions{}); len(got) != 2 {
		t.Fatalf("after expiry: %v", got)
	}
	// Node ids and digest ids are reused, and stay consistent.
	x.Drop("n2")
	x.Drop("n3")
	if x.Entries() != 0 || len(x.Locate([]digest.Digest{d}, LocateOptions{})) != 0 {
		t.Fatal("index not empty after dropping every node")
	}
	e := digest.FromString("e")
	_ = x.Full("n4", "http://n4", "e", 1, blobs(e), time.Now())
	if got := holders(x, e, LocateOptions{}); len(got) != 1 || got[0] != "n4" {
		t.Fatalf("after reuse: %v", got)
	}
	if got := holders(x, d, LocateOptions{}); len(got) != 0 {
		t.Fatalf("dropped digest came back: %v", got)
	}
}

// TestIndexFullSameSeqDifferentContent: a full at the position the index
// holds but with other content (a forged delta got in before it) wins.
func TestIndexFullSameSeqDifferentContent(t *testing.T) {
	a, b := digest.FromString("a"), digest.FromString("b")
	x := NewIndex()
	_ = x.Full("n1", "http://n1", "e", 1, blobs(a), time.Now())
	_ = x.Delta("n1", "e", 1, 2, blobs(b), nil, time.Now()) // forged
	if err := x.Full("n1", "http://n1", "e", 2, blobs(a), time.Now()); err != nil {
		t.Fatal(err)
	}
	if got := holders(x, b, LocateOptions{}); len(got) != 0 {
		t.Fatalf("forged blob survived the full: %v", got)
	}
	if got := holders(x, a, LocateOptions{}); len(got) != 1 {
		t.Fatalf("real blob lost: %v", got)
	}
}

func TestIndexChanged(t *testing.T) {
	a, b := digest.FromString("a"), digest.FromString("b")
	now := time.Now()
	for _, tc := range []struct {
		name    string
		op      func(x *Index)
		changed bool
	}{
		{"full of a new node", func(x *Index) { _ = x.Full("n2", "http://n2", "e", 1, blobs(a), now) }, true},
		{"full with other blobs", func(x *Index) { _ = x.Full("n1", "http://n1", "e", 2, blobs(b), now) }, true},
		{"full heartbeat", func(x *Index) { _ = x.Full("n1", "http://n1", "e", 1, blobs(a), now) }, false},
		{"full heartbeat at a new URL", func(x *Index) { _ = x.Full("n1", "http://n1b", "e", 1, blobs(a), now) }, true},
		{"stale full", func(x *Index) { _ = x.Full("n1", "http://n1", "e", 0, blobs(b), now) }, false},
		{"delta", func(x *Index) { _ = x.Delta("n1", "e", 1, 2, blobs(b), nil, now) }, true},
		{"delta with a gap", func(x *Index) { _ = x.Delta("n1", "e", 5, 6, blobs(b), nil, now) }, false},
		{"touch", func(x *Index) { x.Touch("n1", now.Add(time.Second)) }, false},
		{"load", func(x *Index) { x.SetLoad("n1", &peers.Load{ActiveUploads: 1}) }, true},
		{"drop", func(x *Index) { x.Drop("n1") }, true},
		{"drop of an unknown node", func(x *Index) { x.Drop("n9") }, false},
		{"expire", func(x *Index) { x.Expire(now.Add(time.Second)) }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := NewIndex()
			if err := x.Full("n1", "http://n1", "e", 1, blobs(a), now); err != nil {
				t.Fatal(err)
			}
			changed := x.Changed()
			tc.op(x)
			select {
			case <-changed:
				if !tc.changed {
					t.Fatal("woken, but Locate answers the same")
				}
			default:
				if tc.changed {
					t.Fatal("not woken")
				}
			}
		})
	}
}
