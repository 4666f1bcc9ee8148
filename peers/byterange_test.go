package peers

import (
	"errors"
	"net/http"
	"testing"
)

func TestParseByteRange(t *testing.T) {
	for _, tc := range []struct {
		header        string
		size          int64
		start, length int64
		ok            bool
	}{
		{"bytes=0-0", 10, 0, 1, true},
		{"bytes=0-9", 10, 0, 10, true},
		{"bytes=0-100", 10, 0, 10, true},
		{"bytes=9-", 10, 9, 1, true},
		{"bytes=-1", 10, 9, 1, true},
		{"bytes=-10", 10, 0, 10, true},
		{"bytes=-11", 10, 0, 10, true},
		{"bytes= 2-3 ", 10, 2, 2, true},
		{"bytes=10-", 10, 0, 0, false},
		{"bytes=-0", 10, 0, 0, false},
		{"bytes=-1", 0, 0, 0, false},
		{"bytes=0-", 0, 0, 0, false},
		{"bytes=", 10, 0, 0, false},
		{"bytes=-", 10, 0, 0, false},
		{"bytes=1", 10, 0, 0, false},
		{"bytes=a-b", 10, 0, 0, false},
		{"bytes=-+1", 10, 0, 0, false},
		{"bytes=1--2", 10, 0, 0, false},
		{"bytes=0-1,2-3", 10, 0, 0, false},
		{"bytes 0-1", 10, 0, 0, false},
		{"byte=0-1", 10, 0, 0, false},
		{"", 10, 0, 0, false},
	} {
		t.Run(tc.header, func(t *testing.T) {
			start, length, err := parseByteRange(tc.header, tc.size)
			if (err == nil) != tc.ok {
				t.Fatalf("err %v, want ok=%v", err, tc.ok)
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) || e.Status != http.StatusRequestedRangeNotSatisfiable || e.Code != CodeRangeInvalid {
					t.Fatalf("error %v is not a 416 RANGE_INVALID", err)
				}
				return
			}
			if start != tc.start || length != tc.length {
				t.Fatalf("range (%d, %d), want (%d, %d)", start, length, tc.start, tc.length)
			}
		})
	}
}
