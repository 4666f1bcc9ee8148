package content

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/v2/contrib/diffservice"
	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/containerd/containerd/v2/plugins/services/content/contentserver"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
)

// NewGRPCServer returns a gRPC server with containerd's content service over
// store and containerd's Diff service, whose Apply extracts layers read
// directly from store (containerd's own file-system applier), so unpacking
// does not read the layer back through the socket. With a ClaimStore, a
// claimed layer is applied as its bytes arrive from the peers.
func NewGRPCServer(store ctdcontent.Store, opts ...GRPCOpt) *grpc.Server {
	var o grpcOptions
	for _, opt := range opts {
		opt(&o)
	}
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(16<<20),
		grpc.MaxSendMsgSize(16<<20),
		// containerd writes blobs in 1 MiB messages, one round trip each:
		// large flow-control windows and socket buffers keep a message
		// from waiting for window updates.
		grpc.InitialWindowSize(8<<20),
		grpc.InitialConnWindowSize(16<<20),
		grpc.ReadBufferSize(1<<20),
		grpc.WriteBufferSize(256<<10),
	)
	contentapi.RegisterContentServer(srv, &pipelinedContent{ContentServer: contentserver.New(store), store: store, onCommit: o.onCommit})
	var unpackFrom ctdcontent.Provider = store
	if ap, ok := store.(interface{ ApplyProvider() ctdcontent.Provider }); ok {
		unpackFrom = ap.ApplyProvider()
	}
	diffapi.RegisterDiffServer(srv, diffservice.FromApplierAndComparer(
		restartingApplier{apply.NewFileSystemApplier(unpackFrom)},
		walking.NewWalkingDiff(store),
	))
	return srv
}

// GRPCOpt configures NewGRPCServer.
type GRPCOpt func(*grpcOptions)

type grpcOptions struct {
	onCommit func(dgst digest.Digest, size int64)
}

// WithCommitted has the server call f with each blob a client (containerd)
// wrote through the content service and committed: the blobs containerd
// fetched itself, as those coop fetched are in the store before containerd
// writes them.
func WithCommitted(f func(dgst digest.Digest, size int64)) GRPCOpt {
	return func(o *grpcOptions) { o.onCommit = f }
}

// ListenUnix listens on a unix socket at path: its directory is created with
// mode 0700 if missing, a stale socket is removed, the socket is mode 0600.
func ListenUnix(ctx context.Context, path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		// A live socket means another server: do not steal it.
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
		log.G(ctx).WithField("socket", path).Info("removed stale socket")
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}
