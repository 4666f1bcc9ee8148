package mirror

import (
	"context"
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
)

// fetchGroup runs at most one fetch per digest; every request for that
// digest waits for the same result. A fetch runs detached from the request
// that started it (containerd may give up and retry); close cancels every
// fetch and waits for them.
type fetchGroup struct {
	mu      sync.Mutex
	running map[digest.Digest]*fetchCall
	closed  bool
	stop    chan struct{}
	wg      sync.WaitGroup
}

type fetchCall struct {
	done chan struct{}
	err  error
}

func newFetchGroup() *fetchGroup {
	return &fetchGroup{running: map[digest.Digest]*fetchCall{}, stop: make(chan struct{})}
}

// errClosed is the result of a fetch asked of a closed group.
var errClosed = fmt.Errorf("mirror closed: %w", errdefs.ErrUnavailable)

// start runs fn for dgst unless it is already running, and returns the call
// whose done channel closes with its result. ctx's values (its logger) go to
// fn, its cancellation does not.
func (g *fetchGroup) start(ctx context.Context, dgst digest.Digest, fn func(context.Context) error) *fetchCall {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c, ok := g.running[dgst]; ok {
		return c
	}
	c := &fetchCall{done: make(chan struct{})}
	if g.closed {
		c.err = errClosed
		close(c.done)
		return c
	}
	g.running[dgst] = c
	fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	g.wg.Go(func() {
		defer cancel()
		go func() {
			select {
			case <-g.stop:
				cancel()
			case <-fctx.Done():
			}
		}()
		c.err = run(fctx, fn)
		g.mu.Lock()
		delete(g.running, dgst)
		g.mu.Unlock()
		close(c.done)
	})
	return c
}

// close cancels the running fetches and waits for them to end.
func (g *fetchGroup) close() {
	g.mu.Lock()
	if !g.closed {
		g.closed = true
		close(g.stop)
	}
	g.mu.Unlock()
	g.wg.Wait()
}

// run calls fn, turning a panic into an error: a fetch runs on its own
// goroutine, where a panic would take the whole node down.
func run(ctx context.Context, fn func(context.Context) error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("fetch panicked: %v: %w", r, errdefs.ErrInternal)
		}
	}()
	return fn(ctx)
}
