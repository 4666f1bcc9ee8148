package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/coopnet/coop/plugin/mirror"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// layerProgress draws coop migrate's per-layer display from the mirror's
// download report: bytes, rate and the peers each layer comes from. On a
// terminal it redraws in place twice a second; anywhere else (a log, a
// pipe) it prints one plain picture when the pull ends.
type layerProgress struct {
	w      io.Writer
	mirror *mirror.Client
}

// start begins the display; stop draws the last picture and returns once
// nothing more is drawn.
func (p layerProgress) start(ctx context.Context, layers []ocispec.Descriptor, local map[digest.Digest]bool) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	dgsts := make([]digest.Digest, len(layers))
	for i, l := range layers {
		dgsts[i] = l.Digest
	}
	terminal := isTerminal(p.w)
	drawn := 0
	draw := func() {
		dls, err := p.mirror.Downloads(context.WithoutCancel(ctx), dgsts)
		if err != nil {
			return
		}
		var b strings.Builder
		if terminal && drawn > 0 {
			fmt.Fprintf(&b, "\033[%dA", drawn) // back over the last picture
		}
		for _, l := range layers {
			if terminal {
				b.WriteString("\033[2K") // clear the old line
			}
			b.WriteString(layerLine(l, dls, local))
		}
		drawn = len(layers)
		_, _ = io.WriteString(p.w, b.String())
	}
	if !terminal {
		return func() { cancel(); draw() }
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				draw()
				return
			case <-t.C:
				draw()
			}
		}
	})
	return func() { cancel(); wg.Wait() }
}

// layerLine is one layer's line of the display.
func layerLine(l ocispec.Descriptor, dls map[digest.Digest]mirror.Download, local map[digest.Digest]bool) string {
	status, got, rate, from := "waiting", int64(0), 0.0, ""
	switch dl, ok := dls[l.Digest]; {
	case local[l.Digest]:
		status, got = "exists", l.Size
	case ok:
		var names []string
		for n, v := range dl.BytesByNode {
			got += v
			names = append(names, n)
		}
		sort.Strings(names)
		got = min(got, l.Size)
		if dl.Seconds > 0 {
			rate = float64(got) / dl.Seconds
		}
		status = "fetching"
		if dl.Done {
			status = "done"
		}
		from = strings.Join(names, ",")
	}
	return fmt.Sprintf("%-19s %-8s %8.1f/%-8.1f MiB %7.1f MiB/s  %s\n", shortDigest(l.Digest), status,
		mib(got), mib(l.Size), rate/(1<<20), from)
}

// isTerminal reports whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func shortDigest(d digest.Digest) string {
	s := d.String()
	if len(s) > 19 {
		return s[:19]
	}
	return s
}
