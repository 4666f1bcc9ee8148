package peers

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/containerd/log/logtest"
)

// pipeListener is a net.Listener of in-memory connections (net.Pipe), so
// that a real http.Server runs in a synctest bubble. Each connection's
// server side reports the remote address its client dialled from.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr("peer") }

// transportFrom returns a transport whose connections come from remote.
func (l *pipeListener) transportFrom(remote string) *http.Transport {
	return &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		client, server := net.Pipe()
		select {
		case l.conns <- remoteConn{Conn: server, remote: pipeAddr(remote)}:
			return client, nil
		case <-l.done:
			return nil, net.ErrClosed
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}}
}

type pipeAddr string

func (a pipeAddr) Network() string { return "pipe" }
func (a pipeAddr) String() string  { return string(a) }

type remoteConn struct {
	net.Conn
	remote net.Addr
}

func (c remoteConn) RemoteAddr() net.Addr { return c.remote }

// servePipe serves h with NewHTTPServer(h, opts) on a pipe listener until
// the test ends, with ctx's logger in every request.
func servePipe(ctx context.Context, t *testing.T, h http.Handler, opts HTTPServerOptions) *pipeListener {
	t.Helper()
	ln := newPipeListener()
	hs := NewHTTPServer(h, opts)
	hs.BaseContext = func(net.Listener) context.Context { return ctx }
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	t.Cleanup(func() {
		_ = hs.Close()
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return ln
}

func TestNewHTTPServer(t *testing.T) {
	h := http.NotFoundHandler()
	for _, tc := range []struct {
		name string
		opts HTTPServerOptions
		want time.Duration
	}{
		{"default write timeout", HTTPServerOptions{}, DefaultWriteTimeout},
		{"write timeout", HTTPServerOptions{WriteTimeout: time.Minute}, time.Minute},
		{"no write timeout", HTTPServerOptions{WriteTimeout: -1}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewHTTPServer(h, tc.opts)
			if s.Handler == nil || s.ReadHeaderTimeout != DefaultReadHeaderTimeout || s.ReadTimeout != DefaultReadTimeout ||
				s.IdleTimeout != DefaultIdleTimeout || s.MaxHeaderBytes != DefaultMaxHeaderBytes || s.WriteTimeout != tc.want {
				t.Fatalf("server %+v, want write timeout %v", s, tc.want)
			}
		})
	}
}

// TestServerWriteStall: a blob's client that stops reading is cut once it
// has taken nothing for WriteStall, its connection closed and its upload
// slot freed; one that keeps reading slowly is served to the end, for far
// longer than the server's WriteTimeout.
func TestServerWriteStall(t *testing.T) {
	const stall = 2 * time.Second
	synctest.Test(t, func(t *testing.T) {
		ctx := logtest.WithT(t.Context(), t)
		f := newFixture(ctx, t, 1<<20)
		srv, err := NewServer(ServerOptions{Node: "n", Store: f.store, Inventory: f.inv, MaxUploads: 1, WriteStall: stall})
		if err != nil {
			t.Fatal(err)
		}
		ln := servePipe(ctx, t, srv, HTTPServerOptions{WriteTimeout: 3 * time.Second})
		tr := ln.transportFrom("192.0.2.1:1000")
		defer tr.CloseIdleConnections()
		c := &Client{HTTP: &http.Client{Transport: tr}, Node: "t"}

		// A reader that stops after 100 KiB.
		stopped, err := c.Fetch(ctx, "http://peer", f.bigD, 0, int64(len(f.big)))
		if err != nil {
			t.Fatal(err)
		}
		defer stopped.Close()
		if _, err := io.ReadFull(stopped, make([]byte, 100<<10)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(stall - time.Millisecond)
		synctest.Wait()
		if n := srv.Load().ActiveUploads; n != 1 {
			t.Fatalf("%d uploads before the stall bound, want the stopped reader's", n)
		}
		time.Sleep(2 * time.Millisecond)
		synctest.Wait()
		if n := srv.Load().ActiveUploads; n != 0 {
			t.Fatalf("%d uploads after the stall bound, want the stopped reader cut", n)
		}
		if n, err := io.Copy(io.Discard, stopped); err == nil || n >= int64(len(f.big)) {
			t.Fatalf("the stopped reader's body went on: %d more bytes, %v", n, err)
		}

		// A reader taking 32 KiB every stall/8 (128 KiB a second): eight
		// seconds for the blob.
		start := time.Now()
		slow, err := c.Fetch(ctx, "http://peer", f.bigD, 0, int64(len(f.big)))
		if err != nil {
			t.Fatalf("after the stopped reader was cut: %v", err)
		}
		defer slow.Close()
		var got []byte
		buf := make([]byte, 32<<10)
		for {
			n, err := io.ReadFull(slow, buf)
			got = append(got, buf[:n]...)
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				break
			}
			if err != nil {
				t.Fatalf("slow reader after %d bytes and %v: %v", len(got), time.Since(start), err)
			}
			time.Sleep(stall / 8)
		}
		if string(got) != string(f.big) {
			t.Fatalf("slow reader got %d bytes of %d", len(got), len(f.big))
		}
		if el := time.Since(start); el < 2*stall {
			t.Fatalf("slow reader done in %v: not slow", el)
		}
	})
}
