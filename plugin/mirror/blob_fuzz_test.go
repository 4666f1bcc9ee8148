package mirror

import (
	"fmt"
	"strings"
	"testing"
)

// FuzzParseRangeStart checks the mirror's reading of containerd's Range
// header: it takes only "bytes=N-" with N >= 0, and N written back parses
// to N. Seeds: testdata/fuzz/FuzzParseRangeStart.
func FuzzParseRangeStart(f *testing.F) {
	f.Fuzz(func(t *testing.T, h string) {
		n, ok := parseRangeStart(h)
		if !ok {
			if n != 0 {
				t.Fatalf("%q: refused, yet start %d", h, n)
			}
			return
		}
		if n < 0 || !strings.HasPrefix(h, "bytes=") || !strings.HasSuffix(h, "-") {
			t.Fatalf("%q: start %d", h, n)
		}
		canon := fmt.Sprintf("bytes=%d-", n)
		if again, ok := parseRangeStart(canon); !ok || again != n {
			t.Fatalf("%q gave %d, but %q gives %d, %v", h, n, canon, again, ok)
		}
	})
}
