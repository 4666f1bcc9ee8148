package clusterkb_test

import (
	"bytes"
	"context"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	digest "github.com/opencontainers/go-digest"
)

// ociErrorCode returns the code of an OCI error body, or "".
func ociErrorCode(b []byte) string {
	var er peers.ErrorResponse
	if err := json.Unmarshal(b, &er); err != nil || len(er.Errors) != 1 {
		return ""
	}
	return er.Errors[0].Code
}

// post answers a POST of body to path on kb.
func post(ctx context.Context, kb http.Handler, path string, body []byte) *httptest.ResponseRecorder {
	req := httptest.NewRequestWithContext(ctx, http.MethodPost, path, bytes.NewReader(body))
	rec := httptest.NewRecorder()
	kb.ServeHTTP(rec, req)
	return rec
}

// FuzzKBRegister checks ClusterKB's registration bodies: whatever the body,
// the KB never fails (5xx) or panics, a refusal is an OCI error, and a
// registration it takes names a valid node at a base URL, which it then
// lists at that URL, and is told how often to renew.
// Seeds: testdata/fuzz/FuzzKBRegister.
func FuzzKBRegister(f *testing.F) {
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, body []byte) {
		kb, err := clusterkb.New(clusterkb.Options{Feed: clusterkb.FeedPull, Period: time.Hour, Reader: peerClient("kb"),
			Static: []resolver.Neighbor{{Name: "s1", URL: "http://s1:5050"}}})
		if err != nil {
			t.Fatal(err)
		}
		rec := post(ctx, kb, clusterkb.NodesPath, body)
		switch {
		case rec.Code >= 500:
			t.Fatalf("%q: %d %s", body, rec.Code, rec.Body)
		case rec.Code != http.StatusOK:
			if ociErrorCode(rec.Body.Bytes()) == "" {
				t.Fatalf("%q: %d without an OCI error body: %q", body, rec.Code, rec.Body)
			}
			return
		}
		var req clusterkb.RegisterRequest
		if err := json.Unmarshal(body, &req); err != nil {
			t.Fatalf("%q registered, yet it is no registration: %v", body, err)
		}
		if req.Name == "" || len(req.Name) > 253 || strings.ContainsFunc(req.Name, func(r rune) bool {
			return unicode.IsSpace(r) || unicode.IsControl(r) || r == '=' || r == ','
		}) {
			t.Fatalf("%q: registered name %q", body, req.Name)
		}
		want, err := peers.ParseBaseURL(req.URL)
		if err != nil {
			t.Fatalf("%q: registered URL %q: %v", body, req.URL, err)
		}
		var resp clusterkb.RegisterResponse
		if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil || resp.PeriodSeconds <= 0 || resp.TTLSeconds < resp.PeriodSeconds {
			t.Fatalf("%q: answer %q (%v)", body, rec.Body, err)
		}
		i := slices.IndexFunc(kb.Nodes(), func(n clusterkb.NodeInfo) bool { return n.Name == req.Name })
		if i < 0 || kb.Nodes()[i].URL != want {
			t.Fatalf("%q: registered, yet the KB lists %+v (want the URL normalised: %s)", body, kb.Nodes(), want)
		}
	})
}

// FuzzKBLocate checks ClusterKB's locate bodies: whatever the body, the KB
// never fails (5xx) or panics; it refuses, with an OCI error, exactly the
// bodies that are no locate request of at most MaxLocateDigests valid
// digests; and it answers, for the digests asked only, the nodes holding
// them, never the asker, and only its neighbours when it registered some.
// Seeds: testdata/fuzz/FuzzKBLocate.
func FuzzKBLocate(f *testing.F) {
	ctx := context.Background()
	a, b := digest.FromString("a"), digest.FromString("b")
	kb, err := clusterkb.New(clusterkb.Options{Feed: clusterkb.FeedPull, Period: time.Hour, Reader: peerClient("kb")})
	if err != nil {
		f.Fatal(err)
	}
	for _, n := range []struct {
		name  string
		blobs []content.Blob
	}{
		{"n1", []content.Blob{{Digest: a, Size: 4}}},
		{"n2", []content.Blob{{Digest: a, Size: 4}, {Digest: b, Size: 5}}},
	} {
		if err := kb.Index().Full(n.name, "http://"+n.name, "e", 1, n.blobs, time.Now()); err != nil {
			f.Fatal(err)
		}
	}
	if err := kb.Register(ctx, clusterkb.RegisterRequest{Name: "me", URL: "http://me", Neighbors: []string{"n1"}}); err != nil {
		f.Fatal(err)
	}
	holders := map[digest.Digest][]string{a: {"n1", "n2"}, b: {"n2"}}
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := post(ctx, kb, resolver.LocatePath, body)
		var req resolver.LocateRequest
		valid := json.Unmarshal(body, &req) == nil && len(req.Digests) <= resolver.MaxLocateDigests && resolver.ValidateDigests(req.Digests) == nil
		switch {
		case rec.Code >= 500:
			t.Fatalf("%q: %d %s", body, rec.Code, rec.Body)
		case rec.Code != http.StatusOK:
			if valid || ociErrorCode(rec.Body.Bytes()) == "" {
				t.Fatalf("%q (valid %v): %d %q", body, valid, rec.Code, rec.Body)
			}
			return
		case !valid:
			t.Fatalf("%q: not a valid locate request, yet answered %q", body, rec.Body)
		}
		var resp resolver.LocateResponse
		if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
			t.Fatalf("%q: answer %q: %v", body, rec.Body, err)
		}
		want := map[digest.Digest][]string{}
		for _, d := range req.Digests {
			for _, n := range holders[d] {
				if n != req.Node && (req.Node != "me" || n == "n1") && !slices.Contains(want[d], n) {
					want[d] = append(want[d], n)
				}
			}
		}
		got := map[digest.Digest][]string{}
		for d, cs := range resp.Candidates {
			for _, c := range cs {
				got[d] = append(got[d], c.Node)
			}
		}
		if !maps.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("%q: answered %v, want %v", body, got, want)
		}
	})
}
