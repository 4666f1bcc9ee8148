package node

import (
	"fmt"
	"sync"
	"time"

	"github.com/containerd/log"
)

// LogEntry is one warning or error the node logged.
type LogEntry struct {
	Time    time.Time `json:"time"`
	Level   string    `json:"level"`
	Message string    `json:"message"`
	Error   string    `json:"error,omitempty"`
}

// ErrorLog keeps the last warnings and errors logged, for the status. It is
// a logger hook: add it to the logger (log.L.Logger.AddHook). It is safe for
// concurrent use.
type ErrorLog struct {
	max int

	mu      sync.Mutex
	entries []LogEntry // a ring once full
	next    int
}

// DefaultErrorLogSize is how many entries an ErrorLog keeps by default.
const DefaultErrorLogSize = 20

// NewErrorLog returns an ErrorLog of the last max entries
// (DefaultErrorLogSize when max <= 0).
func NewErrorLog(max int) *ErrorLog {
	if max <= 0 {
		max = DefaultErrorLogSize
	}
	return &ErrorLog{max: max}
}

// Levels are the levels the hook receives: warnings and worse.
func (l *ErrorLog) Levels() []log.Level {
	return []log.Level{log.PanicLevel, log.FatalLevel, log.ErrorLevel, log.WarnLevel}
}

// Fire records e.
func (l *ErrorLog) Fire(e *log.Entry) error {
	le := LogEntry{Time: e.Time, Level: e.Level.String(), Message: e.Message}
	if err, ok := e.Data["error"]; ok {
		le.Error = fmt.Sprint(err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.entries) < l.max {
		l.entries = append(l.entries, le)
		return nil
	}
	l.entries[l.next] = le
	l.next = (l.next + 1) % l.max
	return nil
}

// Recent returns the entries kept, oldest first.
func (l *ErrorLog) Recent() []LogEntry {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]LogEntry, 0, len(l.entries))
	out = append(out, l.entries[l.next:]...)
	return append(out, l.entries[:l.next]...)
}
