package peers

import (
	"errors"
	"fmt"
	"net/http"
	"testing"

	"github.com/containerd/errdefs"
)

// FuzzParseByteRange checks the Range parser's contract for any header and
// blob size: a range it accepts lies inside the blob, is not empty, and
// parses to the same range when written canonically; a header it refuses is
// a 416 with ErrInvalidArgument. Seeds: testdata/fuzz/FuzzParseByteRange.
func FuzzParseByteRange(f *testing.F) {
	f.Fuzz(func(t *testing.T, header string, size int64) {
		if size < 0 {
			size = -(size + 1) // a blob's size is never negative
		}
		start, length, err := parseByteRange(header, size)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Status != http.StatusRequestedRangeNotSatisfiable || !errdefs.IsInvalidArgument(err) {
				t.Fatalf("%q of %d bytes: refused with %v, want a 416 invalid argument", header, size, err)
			}
			return
		}
		if start < 0 || length < 1 || start > size-length {
			t.Fatalf("%q of %d bytes: start %d length %d is outside the blob", header, size, start, length)
		}
		canon := fmt.Sprintf("bytes=%d-%d", start, start+length-1)
		if s, l, err := parseByteRange(canon, size); err != nil || s != start || l != length {
			t.Fatalf("%q of %d bytes gave %d+%d, but %q gives %d+%d, %v", header, size, start, length, canon, s, l, err)
		}
	})
}
