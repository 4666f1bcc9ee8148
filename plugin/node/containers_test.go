package node

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/coopnet/coop/peers"
)

// TestValidateSharing: --serve-containers, --allow-remote-stop and
// --share-namespaces are refused where they cannot be honoured or would
// give containers' specs to anyone.
func TestValidateSharing(t *testing.T) {
	checkValidate(t, []validateCase{
		{"records on loopback", func(o *Options) { o.Containerd, o.ServeContainers = "/x.sock", []string{"default", "k8s.io"} }, ""},
		{"records and stop", func(o *Options) {
			o.Containerd, o.ServeContainers, o.AllowRemoteStop = "/x.sock", []string{"default"}, true
		}, ""},
		{"records without containerd", func(o *Options) { o.ServeContainers = []string{"default"} }, "--serve-containers needs --containerd-address"},
		{"records insecure on the network", func(o *Options) {
			o.Containerd, o.ServeContainers, o.Insecure, o.PeerListen = "/x.sock", []string{"default"}, true, "0.0.0.0:5050"
		}, "--serve-containers without --tls-dir"},
		{"bad namespace", func(o *Options) { o.Containerd, o.ServeContainers = "/x.sock", []string{"a/b"} }, "--serve-containers: namespace"},
		{"stop without records", func(o *Options) { o.Containerd, o.AllowRemoteStop = "/x.sock", true }, "--allow-remote-stop needs --serve-containers"},
		{"share in proxy mode", func(o *Options) { o.ShareNamespaces = []string{"k8s.io"} }, "--share-namespaces needs --content-mode observer"},
		{"share in observer mode", func(o *Options) {
			o.ContentMode, o.Containerd, o.ShareNamespaces = ContentObserver, "/x.sock", []string{"k8s.io"}
		}, ""},
		{"bad shared namespace", func(o *Options) {
			o.ContentMode, o.Containerd, o.ShareNamespaces = ContentObserver, "/x.sock", []string{"-x"}
		}, "--share-namespaces: namespace"},
	})
}

// TestServeContainersReachesServer: the node's peer server refuses records
// unless ServeContainers lists the namespace. (A listed one would be read
// from containerd: the e2e test covers it.)
func TestServeContainersReachesServer(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve []string
		want  map[string]int // namespace → status
	}{
		{"off", nil, map[string]int{"default": 403, "k8s.io": 403}},
		{"default listed", []string{"default"}, map[string]int{"k8s.io": 403}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := proxyOptions(t)
			o.Containerd = filepath.Join(t.TempDir(), "no-containerd.sock")
			o.ServeContainers = tc.serve
			n, err := New(context.Background(), o)
			if err != nil {
				t.Fatal(err)
			}
			defer n.Close()
			ctx, cancel := context.WithCancel(context.Background())
			ran := make(chan error, 1)
			go func() { ran <- n.Run(ctx) }()
			defer func() {
				cancel()
				if err := <-ran; err != nil {
					t.Errorf("Run: %v", err)
				}
			}()
			for ns, status := range tc.want {
				resp, err := http.Get("http://" + n.PeerAddr().String() + peers.ContainersPath + "/" + ns + "/web")
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != status || !strings.Contains(string(body), "--serve-containers") {
					t.Fatalf("%s: %d %s, want %d naming --serve-containers", ns, resp.StatusCode, body, status)
				}
			}
		})
	}
}
