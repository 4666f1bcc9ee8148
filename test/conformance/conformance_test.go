//go:build integration

package conformance

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/log/logtest"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// passLine is what the suite prints for its root test when nothing failed.
// In pull-only mode the suite may panic while writing its report after
// printing it (exit status 2), so the printed results are what is judged.
const passLine = "OCI Conformance Test: Pass"

// failedStatus matches a test result line whose status is a failure.
var failedStatus = regexp.MustCompile(`(?m)^\s*OCI Conformance Test[^\n]*: (FAIL|Error)$`)

func TestPeerServerConformance(t *testing.T) {
	bin := os.Getenv("COOP_BIN")
	if bin == "" {
		t.Skip("COOP_BIN is not set: run `make test-integration`, which builds the conformance suite into bin/")
	}
	suite := filepath.Join(bin, "conformance")
	if _, err := os.Stat(suite); err != nil {
		t.Skipf("conformance suite not found (%v): run `make tools` to build it into %s", err, bin)
	}

	ctx := logtest.WithT(context.Background(), t)
	inv := content.NewInventory()
	store, err := content.NewStore(ctx, t.TempDir(), inv)
	if err != nil {
		t.Fatal(err)
	}
	manifest, blobs := writeImage(ctx, t, store)

	srv, err := peers.NewServer(peers.ServerOptions{Node: "conformance", Store: store, Inventory: inv})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv) // listens on 127.0.0.1
	t.Cleanup(ts.Close)

	blobList := make([]string, len(blobs))
	for i, d := range blobs {
		blobList[i] = d.String()
	}
	// The peer server has no tags: OCI_RO_DATA_TAGS stays unset, and the
	// suite then pulls the read-only manifests and blobs by digest only.
	vars := map[string]string{
		"OCI_REGISTRY":             strings.TrimPrefix(ts.URL, "http://"),
		"OCI_TLS":                  "disabled",
		"OCI_REPO1":                "coop/repo1",
		"OCI_REPO2":                "coop/repo2",
		"OCI_API_PULL":             "true",
		"OCI_API_PUSH":             "false",
		"OCI_API_BLOBS_DELETE":     "false",
		"OCI_API_MANIFESTS_DELETE": "false",
		"OCI_API_TAGS_DELETE":      "false",
		"OCI_API_REFERRER":         "false",
		"OCI_RO_DATA_MANIFESTS":    manifest.String(),
		"OCI_RO_DATA_BLOBS":        strings.Join(blobList, " "),
		"OCI_RESULTS_DIR":          filepath.Join(t.TempDir(), "results"),
		"OCI_LOG":                  "info",
	}
	env := []string{}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OCI_") {
			env = append(env, kv)
		}
	}
	for k, v := range vars {
		env = append(env, k+"="+v)
	}

	runCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(runCtx, suite)
	cmd.Dir = t.TempDir() // the suite may write report files to its working directory
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	t.Logf("conformance suite (%v):\n%s", err, out)
	if runCtx.Err() != nil {
		t.Fatalf("conformance suite timed out: %v", runCtx.Err())
	}

	text := string(out)
	for _, line := range []string{passLine, "OCI Conformance Result: Pass"} {
		if !strings.Contains(text, line) {
			t.Errorf("the suite did not print %q", line)
		}
	}
	if m := failedStatus.FindAllString(text, -1); len(m) > 0 {
		t.Errorf("failed tests:\n%s", strings.Join(m, "\n"))
	}
	if strings.Contains(text, "Conformance test detected a failure") {
		t.Error("the suite reports a failure")
	}
	// The read-only data was really pulled: each blob and the manifest by
	// digest, with GET and HEAD.
	for _, name := range []string{"blob-get", "blob-head", "manifest-by-digest", "manifest-head-by-digest"} {
		if !regexp.MustCompile(`(?m)/` + regexp.QuoteMeta(name) + `: Pass$`).MatchString(text) {
			t.Errorf("no passing %s test in the output", name)
		}
	}
}

// writeImage writes a small image into store: two gzipped tar layers, a
// config and a manifest. It returns the manifest's digest and every blob's.
func writeImage(ctx context.Context, t *testing.T, store *content.Store) (digest.Digest, []digest.Digest) {
	t.Helper()
	var layers []ocispec.Descriptor
	var diffIDs []digest.Digest
	for i, file := range []string{"hello.txt", "world.txt"} {
		var tarBuf bytes.Buffer
		tw := tar.NewWriter(&tarBuf)
		data := []byte(strings.Repeat(file+"\n", 1000*(i+1)))
		if err := tw.WriteHeader(&tar.Header{Name: file, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
		diffIDs = append(diffIDs, digest.FromBytes(tarBuf.Bytes()))
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		if _, err := zw.Write(tarBuf.Bytes()); err != nil {
			t.Fatal(err)
		}
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		layers = append(layers, writeBlob(ctx, t, store, ocispec.MediaTypeImageLayerGzip, gz.Bytes()))
	}
	config := writeJSON(ctx, t, store, ocispec.MediaTypeImageConfig, ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	})
	manifest := writeJSON(ctx, t, store, ocispec.MediaTypeImageManifest, ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    config,
		Layers:    layers,
	})
	return manifest.Digest, []digest.Digest{config.Digest, layers[0].Digest, layers[1].Digest}
}

func writeJSON(ctx context.Context, t *testing.T, store *content.Store, mediaType string, v any) ocispec.Descriptor {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return writeBlob(ctx, t, store, mediaType, b)
}

func writeBlob(ctx context.Context, t *testing.T, store *content.Store, mediaType string, data []byte) ocispec.Descriptor {
	t.Helper()
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}
	if err := ctdcontent.WriteBlob(ctx, store, desc.Digest.Encoded(), bytes.NewReader(data), desc); err != nil {
		t.Fatal(err)
	}
	return desc
}
