package peers

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestParseDistributionPath(t *testing.T) {
	const d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	for _, tc := range []struct {
		name string
		path string
		want DistributionPath
		err  func(error) bool // nil: success
	}{
		{"blob", "/v2/x/blobs/" + d, DistributionPath{KindBlob, "x", d}, nil},
		{"manifest by digest", "/v2/library/busybox/manifests/" + d, DistributionPath{KindManifest, "library/busybox", d}, nil},
		{"manifest by tag", "/v2/a/b/c-d.e__f/manifests/v1.2", DistributionPath{KindManifest, "a/b/c-d.e__f", "v1.2"}, nil},
		{"name with a blobs component", "/v2/a/blobs/b/manifests/latest", DistributionPath{KindManifest, "a/blobs/b", "latest"}, nil},
		{"ref not checked beyond one segment", "/v2/x/blobs/latest", DistributionPath{KindBlob, "x", "latest"}, nil},

		{"empty", "", DistributionPath{}, errdefs.IsNotFound},
		{"base", "/v2/", DistributionPath{}, errdefs.IsNotFound},
		{"no v2", "/x/blobs/" + d, DistributionPath{}, errdefs.IsNotFound},
		{"v2 without slash", "/v2x/blobs/" + d, DistributionPath{}, errdefs.IsNotFound},
		{"relative", "v2/x/blobs/" + d, DistributionPath{}, errdefs.IsNotFound},
		{"empty ref", "/v2/x/blobs/", DistributionPath{}, errdefs.IsNotFound},
		{"trailing slash", "/v2/x/blobs/" + d + "/", DistributionPath{}, errdefs.IsNotFound},
		{"upload", "/v2/x/blobs/uploads/", DistributionPath{}, errdefs.IsNotFound},
		{"tags", "/v2/x/tags/list", DistributionPath{}, errdefs.IsNotFound},
		{"referrers", "/v2/x/referrers/" + d, DistributionPath{}, errdefs.IsNotFound},
		{"catalog", "/v2/_catalog", DistributionPath{}, errdefs.IsNotFound},
		{"one segment", "/v2/blobs", DistributionPath{}, errdefs.IsNotFound},

		{"no name", "/v2/blobs/" + d, DistributionPath{KindBlob, "", d}, errdefs.IsInvalidArgument},
		{"empty name", "/v2//blobs/" + d, DistributionPath{KindBlob, "", d}, errdefs.IsInvalidArgument},
		{"dot dot", "/v2/../blobs/" + d, DistributionPath{KindBlob, "..", d}, errdefs.IsInvalidArgument},
		{"dot dot inside", "/v2/a/../../manifests/latest", DistributionPath{KindManifest, "a/../..", "latest"}, errdefs.IsInvalidArgument},
		{"double slash", "/v2/a//b/blobs/" + d, DistributionPath{KindBlob, "a//b", d}, errdefs.IsInvalidArgument},
		{"upper case", "/v2/Library/blobs/" + d, DistributionPath{KindBlob, "Library", d}, errdefs.IsInvalidArgument},
		{"trailing separator", "/v2/a-/manifests/latest", DistributionPath{KindManifest, "a-", "latest"}, errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseDistributionPath(tc.path)
			if tc.err == nil {
				if err != nil {
					t.Fatalf("ParseDistributionPath(%q): %v", tc.path, err)
				}
				if s := got.String(); s != tc.path {
					t.Fatalf("String() = %q, want %q", s, tc.path)
				}
			} else if !tc.err(err) {
				t.Fatalf("ParseDistributionPath(%q): error %v of the wrong class", tc.path, err)
			}
			if got != tc.want {
				t.Fatalf("ParseDistributionPath(%q) = %+v, want %+v", tc.path, got, tc.want)
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("error %v is not an *Error", err)
				}
				if want := map[bool]int{true: http.StatusNotFound, false: http.StatusBadRequest}[errdefs.IsNotFound(err)]; e.Status != want {
					t.Fatalf("status %d, want %d", e.Status, want)
				}
			}
		})
	}
}

// FuzzParseDistributionPath checks the parser's invariants: it never
// panics; a path it accepts has a valid name and a one-segment reference,
// and joins back to the input; a path it refuses for its name still joins
// back (but for a missing name), and one it does not recognise gives nothing
// back.
func FuzzParseDistributionPath(f *testing.F) {
	for _, seed := range []string{
		"/v2/x/blobs/sha256:abc", "/v2/a/b/manifests/latest", "/v2/blobs/x", "/v2//blobs/x",
		"/v2/../blobs/x", "/v2/x/blobs/", "/v2/x/blobs/a/", "/v2/", "/v2", "", "/", "/v2/x/tags/list",
		"/v2/a/blobs/b/manifests/c", "/v2/A/manifests/x", "/v2/x/manifests/a\x00b",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, p string) {
		dp, err := ParseDistributionPath(p)
		switch {
		case err == nil:
			if dp.String() != p {
				t.Fatalf("%q parsed to %+v, which joins to %q", p, dp, dp.String())
			}
			if !ValidName(dp.Name) || dp.Ref == "" || strings.Contains(dp.Ref, "/") {
				t.Fatalf("%q accepted as %+v", p, dp)
			}
			if dp.Kind != KindBlob && dp.Kind != KindManifest {
				t.Fatalf("%q: kind %q", p, dp.Kind)
			}
		case errdefs.IsInvalidArgument(err):
			joined := dp.String()
			if dp.Name == "" && joined != p {
				// /v2/blobs/x has no name at all, like /v2//blobs/x.
				joined = strings.Replace(joined, "/v2//", "/v2/", 1)
			}
			if joined != p || ValidName(dp.Name) {
				t.Fatalf("%q refused for its name %q (%v), parsed as %+v", p, dp.Name, err, dp)
			}
		case errdefs.IsNotFound(err):
			if dp != (DistributionPath{}) {
				t.Fatalf("%q not found (%v) yet parsed as %+v", p, err, dp)
			}
		default:
			t.Fatalf("%q: error %v of no expected class", p, err)
		}
	})
}
