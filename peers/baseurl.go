package peers

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// ParseBaseURL checks that s is the base URL of a coop HTTP endpoint (a
// peer server, a mirror, ClusterKB) and returns it normalised: the scheme in
// lower case, the path escaped and without trailing slashes, so that a path
// such as "/v2/..." can be appended to it by concatenation.
//
// s must be an absolute http or https URL with a host (and, if any, a port
// from 1 to 65535), and may have a path. Anything else fails with
// ErrInvalidArgument: another scheme, no host, user info, a query or a
// fragment (even an empty one: a URL ending in '?' or '#'), or what url.Parse
// refuses.
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
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 {
			return invalid("port " + p + " is out of range")
		}
	}
	out := url.URL{
		Scheme:  u.Scheme,
		Host:    u.Host,
		Path:    strings.TrimRight(u.Path, "/"),
		RawPath: strings.TrimRight(u.RawPath, "/"),
	}
	return out.String(), nil
}
