package mirror_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"testing"

	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/plugin/mirror"
	"github.com/coopnet/coop/resolver"
	digest "github.com/opencontainers/go-digest"
)

// knownResolver answers fixed candidates, refusing invalid digests as
// every Resolver does.
type knownResolver map[digest.Digest][]peers.Candidate

func (k knownResolver) Locate(_ context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	if err := resolver.ValidateDigests(dgsts); err != nil {
		return nil, err
	}
	out := map[digest.Digest][]peers.Candidate{}
	for _, d := range dgsts {
		if cs, ok := k[d]; ok {
			out[d] = cs
		}
	}
	return out, nil
}

// FuzzMirrorLocate checks the mirror's /coop/v1/locate (a POST body, or
// GET ?digest=...): whatever is asked, it never fails (5xx) or panics; it
// refuses, with an OCI error, exactly the questions with an invalid digest
// or too many, or a body that is no locate request; and it answers the
// resolver's candidates for the digests asked only.
// Seeds: testdata/fuzz/FuzzMirrorLocate.
func FuzzMirrorLocate(f *testing.F) {
	ctx := context.Background()
	a := digest.FromString("a")
	known := knownResolver{a: {{Node: "n1", URL: "http://n1:5050", Size: 1}}}
	store, err := content.NewStore(ctx, f.TempDir(), content.NewInventory())
	if err != nil {
		f.Fatal(err)
	}
	m, err := mirror.New(mirror.Options{Resolver: known, Peers: &peers.Client{HTTP: &http.Client{}, Node: "t"}, Store: store})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = m.Close() })
	f.Fuzz(func(t *testing.T, post bool, query string, body []byte) {
		req := (&http.Request{Method: http.MethodGet, URL: &url.URL{Path: resolver.LocatePath, RawQuery: query},
			Header: http.Header{}, Body: http.NoBody, Host: "127.0.0.1:5051", RemoteAddr: "127.0.0.1:1"}).WithContext(ctx)
		var asked resolver.LocateRequest
		valid := true
		if post {
			req.Method, req.URL.RawQuery, req.Body = http.MethodPost, "", io.NopCloser(bytes.NewReader(body))
			valid = json.NewDecoder(bytes.NewReader(body)).Decode(&asked) == nil
		} else {
			for _, d := range req.URL.Query()["digest"] {
				asked.Digests = append(asked.Digests, digest.Digest(d))
			}
		}
		valid = valid && len(asked.Digests) <= resolver.MaxLocateDigests && resolver.ValidateDigests(asked.Digests) == nil
		rec := httptest.NewRecorder()
		m.ServeHTTP(rec, req)
		switch {
		case rec.Code >= 500:
			t.Fatalf("post %v %q %q: %d %s", post, query, body, rec.Code, rec.Body)
		case rec.Code != http.StatusOK:
			var er peers.ErrorResponse
			if valid || json.Unmarshal(rec.Body.Bytes(), &er) != nil || len(er.Errors) != 1 {
				t.Fatalf("post %v %q %q (valid %v): %d %q", post, query, body, valid, rec.Code, rec.Body)
			}
			return
		case !valid:
			t.Fatalf("post %v %q %q: no valid question, yet answered %q", post, query, body, rec.Body)
		}
		var resp resolver.LocateResponse
		if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
			t.Fatalf("post %v %q %q: answer %q: %v", post, query, body, rec.Body, err)
		}
		want := map[digest.Digest][]peers.Candidate{}
		if slices.Contains(asked.Digests, a) {
			want[a] = known[a]
		}
		if !maps.EqualFunc(resp.Candidates, want, slices.Equal) {
			t.Fatalf("post %v %q %q: answered %v, want %v", post, query, body, resp.Candidates, want)
		}
	})
}
