package resolver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	digest "github.com/opencontainers/go-digest"
)

// The broker's layout: each node publishes its inventory changes and its
// periodic full inventory on SubjectPrefix+token(node); the latest full
// inventory of each node is retained under key token(node) of the
// key-value bucket Bucket.
const (
	SubjectPrefix = "coop.inv."
	Bucket        = "coop-inventory"
	// MaxEventSize bounds an event a receiver accepts.
	MaxEventSize = 8 << 20
)

// Event is one message of a node's inventory stream: a change (Added,
// Removed, taking the node to Seq from Seq-1), or a full inventory (Full:
// Blobs, or External when it did not fit in a message and must be read from
// the node).
type Event struct {
	Node     string          `json:"node"`
	URL      string          `json:"url"`
	Epoch    string          `json:"epoch"`
	Seq      uint64          `json:"seq"`
	Time     time.Time       `json:"time"`
	Load     *peers.Load     `json:"load,omitempty"`
	Full     bool            `json:"full,omitempty"`
	External bool            `json:"external,omitempty"`
	Blobs    []content.Blob  `json:"blobs,omitempty"`
	Added    []content.Blob  `json:"added,omitempty"`
	Removed  []digest.Digest `json:"removed,omitempty"`
	// Partials says Partial is the node's whole list of the blobs it is
	// downloading now (a swarm): in full events, and alone in events of
	// their own, sent as downloads start and end.
	Partials bool           `json:"partials,omitempty"`
	Partial  []content.Blob `json:"partial,omitempty"`
}

// Token turns a node name into a NATS subject token and key-value key:
// letters, digits, '-' and '_' stay; any other byte becomes =XX.
func Token(name string) string {
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "=%02X", c)
	}
	return b.String()
}

// Subject is the subject node publishes on.
func Subject(node string) string { return SubjectPrefix + Token(node) }

// ConnectBroker connects to NATS at url as name and keeps reconnecting for
// ever, so a broker that is down at start or goes away is picked up when it
// is back. Its inboxes (request replies) are _INBOX.<Token(name)>.…, the
// only ones a broker with per-node permissions lets name subscribe to. The
// connection logs, through ctx's logger, each loss with its cause, each
// return and each refusal of the broker; closing it logs nothing. extra options (a dialer, say) apply
// after coop's.
//
// The connection and its handlers belong to the caller. Those who share it
// (a Publisher, a Subscriber) learn of its state through nc.StatusChanged
// and never replace its handlers.
func ConnectBroker(ctx context.Context, url, name string, extra ...nats.Option) (*nats.Conn, error) {
	logger := log.G(ctx)
	opts := []nats.Option{
		nats.Name("coop " + name),
		nats.RetryOnFailedConnect(true),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.Timeout(2 * time.Second),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			switch {
			case nc.IsClosed():
				// Closed by its owner: nothing was lost.
			case err == nil:
				logger.Debug("broker connection reset; reconnecting")
			default:
				logger.WithError(err).Warn("broker connection lost; reconnecting")
			}
		}),
		nats.ReconnectHandler(func(*nats.Conn) { logger.Info("broker connection back") }),
		// What the broker refuses (a permissions violation, a slow
		// consumer) says so, rather than a request timing out unexplained.
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			logger.WithError(err).Warn("broker refused")
		}),
	}
	if name != "" {
		opts = append(opts, nats.CustomInboxPrefix("_INBOX."+Token(name)))
	}
	return nats.Connect(url, append(opts, extra...)...)
}

// InventoryBucket opens the retained-inventory bucket, creating it if
// missing (in memory: the index is soft state).
func InventoryBucket(ctx context.Context, nc *nats.Conn) (jetstream.KeyValue, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	kv, err := js.KeyValue(ctx, Bucket)
	if err == nil {
		return kv, nil
	}
	if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("broker bucket %s: %w", Bucket, err)
	}
	kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: Bucket, History: 1, Storage: jetstream.MemoryStorage, TTL: 24 * time.Hour})
	if errors.Is(err, jetstream.ErrBucketExists) {
		return js.KeyValue(ctx, Bucket)
	}
	if err != nil {
		return nil, fmt.Errorf("broker bucket %s: %w", Bucket, err)
	}
	return kv, nil
}
