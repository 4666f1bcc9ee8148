package peers

import (
	"net/http"
	"sync"
	"time"
)

// LimitUpload wraps h so that all its response bodies together are sent at
// most bytesPerSec (0: no limit). It is the node's upload cap.
func LimitUpload(h http.Handler, bytesPerSec int64) http.Handler {
	if bytesPerSec <= 0 {
		return h
	}
	b := &bucket{rate: float64(bytesPerSec), burst: float64(max(bytesPerSec/10, 64<<10)), last: time.Now()}
	b.tokens = b.burst
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(&limitedWriter{ResponseWriter: w, b: b, r: r}, r)
	})
}

// bucket is a token bucket shared by every response.
type bucket struct {
	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

// take waits until n bytes may be sent, or the request ends.
func (b *bucket) take(r *http.Request, n int) bool {
	b.mu.Lock()
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	b.tokens -= float64(n)
	wait := time.Duration(0)
	if b.tokens < 0 {
		wait = time.Duration(-b.tokens / b.rate * float64(time.Second))
	}
	b.mu.Unlock()
	if wait == 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.Context().Done():
		return false
	}
}

type limitedWriter struct {
	http.ResponseWriter
	b *bucket
	r *http.Request
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := min(len(p), 32<<10)
		if !l.b.take(l.r, n) {
			return written, l.r.Context().Err()
		}
		m, err := l.ResponseWriter.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

// Unwrap lets http.ResponseController reach the real writer.
func (l *limitedWriter) Unwrap() http.ResponseWriter { return l.ResponseWriter }
