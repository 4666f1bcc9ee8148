package content

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	ctdcontent "github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// writeQueueDepth is how many Write messages (1 MiB each from containerd)
// may wait for the disk and the hash while containerd sends the next ones.
const writeQueueDepth = 8

// pipelinedContent is containerd's content service with a pipelined Write:
// each data message is acknowledged as soon as it is received and queued,
// and written and hashed in the background, so containerd's next read from
// the registry overlaps our disk write and hash instead of waiting for them.
// STAT and COMMIT wait for the queue; a write error fails the stream at the
// next message. Everything else is containerd's own content server.
type pipelinedContent struct {
	contentapi.ContentServer
	store    ctdcontent.Store
	onCommit func(dgst digest.Digest, size int64)

	// lastRecv keeps, per ingest ref, when its last data arrived, for a
	// later session resuming it (see received below).
	mu       sync.Mutex
	lastRecv map[string]time.Time
}

// received returns when ref's last data arrived in an earlier session.
func (s *pipelinedContent) received(ref string) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastRecv[ref]
}

// setReceived records t for ref (zero t forgets ref), forgetting refs idle
// for an hour.
func (s *pipelinedContent) setReceived(ref string, t time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastRecv == nil {
		s.lastRecv = map[string]time.Time{}
	}
	for r, at := range s.lastRecv {
		if time.Since(at) > time.Hour {
			delete(s.lastRecv, r)
		}
	}
	if t.IsZero() {
		delete(s.lastRecv, ref)
		return
	}
	s.lastRecv[ref] = t
}

// Write implements the content Write stream.
func (s *pipelinedContent) Write(session contentapi.Content_WriteServer) error {
	ctx := session.Context()
	req, err := session.Recv()
	if err != nil {
		return err
	}
	if req.Ref == "" {
		return errgrpc.ToGRPC(fmt.Errorf("first message must have a reference: %w", errdefs.ErrInvalidArgument))
	}
	ref := req.Ref
	total := req.Total
	expected := digest.Digest(req.Expected)
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("ref", ref))
	wr, err := s.store.Writer(ctx, ctdcontent.WithRef(ref),
		ctdcontent.WithDescriptor(ocispec.Descriptor{Size: total, Digest: expected}))
	if err != nil {
		return errgrpc.ToGRPC(err)
	}
	q := newWriteQueue(wr)
	defer func() {
		q.close()
		wr.Close()
	}()
	ws, err := wr.Status()
	if err != nil {
		return errgrpc.ToGRPC(err)
	}
	offset := ws.Offset // bytes received, queued or written
	// received is when the last data arrived: the time the client
	// acknowledged, and so the update time it expects, even when the queue
	// writes the data a moment later.
	received := s.received(ref)
	committed := false
	defer func() {
		if committed {
			s.setReceived(ref, time.Time{})
		} else if !received.IsZero() {
			s.setReceived(ref, received)
		}
	}()

	for {
		if err := q.failed(); err != nil {
			return errgrpc.ToGRPC(err)
		}
		msg := contentapi.WriteContentResponse{Action: req.Action, Offset: offset}
		if req.Expected != "" {
			expected = digest.Digest(req.Expected)
			if _, err := s.store.Info(ctx, expected); err == nil {
				q.close()
				wr.Close()
				if err := s.store.Abort(ctx, ref); err != nil && !errdefs.IsNotFound(err) {
					log.G(ctx).WithError(err).Warn("abort of a write whose blob exists failed")
				}
				return errgrpc.ToGRPC(fmt.Errorf("blob with expected digest %v: %w", expected, errdefs.ErrAlreadyExists))
			}
		}
		if req.Total > 0 {
			total = req.Total
		}
		switch req.Action {
		case contentapi.WriteAction_STAT:
			if err := q.drain(); err != nil {
				return errgrpc.ToGRPC(err)
			}
			ws, err := wr.Status()
			if err != nil {
				return errgrpc.ToGRPC(err)
			}
			msg.Offset = ws.Offset
			msg.Digest = wr.Digest().String()
			msg.StartedAt = protobuf.ToTimestamp(ws.StartedAt)
			updated := ws.UpdatedAt
			if !received.IsZero() && received.Before(updated) {
				updated = received
			}
			msg.UpdatedAt = protobuf.ToTimestamp(updated)
			msg.Total = total
		case contentapi.WriteAction_WRITE, contentapi.WriteAction_COMMIT:
			if req.Offset > 0 && req.Offset != offset {
				return errgrpc.ToGRPC(fmt.Errorf("write @%d must occur at current offset %d: %w", req.Offset, offset, errdefs.ErrOutOfRange))
			}
			if req.Offset == 0 && offset > 0 {
				if err := q.drain(); err != nil {
					return errgrpc.ToGRPC(err)
				}
				if err := wr.Truncate(0); err != nil {
					return errgrpc.ToGRPC(fmt.Errorf("truncate: %w", err))
				}
				offset = 0
			}
			if len(req.Data) > 0 {
				received = time.Now()
				q.push(req.Data)
				offset += int64(len(req.Data))
			}
			msg.Offset = offset
			if req.Action == contentapi.WriteAction_COMMIT {
				if err := q.drain(); err != nil {
					return errgrpc.ToGRPC(err)
				}
				var opts []ctdcontent.Opt
				if req.Labels != nil {
					opts = append(opts, ctdcontent.WithLabels(req.Labels))
				}
				if err := wr.Commit(ctx, total, expected, opts...); err != nil {
					return errgrpc.ToGRPC(err)
				}
				committed = true
				msg.Digest = wr.Digest().String()
				if s.onCommit != nil {
					s.onCommit(wr.Digest(), offset)
				}
			}
		default:
			return errgrpc.ToGRPC(fmt.Errorf("unknown write action %v: %w", req.Action, errdefs.ErrInvalidArgument))
		}
		if err := session.Send(&msg); err != nil {
			return err
		}
		if req.Action == contentapi.WriteAction_COMMIT {
			return nil
		}
		req, err = session.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				// The client went away: what was received still lands.
				return errgrpc.ToGRPC(q.drain())
			}
			return err
		}
	}
}

// writeQueue writes data to a content writer in a goroutine of its own.
// Whoever makes a queue owns that goroutine: close ends it and waits for it.
type writeQueue struct {
	ch   chan writeItem
	done chan struct{}

	mu  sync.Mutex
	err error

	closeOnce sync.Once
}

type writeItem struct {
	data    []byte
	barrier chan struct{}
}

func newWriteQueue(w io.Writer) *writeQueue {
	q := &writeQueue{ch: make(chan writeItem, writeQueueDepth), done: make(chan struct{})}
	go func() {
		defer close(q.done)
		for it := range q.ch {
			if it.barrier != nil {
				close(it.barrier)
				continue
			}
			if q.failed() != nil {
				continue
			}
			if _, err := w.Write(it.data); err != nil {
				q.mu.Lock()
				q.err = err
				q.mu.Unlock()
			}
		}
	}()
	return q
}

func (q *writeQueue) failed() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.err
}

// push queues data; it blocks while the queue is full.
func (q *writeQueue) push(data []byte) {
	q.ch <- writeItem{data: data}
}

// drain waits until everything queued is written and returns the first
// write error.
func (q *writeQueue) drain() error {
	b := make(chan struct{})
	q.ch <- writeItem{barrier: b}
	<-b
	return q.failed()
}

// close stops the queue after what is queued; it is safe to call twice.
func (q *writeQueue) close() {
	q.closeOnce.Do(func() {
		close(q.ch)
		<-q.done
	})
}

var _ contentapi.ContentServer = (*pipelinedContent)(nil)
