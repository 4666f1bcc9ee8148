package peers

import (
	"fmt"
	"net/http"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/peers/trust"
)

// OpenPaths are what a coop server answers without a client certificate:
// health and metrics, for probes and scrapers.
var OpenPaths = []string{"/healthz", "/metrics"}

// Authenticated serves h only to clients with a certificate of the cluster
// CA (trust.Name), except the paths in open, which anyone may read; the
// others get 401 UNAUTHORIZED. It is for servers listening with
// trust.Credentials.ServerConfig.
func Authenticated(h http.Handler, open ...string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, ok := trust.Name(r); ok || slices.Contains(open, r.URL.Path) {
			h.ServeHTTP(w, r)
			return
		}
		w.Header().Set("WWW-Authenticate", `Mutual-TLS realm="coop"`)
		WriteError(r.Context(), w, fmt.Errorf("%s %s needs a certificate of the cluster CA: %w", r.Method, r.URL.Path, errdefs.ErrUnauthenticated))
	})
}
