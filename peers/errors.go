package peers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Error codes of the error bodies written by WriteError. The first ones are
// the OCI distribution spec's; the others name what the spec leaves out.
const (
	CodeBlobUnknown     = "BLOB_UNKNOWN"
	CodeManifestUnknown = "MANIFEST_UNKNOWN"
	CodeDigestInvalid   = "DIGEST_INVALID"
	CodeNameInvalid     = "NAME_INVALID"
	CodeSizeInvalid     = "SIZE_INVALID"
	CodeUnsupported     = "UNSUPPORTED"

	// CodeRangeInvalid answers a Range header that cannot be served (416).
	CodeRangeInvalid = "RANGE_INVALID"
	// CodeNotFound answers a path that names no endpoint (404).
	CodeNotFound = "NOT_FOUND"
	// CodeInvalidArgument answers a malformed request body (400).
	CodeInvalidArgument = "INVALID_ARGUMENT"
	// CodeTooManyRequests answers a busy peer (429).
	CodeTooManyRequests = "TOOMANYREQUESTS"
	// CodeUnknown answers an internal failure (500).
	CodeUnknown = "UNKNOWN"
	// CodeUnauthorized answers a client without a cluster certificate (401).
	CodeUnauthorized = "UNAUTHORIZED"
	// CodeDenied answers an authenticated client acting beyond its name
	// (403).
	CodeDenied = "DENIED"
)

// ErrorResponse is the body of every error answer, as the OCI distribution
// spec defines it.
type ErrorResponse struct {
	Errors []ErrorInfo `json:"errors"`
}

// ErrorInfo is one entry of an ErrorResponse.
type ErrorInfo struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// Error is an error answered with a given HTTP status and error code. It
// unwraps to its cause, so errdefs classes still apply to it.
type Error struct {
	// Status is the HTTP status code.
	Status int
	// Code is the error code, one of the Code constants.
	Code string
	// Detail is optional structured detail, encoded as JSON.
	Detail any
	// Err is the cause; its text is the error message.
	Err error
}

// Error returns the code and the cause.
func (e *Error) Error() string {
	if e.Err == nil {
		return e.Code
	}
	return e.Code + ": " + e.Err.Error()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error {
	return e.Err
}

// newError returns an *Error with status and code whose cause is err wrapped
// in class, an errdefs class, when err does not already belong to it.
func newError(status int, code string, class error, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Err: fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), class)}
}

// WriteError writes err as an OCI error body. An *Error in err's chain gives
// the status and code; otherwise errdefs.IsNotFound gives 404 NOT_FOUND,
// errdefs.IsInvalidArgument gives 400 INVALID_ARGUMENT, and anything else
// gives 500 UNKNOWN, logged with log.G(ctx) and not shown to the client.
// Headers already set on w (Allow, Content-Range) are kept.
func WriteError(ctx context.Context, w http.ResponseWriter, err error) {
	var e *Error
	var info ErrorInfo
	status := http.StatusInternalServerError
	switch {
	case errors.As(err, &e):
		status = e.Status
		info = ErrorInfo{Code: e.Code, Detail: e.Detail}
		if e.Err != nil {
			info.Message = e.Err.Error()
		}
	case errdefs.IsNotFound(err):
		status = http.StatusNotFound
		info = ErrorInfo{Code: CodeNotFound, Message: err.Error()}
	case errdefs.IsInvalidArgument(err):
		status = http.StatusBadRequest
		info = ErrorInfo{Code: CodeInvalidArgument, Message: err.Error()}
	case errdefs.IsUnauthorized(err):
		status = http.StatusUnauthorized
		info = ErrorInfo{Code: CodeUnauthorized, Message: err.Error()}
	case errdefs.IsPermissionDenied(err):
		status = http.StatusForbidden
		info = ErrorInfo{Code: CodeDenied, Message: err.Error()}
	default:
		if errdefs.IsCanceled(err) || errdefs.IsDeadlineExceeded(err) {
			log.G(ctx).WithError(err).Debug("peer request ended early")
		} else {
			log.G(ctx).WithError(err).Error("peer request failed")
		}
		info = ErrorInfo{Code: CodeUnknown, Message: http.StatusText(status)}
	}
	if status < 400 || status > 599 {
		log.G(ctx).WithError(err).WithField("status", status).Error("error with a non-error status")
		status = http.StatusInternalServerError
	}
	body, merr := json.Marshal(ErrorResponse{Errors: []ErrorInfo{info}})
	if merr != nil {
		// Only a Detail that cannot be encoded gets here.
		log.G(ctx).WithError(merr).Error("encode error body")
		info.Detail = nil
		body, _ = json.Marshal(ErrorResponse{Errors: []ErrorInfo{info}})
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
