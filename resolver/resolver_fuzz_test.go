package resolver

import (
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/peers"
)

// FuzzParseNeighbors checks --neighbors parsing: an accepted list has
// unique, non-empty names in order and normalised base URLs, and written
// back as NAME=URL,... it parses to the same list; a refused one is
// ErrInvalidArgument. Seeds: testdata/fuzz/FuzzParseNeighbors.
func FuzzParseNeighbors(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		ns, err := ParseNeighbors(s)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("%q: error %v is not invalid argument", s, err)
			}
			return
		}
		parts := make([]string, 0, len(ns))
		for i, n := range ns {
			if n.Name == "" || strings.ContainsAny(n.Name, "=,") || (i > 0 && ns[i-1].Name >= n.Name) {
				t.Fatalf("%q: neighbour %d of %+v", s, i, ns)
			}
			if u, err := peers.ParseBaseURL(n.URL); err != nil || u != n.URL {
				t.Fatalf("%q: neighbour %s at %q, a base URL %q (%v)", s, n.Name, n.URL, u, err)
			}
			parts = append(parts, n.Name+"="+n.URL)
		}
		again, err := ParseNeighbors(strings.Join(parts, ","))
		if err != nil || !slices.Equal(again, ns) {
			t.Fatalf("%q gave %+v, which written back gives %+v, %v", s, ns, again, err)
		}
	})
}
