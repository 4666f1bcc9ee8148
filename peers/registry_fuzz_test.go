package peers

import (
	"encoding/json"
	"mime"
	"testing"
)

// FuzzManifestMediaType checks how the peer server tells a manifest's media
// type: a document it takes for a manifest is JSON, its type parses as a
// media type, and a mediaType field, when set, is the type answered.
// Seeds: testdata/fuzz/FuzzManifestMediaType.
func FuzzManifestMediaType(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		mt, ok := manifestMediaType(b)
		if !ok {
			if mt != "" {
				t.Fatalf("%q: not a manifest, yet type %q", b, mt)
			}
			return
		}
		if !json.Valid(b) {
			t.Fatalf("%q: not JSON, yet a manifest of type %q", b, mt)
		}
		if _, _, err := mime.ParseMediaType(mt); err != nil {
			t.Fatalf("%q: type %q: %v", b, mt, err)
		}
		var m struct {
			MediaType string `json:"mediaType"`
		}
		if err := json.Unmarshal(b, &m); err != nil || (m.MediaType != "" && m.MediaType != mt) {
			t.Fatalf("%q: type %q, field %q (%v)", b, mt, m.MediaType, err)
		}
	})
}
