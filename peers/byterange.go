package peers

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// parseByteRange parses a Range header for a blob of size bytes into the
// range's start and length. The error is a 416 *Error; see serveBlob.
func parseByteRange(header string, size int64) (start, length int64, err error) {
	unsatisfiable := func(format string, args ...any) error {
		return &Error{
			Status: http.StatusRequestedRangeNotSatisfiable,
			Code:   CodeRangeInvalid,
			Detail: map[string]any{"range": header, "size": size},
			Err:    fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), errdefs.ErrInvalidArgument),
		}
	}
	const unit = "bytes="
	if len(header) < len(unit) || !strings.EqualFold(header[:len(unit)], unit) {
		return 0, 0, unsatisfiable("range %q: only byte ranges are served", header)
	}
	spec := strings.TrimSpace(header[len(unit):])
	if strings.Contains(spec, ",") {
		return 0, 0, unsatisfiable("range %q: only a single range is served", header)
	}
	first, last, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, unsatisfiable("range %q is malformed", header)
	}
	first, last = strings.TrimSpace(first), strings.TrimSpace(last)
	if first == "" {
		n, ok := parseRangeInt(last)
		if !ok {
			return 0, 0, unsatisfiable("range %q is malformed", header)
		}
		if n == 0 || size == 0 {
			return 0, 0, unsatisfiable("range %q is outside the blob's %d bytes", header, size)
		}
		n = min(n, size)
		return size - n, n, nil
	}
	a, ok := parseRangeInt(first)
	if !ok {
		return 0, 0, unsatisfiable("range %q is malformed", header)
	}
	b := size - 1
	if last != "" {
		if b, ok = parseRangeInt(last); !ok || b < a {
			return 0, 0, unsatisfiable("range %q is malformed", header)
		}
	}
	if a >= size {
		return 0, 0, unsatisfiable("range %q is outside the blob's %d bytes", header, size)
	}
	b = min(b, size-1)
	return a, b - a + 1, nil
}

// parseRangeInt parses a non-empty string of decimal digits.
func parseRangeInt(s string) (int64, bool) {
	if s == "" {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}
