package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

// FuzzParseSince checks ?since= parsing: an accepted position has an epoch
// of 1 to 64 bytes without ':' and formats back to itself; a refused one is
// ErrInvalidArgument. Seeds: testdata/fuzz/FuzzParseSince.
func FuzzParseSince(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		epoch, seq, err := ParseSince(s)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("%q: error %v is not invalid argument", s, err)
			}
			return
		}
		if epoch == "" || len(epoch) > 64 || strings.Contains(epoch, ":") {
			t.Fatalf("%q: accepted epoch %q", s, epoch)
		}
		if e, n, err := ParseSince(FormatSince(epoch, seq)); err != nil || e != epoch || n != seq {
			t.Fatalf("%q gave %q:%d, which formats to %q and parses to %q:%d, %v", s, epoch, seq, FormatSince(epoch, seq), e, n, err)
		}
	})
}

// FuzzServeHave checks POST /coop/v1/have for any body: the server never
// fails (5xx) or panics, a refusal is an OCI error, and an answer holds
// exactly the asked digests the node holds, in the order asked, with their
// sizes. Seeds: testdata/fuzz/FuzzServeHave.
func FuzzServeHave(f *testing.F) {
	ctx := context.Background()
	fx := newFixture(ctx, f, 4096)
	f.Fuzz(func(t *testing.T, body []byte) {
		req := httptest.NewRequestWithContext(ctx, http.MethodPost, HavePath, bytes.NewReader(body))
		rec := httptest.NewRecorder()
		fx.srv.ServeHTTP(rec, req)
		switch {
		case rec.Code >= 500:
			t.Fatalf("%q: %d %s", body, rec.Code, rec.Body)
		case rec.Code != http.StatusOK:
			if errorCode(rec.Body.Bytes()) == "" {
				t.Fatalf("%q: %d without an OCI error body: %q", body, rec.Code, rec.Body)
			}
			return
		}
		var asked HaveRequest
		if err := json.Unmarshal(body, &asked); err != nil {
			t.Fatalf("%q answered 200, yet it is no have request: %v", body, err)
		}
		var hr HaveResponse
		if err := json.Unmarshal(rec.Body.Bytes(), &hr); err != nil || hr.Node != "node-a" {
			t.Fatalf("%q: answer %q (%v)", body, rec.Body, err)
		}
		var want []content.Blob
		for _, d := range asked.Digests {
			if size, ok := fx.inv.Size(d); ok {
				want = append(want, content.Blob{Digest: d, Size: size})
			}
		}
		if !slices.Equal(hr.Blobs, want) {
			t.Fatalf("%q: answered %v, want %v", body, hr.Blobs, want)
		}
		if len(asked.Digests) > MaxHaveDigests || slices.ContainsFunc(asked.Digests, func(d digest.Digest) bool { return d.Validate() != nil }) {
			t.Fatalf("%q: accepted %d digests, some invalid or too many", body, len(asked.Digests))
		}
	})
}
