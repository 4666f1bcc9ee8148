package peers

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	"github.com/containerd/errdefs"
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

// serveContainer answers GET <namespace>/<id> with the container's record
// and POST <namespace>/<id>/stop by stopping its task (when allowed): the
// one route of the peer server that changes anything on this node.
func (s *Server) serveContainer(w http.ResponseWriter, r *http.Request, rest string) error {
	if s.containers == nil {
		return newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "this node does not read containerd (--containerd-address)")
	}
	parts := strings.Split(rest, "/")
	stop := len(parts) == 3 && parts[2] == "stop"
	if (len(parts) != 2 && !stop) || parts[0] == "" || parts[1] == "" {
		return newError(http.StatusNotFound, CodeNotFound, errdefs.ErrNotFound, "want %s/NAMESPACE/ID", ContainersPath)
	}
	ns, id := parts[0], parts[1]
	if stop {
		if r.Method != http.MethodPost {
			return methodNotAllowed(w, r, http.MethodPost)
		}
		if !s.allowStop {
			return newError(http.StatusForbidden, CodeUnsupported, errdefs.ErrPermissionDenied, "stopping containers from peers is off here (--allow-remote-stop)")
		}
		// Finish the stop even if the asker goes away meanwhile.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), time.Minute)
		defer cancel()
		if err := s.containers.Stop(sctx, ns, id); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return methodNotAllowed(w, r, http.MethodGet, http.MethodHead)
	}
	rec, err := s.containers.Record(r.Context(), ns, id)
	if err != nil {
		return err
	}
	rec.Node = s.node
	return writeJSON(w, r, rec)
}
