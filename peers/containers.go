package peers

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers/trust"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ContainersPath prefixes the container records: GET
// ContainersPath/<namespace>/<id>, POST ContainersPath/<namespace>/<id>/stop.
const ContainersPath = "/coop/v1/containers"

// ContainerRecord is what a destination needs to recreate a container:
// its image, its OCI runtime spec and how containerd ran it.
type ContainerRecord struct {
	// Node is the source node's name.
	Node        string             `json:"node"`
	Namespace   string             `json:"namespace"`
	ID          string             `json:"id"`
	Image       string             `json:"image"`
	Target      ocispec.Descriptor `json:"target"`
	Spec        json.RawMessage    `json:"spec"`
	Snapshotter string             `json:"snapshotter"`
	Labels      map[string]string  `json:"labels,omitempty"`
	Runtime     string             `json:"runtime"`
	Running     bool               `json:"running"`
}

// ContainerRecords reads this node's containers from containerd.
type ContainerRecords interface {
	// Record returns the container's record; ErrNotFound if unknown.
	Record(ctx context.Context, namespace, id string) (*ContainerRecord, error)
	// Stop stops the container's task, if it runs.
	Stop(ctx context.Context, namespace, id string) error
}

// validateContainers checks the container options of a server: records
// need the namespaces they may come from, and the stop needs records.
func validateContainers(opts ServerOptions) error {
	switch {
	case opts.Containers != nil && len(opts.ContainerNamespaces) == 0:
		return fmt.Errorf("peer server container records need the namespaces to serve: %w", errdefs.ErrInvalidArgument)
	case opts.Containers == nil && len(opts.ContainerNamespaces) > 0:
		return fmt.Errorf("peer server container namespaces %q without container records: %w", opts.ContainerNamespaces, errdefs.ErrInvalidArgument)
	case opts.AllowStop && opts.Containers == nil:
		return fmt.Errorf("peer server remote stop without container records: %w", errdefs.ErrInvalidArgument)
	case slices.Contains(opts.ContainerNamespaces, ""):
		return fmt.Errorf("peer server container namespaces %q: an empty name: %w", opts.ContainerNamespaces, errdefs.ErrInvalidArgument)
	}
	return nil
}

// serveContainer answers GET <namespace>/<id> with the container's record
// and POST <namespace>/<id>/stop by stopping its task (when allowed): the
// one route of the peer server that changes anything on this node. A record
// holds the container's environment (Kubernetes puts Secrets there), so it
// is served only when the node serves records at all (Containers), only for
// the namespaces listed (ContainerNamespaces), and — when the server sits
// behind Authenticated — only to cluster members. Every record served,
// every stop and every refusal is logged with the asking node's name.
func (s *Server) serveContainer(w http.ResponseWriter, r *http.Request, rest string) error {
	ctx := r.Context()
	asker, ok := trust.Name(r)
	if !ok {
		asker = "(no certificate)"
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("asker", asker))
	if s.containers == nil {
		log.G(ctx).Warn("container record refused: records are off")
		return newError(http.StatusForbidden, CodeDenied, errdefs.ErrPermissionDenied, "this node does not serve container records (coop node --serve-containers NAMESPACE[,...])")
	}
	parts := strings.Split(rest, "/")
	stop := len(parts) == 3 && parts[2] == "stop"
	if (len(parts) != 2 && !stop) || parts[0] == "" || parts[1] == "" {
		return newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "want %s/NAMESPACE/ID", ContainersPath)
	}
	ns, id := parts[0], parts[1]
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("container", ns+"/"+id))
	if !slices.Contains(s.containerNSs, ns) {
		log.G(ctx).Warn("container record refused: namespace not served")
		return newError(http.StatusForbidden, CodeDenied, errdefs.ErrPermissionDenied, "namespace %q is not among those this node serves containers of (--serve-containers)", ns)
	}
	if stop {
		if r.Method != http.MethodPost {
			return methodNotAllowed(w, r, http.MethodPost)
		}
		if !s.allowStop {
			log.G(ctx).Warn("container stop refused: remote stop is off")
			return newError(http.StatusForbidden, CodeDenied, errdefs.ErrPermissionDenied, "stopping containers from peers is off here (--allow-remote-stop)")
		}
		// Finish the stop even if the asker goes away meanwhile.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if err := s.containers.Stop(sctx, ns, id); err != nil {
			return err
		}
		log.G(ctx).Info("container stopped for a peer")
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return methodNotAllowed(w, r, http.MethodGet, http.MethodHead)
	}
	rec, err := s.containers.Record(ctx, ns, id)
	if err != nil {
		return err
	}
	rec.Node = s.node
	log.G(ctx).Info("container record served")
	return writeJSON(w, r, rec)
}
