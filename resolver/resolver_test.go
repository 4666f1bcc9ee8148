package resolver

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

func TestParseNeighbors(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     int
		bad      bool
	}{
		{"empty", "", 0, false},
		{"two", "b=http://198.18.0.2:5050,a=http://198.18.0.1:5050/", 2, false},
		{"no url", "a", 0, true},
		{"no name", "=http://x", 0, true},
		{"bad scheme", "a=ftp://x", 0, true},
		{"no host", "a=http://", 0, true},
		{"twice", "a=http://x,a=http://y", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseNeighbors(tc.in)
			if tc.bad {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("err = %v, want invalid argument", err)
				}
				return
			}
			if err != nil || len(got) != tc.want {
				t.Fatalf("got %v, %v", got, err)
			}
			if tc.want == 2 && (got[0].Name != "a" || got[0].URL != "http://198.18.0.1:5050") {
				t.Fatalf("not sorted or not trimmed: %v", got)
			}
		})
	}
}

type fakeAsker map[string]func(ctx context.Context) (*peers.HaveResponse, error)

func (f fakeAsker) Have(ctx context.Context, u string, _ []digest.Digest) (*peers.HaveResponse, error) {
	return f[u](ctx)
}

func TestOnline(t *testing.T) {
	d1, d2, d3 := digest.FromString("1"), digest.FromString("2"), digest.FromString("3")
	held := func(bs ...content.Blob) func(context.Context) (*peers.HaveResponse, error) {
		return func(context.Context) (*peers.HaveResponse, error) { return &peers.HaveResponse{Blobs: bs}, nil }
	}
	asker := fakeAsker{
		"http://a": held(content.Blob{Digest: d1, Size: 1}, content.Blob{Digest: d3, Size: 3}),
		"http://b": held(content.Blob{Digest: d1, Size: 1}, content.Blob{Digest: d2, Size: -1}),
		"http://dead": func(context.Context) (*peers.HaveResponse, error) {
			return nil, errdefs.ErrUnavailable
		},
		"http://slow": func(ctx context.Context) (*peers.HaveResponse, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
	}
	o, err := NewOnline(OnlineOptions{
		Neighbors: Static{{"a", "http://a"}, {"b", "http://b"}, {"dead", "http://dead"}, {"slow", "http://slow"}},
		Client:    asker,
		Timeout:   50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := o.Locate(context.Background(), []digest.Digest{d1, d2})
	if err != nil {
		t.Fatal(err)
	}
	if len(got[d1]) != 2 || got[d1][0].Node != "a" || got[d1][1].Node != "b" {
		t.Fatalf("d1 candidates %v", got[d1])
	}
	if len(got[d2]) != 0 {
		t.Fatalf("negative size kept: %v", got[d2])
	}
	if len(got[d3]) != 0 {
		t.Fatalf("digest not asked kept: %v", got[d3])
	}
	if _, err := o.Locate(context.Background(), []digest.Digest{"sha256:nope"}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("bad digest: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := o.Locate(ctx, []digest.Digest{d1}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled locate: %v", err)
	}
	if _, err := NewOnline(OnlineOptions{}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("no client: %v", err)
	}
}

func TestNone(t *testing.T) {
	got, err := None{}.Locate(context.Background(), []digest.Digest{digest.FromString("x")})
	if err != nil || len(got) != 0 {
		t.Fatalf("none: %v %v", got, err)
	}
}
