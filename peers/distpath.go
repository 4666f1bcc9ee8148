package peers

import (
	"net/http"
	"regexp"
	"strings"

	"github.com/containerd/errdefs"
)

// ociNameRegexp is a repository name as the OCI distribution spec defines it.
// It is read-only after init.
var ociNameRegexp = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)

// ValidName reports whether name is a repository name as the OCI
// distribution spec defines it.
func ValidName(name string) bool {
	return ociNameRegexp.MatchString(name)
}

// DistributionKind is what a DistributionPath names.
type DistributionKind string

// The kinds of DistributionPath.
const (
	// KindBlob is /v2/<name>/blobs/<digest>.
	KindBlob DistributionKind = "blob"
	// KindManifest is /v2/<name>/manifests/<reference>.
	KindManifest DistributionKind = "manifest"
)

// DistributionPath is a blob or manifest path of the OCI distribution API.
type DistributionPath struct {
	// Kind is KindBlob or KindManifest.
	Kind DistributionKind
	// Name is the repository name.
	Name string
	// Ref is the digest of a blob, the digest or tag of a manifest; the
	// parser only checks that it is one non-empty path segment.
	Ref string
}

// String returns the path: /v2/<Name>/blobs/<Ref> or
// /v2/<Name>/manifests/<Ref>.
func (p DistributionPath) String() string {
	seg := "blobs"
	if p.Kind == KindManifest {
		seg = "manifests"
	}
	return "/v2/" + p.Name + "/" + seg + "/" + p.Ref
}

// ParseDistributionPath parses the URL path p (unescaped, as in
// http.Request.URL.Path) as /v2/<name>/blobs/<ref> or
// /v2/<name>/manifests/<ref>: the last two segments give the kind and the
// reference, everything between /v2/ and them the name.
//
// When p has neither form (no /v2/ prefix, another route, an empty
// reference) the error is a 404 NOT_FOUND *Error, of class ErrNotFound. When
// it has one but the name is not a valid OCI repository name (empty, upper
// case, "..", "//", ...) the error is a 400 NAME_INVALID *Error, of class
// ErrInvalidArgument, and the returned path holds what was parsed, so the
// caller knows the kind. On success the path's String is p.
func ParseDistributionPath(p string) (DistributionPath, error) {
	notFound := func() (DistributionPath, error) {
		return DistributionPath{}, newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "no blob or manifest at %q", p)
	}
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return notFound()
	}
	i := strings.LastIndexByte(rest, '/')
	if i < 0 {
		return notFound()
	}
	head, ref := rest[:i], rest[i+1:]
	if ref == "" {
		return notFound()
	}
	name, seg := "", head
	if j := strings.LastIndexByte(head, '/'); j >= 0 {
		name, seg = head[:j], head[j+1:]
	}
	dp := DistributionPath{Name: name, Ref: ref}
	switch seg {
	case "blobs":
		dp.Kind = KindBlob
	case "manifests":
		dp.Kind = KindManifest
	default:
		return notFound()
	}
	if !ValidName(name) {
		return dp, newError(http.StatusBadRequest, CodeNameInvalid, errdefs.ErrInvalidArgument, "invalid repository name %q", name)
	}
	return dp, nil
}
