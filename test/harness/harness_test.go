package harness

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func get(t *testing.T, url string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

func TestRegistryImageRangeAndRestart(t *testing.T) {
	ctx := context.Background()
	reg, err := StartRegistry(ctx, RegistryOptions{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	img, err := reg.PushRandomImage(ctx, ImageSpec{Repo: "t/img", Tag: "v1", LayerSizes: []int64{100 << 10, 3000}})
	if err != nil {
		t.Fatal(err)
	}
	if len(img.Layers) != 2 || !strings.HasPrefix(img.Ref, reg.Host()+"/t/img:v1") {
		t.Fatalf("image %+v", img)
	}
	reg.ResetCounts()

	// The manifest by tag and by digest, with its media type.
	resp, b := get(t, reg.URL()+"/v2/t/img/manifests/v1", nil)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(b) != img.Manifest.Digest {
		t.Fatalf("manifest: %s %s", resp.Status, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != ocispec.MediaTypeImageManifest {
		t.Fatalf("manifest content type %q", ct)
	}
	var cfg ocispec.Image
	_, b = get(t, reg.URL()+"/v2/t/img/blobs/"+img.Config.Digest.String(), nil)
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.OS != "linux" || cfg.Architecture != "amd64" || len(cfg.RootFS.DiffIDs) != 2 {
		t.Fatalf("config %s: %v", b, err)
	}

	// A layer is a gzip'd tar of one file of the asked size, whose digest
	// is the blob's and whose diff ID is the config's.
	l := img.Layers[0]
	resp, whole := get(t, reg.URL()+"/v2/t/img/blobs/"+l.Digest.String(), nil)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(whole) != l.Digest || int64(len(whole)) != l.Size {
		t.Fatalf("layer: %s, %d bytes", resp.Status, len(whole))
	}
	zr, err := gzip.NewReader(strings.NewReader(string(whole)))
	if err != nil {
		t.Fatal(err)
	}
	dd := digest.SHA256.Digester()
	tee := io.TeeReader(zr, dd.Hash())
	tr := tar.NewReader(tee)
	hdr, err := tr.Next()
	if err != nil || hdr.Size != 100<<10 {
		t.Fatalf("tar header %+v: %v", hdr, err)
	}
	if _, err := io.Copy(io.Discard, tr); err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, tee) // the tar trailer
	if dd.Digest() != cfg.RootFS.DiffIDs[0] {
		t.Fatalf("diff id %s, config says %s", dd.Digest(), cfg.RootFS.DiffIDs[0])
	}

	// Open-ended Range, as containerd sends to resume a broken body.
	resp, part := get(t, reg.URL()+"/v2/t/img/blobs/"+l.Digest.String(), map[string]string{"Range": "bytes=1000-"})
	if resp.StatusCode != http.StatusPartialContent || string(part) != string(whole[1000:]) {
		t.Fatalf("range: %s, %d bytes", resp.Status, len(part))
	}
	// The registry counts a request when its handler returns, which may be
	// just after the client has read the last byte.
	want := int64(len(b) + len(whole) + len(part))
	c := reg.Counts()
	for deadline := time.Now().Add(2 * time.Second); (c.BlobGets != 3 || c.BlobBytes != want) && time.Now().Before(deadline); c = reg.Counts() {
		time.Sleep(5 * time.Millisecond)
	}
	if c.BlobGets != 3 || c.ManifestGets != 1 || c.BlobBytes != want {
		t.Fatalf("counts %+v", c)
	}

	// Stopped: refused. Started again: same port, same content.
	host := reg.Host()
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := http.Get(reg.URL() + "/v2/"); err == nil {
		t.Fatal("stopped registry answered")
	}
	if err := reg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if reg.Host() != host {
		t.Fatalf("restarted on %s, was %s", reg.Host(), host)
	}
	resp, _ = get(t, reg.URL()+"/v2/t/img/manifests/"+img.Manifest.Digest.String(), nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("after restart: %s", resp.Status)
	}
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP coop_mirror_requests_total Mirror requests.
# TYPE coop_mirror_requests_total counter
coop_mirror_requests_total{kind="blob",result="miss"} 3
coop_mirror_requests_total{kind="manifest",result="miss"} 1
coop_mirror_requests_total{kind="blob",result="hit"} 2
coop_peer_served_bytes_total 1.048576e+06
odd_total{msg="a \"quoted\", value"} 7 1700000000
`
	m, err := ParseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		pairs []string
		want  float64
		found bool
	}{
		{"coop_mirror_requests_total", []string{"result", "miss"}, 4, true},
		{"coop_mirror_requests_total", nil, 6, true},
		{"coop_mirror_requests_total", []string{"result", "error"}, 0, false},
		{"coop_peer_served_bytes_total", nil, 1 << 20, true},
		{"odd_total", []string{"msg", `a "quoted", value`}, 7, true},
	} {
		got, found := m.Sum(tc.name, tc.pairs...)
		if got != tc.want || found != tc.found {
			t.Errorf("%s%v = %g, %v; want %g, %v", tc.name, tc.pairs, got, found, tc.want, tc.found)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	if got := unescapeMountinfo(`/a\040b/c`); got != "/a b/c" {
		t.Fatalf("got %q", got)
	}
}
