package peers

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/containerd/log"
)

// Defaults of NewHTTPServer.
const (
	// DefaultReadHeaderTimeout bounds reading a request's headers.
	DefaultReadHeaderTimeout = 10 * time.Second
	// DefaultReadTimeout bounds reading a whole request, body included:
	// coop's requests have small bodies (a have request is at most 4 MiB).
	DefaultReadTimeout = 30 * time.Second
	// DefaultWriteTimeout bounds writing one answer, from the end of its
	// request's headers. An answer that streams a long body moves it on
	// as bytes flow (NewStallWriter; the peer server's blobs do).
	DefaultWriteTimeout = 60 * time.Second
	// DefaultIdleTimeout bounds a kept-alive connection's wait for its next
	// request.
	DefaultIdleTimeout = 120 * time.Second
	// DefaultMaxHeaderBytes bounds a request's headers.
	DefaultMaxHeaderBytes = 64 << 10
)

// HTTPServerOptions tune NewHTTPServer. The zero value suits a listener
// whose answers are small or move their own write deadline: the peer server
// and ClusterKB.
type HTTPServerOptions struct {
	// WriteTimeout bounds writing one answer. Default DefaultWriteTimeout;
	// negative: none, for a handler that streams long bodies, or waits
	// long before them, without moving its write deadline (the mirror's
	// blob answers to containerd).
	WriteTimeout time.Duration
}

// NewHTTPServer returns an http.Server for h with the timeouts every coop
// listener needs: headers, whole requests, answers (see
// HTTPServerOptions.WriteTimeout), idle connections and header bytes are all
// bounded, so that clients that stop reading or writing cannot hold
// connections for ever.
func NewHTTPServer(h http.Handler, opts HTTPServerOptions) *http.Server {
	wt := opts.WriteTimeout
	switch {
	case wt == 0:
		wt = DefaultWriteTimeout
	case wt < 0:
		wt = 0
	}
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: DefaultReadHeaderTimeout,
		ReadTimeout:       DefaultReadTimeout,
		WriteTimeout:      wt,
		IdleTimeout:       DefaultIdleTimeout,
		MaxHeaderBytes:    DefaultMaxHeaderBytes,
	}
}

// stallPiece is the most written under one write deadline. A client that
// takes at least this much every stall is never cut.
const stallPiece = 128 << 10

// NewStallWriter returns a writer to w's body that cuts the answer when its
// client takes nothing for stall: before each piece of at most 128 KiB it
// moves the connection's write deadline to stall from now, so a slow reader
// that keeps taking bytes is served however long the body, and one that
// stops gets an error within stall (and the connection is closed). Where the
// deadline cannot be set (a ResponseWriter without a connection, such as
// httptest.ResponseRecorder) it writes to w as it is.
func NewStallWriter(w http.ResponseWriter, stall time.Duration) io.Writer {
	return &stallWriter{w: w, rc: http.NewResponseController(w), stall: stall}
}

type stallWriter struct {
	w     http.ResponseWriter
	rc    *http.ResponseController
	stall time.Duration
	plain bool // the deadline cannot be set
}

func (s *stallWriter) Write(p []byte) (int, error) {
	if s.plain {
		return s.w.Write(p)
	}
	written := 0
	for len(p) > 0 {
		if err := s.rc.SetWriteDeadline(time.Now().Add(s.stall)); err != nil {
			if !errors.Is(err, http.ErrNotSupported) {
				return written, err
			}
			s.plain = true
			n, err := s.w.Write(p)
			return written + n, err
		}
		n, err := s.w.Write(p[:min(len(p), stallPiece)])
		written += n
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

// ShutdownGrace is how long Serve lets a server drain its requests once its
// context ends, before it closes the connections left.
const ShutdownGrace = 5 * time.Second

// Serve serves srv on l until ctx ends or serving fails, then drains it for
// up to ShutdownGrace and closes what is left. It returns nil when ctx
// ended, and the serving error otherwise.
func Serve(ctx context.Context, srv *http.Server, l net.Listener) error {
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case err := <-served:
		if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
			return nil
		}
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ShutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.G(ctx).WithError(err).Warn("server did not drain in time; closing its connections")
		_ = srv.Close()
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.G(ctx).WithError(err).Warn("server stopped with an error")
	}
	return nil
}
