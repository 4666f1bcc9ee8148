package peers

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// ParseBaseURL checks that s is the base URL of a coop HTTP endpoint (a
// peer server, a mirror, ClusterKB) and returns it normalised: scheme, host
// and port only, the scheme in lower case, so that a path such as
// "/v2/..." appended to it reaches that endpoint and nothing else.
//
// s must be an absolute http or https URL with a host (and, if any, a port
// from 1 to 65535), at most followed by slashes. Anything else fails with
// ErrInvalidArgument: another scheme, no host, a path, user info, a query or
// a fragment (even an empty one: a URL ending in '?' or '#'), or what
// url.Parse refuses.
func ParseBaseURL(s string) (string, error) {
	invalid := func(why string) (string, error) {
		return "", fmt.Errorf("base URL %q: %s: %w", s, why, errdefs.ErrInvalidArgument)
	}
	// url.Parse keeps no trace of an empty query or fragment: look first.
	if strings.ContainsAny(s, "?#") {
		return invalid("a query or fragment is not allowed")
	}
	u, err := url.Parse(s)
	if err != nil {
		return invalid(err.Error())
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return invalid("want an http or https URL")
	case u.Opaque != "" || u.Host == "":
		return invalid("want a host")
	case u.User != nil:
		return invalid("user info is not allowed")
	case u.Hostname() == "":
		return invalid("want a host")
	case strings.HasSuffix(u.Host, ":"):
		return invalid("empty port")
	case strings.Trim(u.Path, "/") != "":
		return invalid("a path is not allowed: give scheme, host and port")
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
			return invalid("port " + p + " is out of range")
		}
	}
	out := url.URL{Scheme: u.Scheme, Host: u.Host}
	return out.String(), nil
}

// JoinURL returns the URL of the path elem... at the coop endpoint base:
// base must pass ParseBaseURL, and the elements are joined with
// url.JoinPath. An element is an escaped path: escape what comes from
// outside (url.PathEscape) and check it is a name, as a "." or ".." element
// is resolved away.
func JoinURL(base string, elem ...string) (string, error) {
	b, err := ParseBaseURL(base)
	if err != nil {
		return "", err
	}
	u, err := url.JoinPath(b, elem...)
	if err != nil {
		return "", fmt.Errorf("path %q at %s: %v: %w", elem, b, err, errdefs.ErrInvalidArgument)
	}
	return u, nil
}
