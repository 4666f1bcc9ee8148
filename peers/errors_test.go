package peers

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/log/logtest"
)

func TestWriteError(t *testing.T) {
	ctx := logtest.WithT(context.Background(), t)
	for _, tc := range []struct {
		name    string
		err     error
		status  int
		code    string
		message string // substring, when set
	}{
		{"typed", newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "blob x"), 404, CodeBlobUnknown, "blob x"},
		{"typed wrapped", fmt.Errorf("outer: %w", newError(http.StatusBadRequest, CodeDigestInvalid, errdefs.ErrInvalidArgument, "d")), 400, CodeDigestInvalid, "d"},
		{"not found class", fmt.Errorf("thing: %w", errdefs.ErrNotFound), 404, CodeNotFound, "thing"},
		{"invalid argument class", fmt.Errorf("arg: %w", errdefs.ErrInvalidArgument), 400, CodeInvalidArgument, "arg"},
		{"other", fmt.Errorf("disk on fire /secret/path"), 500, CodeUnknown, "Internal Server Error"},
		{"canceled", context.Canceled, 500, CodeUnknown, ""},
		{"non-error status", &Error{Status: 200, Code: "X"}, 500, "X", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			WriteError(ctx, rec, tc.err)
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d", rec.Code, tc.status)
			}
			var er ErrorResponse
			if err := json.Unmarshal(rec.Body.Bytes(), &er); err != nil || len(er.Errors) != 1 {
				t.Fatalf("body %s: %v", rec.Body, err)
			}
			if er.Errors[0].Code != tc.code || !strings.Contains(er.Errors[0].Message, tc.message) {
				t.Fatalf("error %+v, want code %s with %q", er.Errors[0], tc.code, tc.message)
			}
			if strings.Contains(rec.Body.String(), "/secret/path") {
				t.Fatal("internal error text shown to the client")
			}
		})
	}
	if e := newError(http.StatusNotFound, CodeBlobUnknown, errdefs.ErrNotFound, "x"); !errdefs.IsNotFound(e) {
		t.Fatal("an *Error does not unwrap to its class")
	}
}
