package content

import (
	"bytes"
	"context"
	"crypto/rand"
	"path/filepath"
	"testing"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/core/content/testsuite"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// serve starts the node's gRPC server over a store in root and returns
// containerd's own proxy client for it, as containerd uses it.
func serve(ctx context.Context, t testing.TB, root string) (ctdcontent.Store, *Inventory) {
	t.Helper()
	inv := NewInventory()
	store, err := NewStore(ctx, filepath.Join(root, "store"), inv)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(root, "c.sock")
	l, err := ListenUnix(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewGRPCServer(store)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-served
	})
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return proxy.NewContentStore(conn), inv
}

// TestContentSuiteOverGRPC runs containerd's content suite through the
// socket, as containerd talks to coop, pipelined Write included.
func TestContentSuiteOverGRPC(t *testing.T) {
	testsuite.ContentSuite(t, "coop-grpc", func(ctx context.Context, root string) (context.Context, ctdcontent.Store, func() error, error) {
		cs, _ := serve(ctx, t, root)
		return ctx, cs, func() error { return nil }, nil
	})
}

func TestPipelinedWrite(t *testing.T) {
	ctx := context.Background()
	cs, inv := serve(ctx, t, t.TempDir())
	data := make([]byte, 9<<20+5)
	_, _ = rand.Read(data)
	d := digest.FromBytes(data)

	// As a pull does: no digest when opening, 1 MiB writes, digest at commit.
	w, err := cs.Writer(ctx, ctdcontent.WithRef("default/1/layer-"+d.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 1 << 20 {
		if _, err := w.Write(data[off:min(off+1<<20, len(data))]); err != nil {
			t.Fatal(err)
		}
	}
	st, err := w.Status()
	if err != nil || st.Offset != int64(len(data)) {
		t.Fatalf("status %+v, %v", st, err)
	}
	if err := w.Commit(ctx, int64(len(data)), d); err != nil {
		t.Fatal(err)
	}
	if n, ok := inv.Size(d); !ok || n != int64(len(data)) {
		t.Fatal("commit over gRPC not in the inventory")
	}
	got, err := ctdcontent.ReadBlob(ctx, cs, ocispec.Descriptor{Digest: d, Size: int64(len(data))})
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}

	// A wrong digest at commit fails and commits nothing.
	w, err = cs.Writer(ctx, ctdcontent.WithRef("bad"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data[:1000]); err != nil {
		t.Fatal(err)
	}
	wrong := digest.FromString("not this")
	if err := w.Commit(ctx, 1000, wrong); err == nil {
		t.Fatal("commit with a wrong digest succeeded")
	}
	if _, err := cs.Info(ctx, wrong); !errdefs.IsNotFound(err) {
		t.Fatalf("wrong digest committed: %v", err)
	}
	if _, ok := inv.Size(digest.FromBytes(data[:1000])); ok {
		t.Fatal("failed commit recorded")
	}
}
