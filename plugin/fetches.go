package plugin

import (
	"context"
	"fmt"
	"sync"

	"github.com/containerd/errdefs"

	digest "github.com/opencontainers/go-digest"
)

// fetchGroup runs at most one fetch per digest; every request for that
// digest waits for the same result. A fetch runs detached from the request
// that started it (containerd may give up and retry), bounded by the
// group's own context.
type fetchGroup struct {
	ctx     context.Context
	mu      sync.Mutex
	running map[digest.Digest]*fetchCall
}

type fetchCall struct {
	done chan struct{}
	err  error
}

func newFetchGroup(ctx context.Context) *fetchGroup {
	return &fetchGroup{ctx: ctx, running: map[digest.Digest]*fetchCall{}}
}

// start runs fn for dgst unless it is already running, and returns a channel
// that receives its result once.
func (g *fetchGroup) start(ctx context.Context, dgst digest.Digest, fn func(context.Context) error) <-chan error {
	g.mu.Lock()
	c, ok := g.running[dgst]
	if !ok {
		c = &fetchCall{done: make(chan struct{})}
		g.running[dgst] = c
		fctx := context.WithoutCancel(ctx)
		go func() {
			fctx, cancel := context.WithCancel(fctx)
			stop := context.AfterFunc(g.ctx, cancel)
			c.err = run(fctx, fn)
			stop()
			cancel()
			g.mu.Lock()
			delete(g.running, dgst)
			g.mu.Unlock()
			close(c.done)
		}()
	}
	g.mu.Unlock()
	out := make(chan error, 1)
	go func() {
		select {
		case <-c.done:
			out <- c.err
		case <-ctx.Done():
		}
	}()
	return out
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
