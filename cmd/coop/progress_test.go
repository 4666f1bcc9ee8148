package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coopnet/coop/plugin/mirror"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// TestLayerProgressPlain: written to a log (not a terminal), the display is
// one plain picture without terminal escape sequences.
func TestLayerProgressPlain(t *testing.T) {
	a, b := digest.FromString("a"), digest.FromString("b")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != mirror.DownloadsPath {
			http.NotFound(w, r)
			return
		}
		_ = json.NewEncoder(w).Encode([]mirror.Download{{Digest: a, Size: 2 << 20, BytesByNode: map[string]int64{"n1": 1 << 20, "n2": 1 << 20}, Done: true, Seconds: 1}})
	}))
	defer srv.Close()
	var out bytes.Buffer
	p := layerProgress{w: &out, mirror: &mirror.Client{URL: srv.URL, HTTP: srv.Client()}}
	layers := []ocispec.Descriptor{{Digest: a, Size: 2 << 20}, {Digest: b, Size: 1 << 20}}
	stop := p.start(context.Background(), layers, map[digest.Digest]bool{b: true})
	stop()
	got := out.String()
	if strings.ContainsRune(got, '\033') {
		t.Fatalf("escape sequences in a non-terminal display: %q", got)
	}
	lines := strings.Split(strings.TrimSpace(got), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines, want one per layer: %q", len(lines), got)
	}
	if !strings.Contains(lines[0], "done") || !strings.Contains(lines[0], "n1,n2") || !strings.Contains(lines[1], "exists") {
		t.Fatalf("display %q: want layer 1 done from n1,n2 and layer 2 existing", got)
	}
}
