package resolver

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// followClaimed follows every node at the URL it claims, when that is a base
// URL: ClusterKB's membership for nodes it does not know.
type followClaimed struct{}

func (followClaimed) Follow(_, claimed string) (string, bool) {
	u, err := peers.ParseBaseURL(claimed)
	return u, err == nil && u == claimed
}

func (followClaimed) Followed() ([]Neighbor, bool) { return nil, true }

// downReader fails every inventory read: a repair changes nothing.
type downReader struct{}

func (downReader) Inventory(context.Context, string, string, uint64) (*peers.InventoryResponse, error) {
	return nil, errdefs.ErrUnavailable
}

// FuzzSubscriberApply checks how a subscriber takes a broker message (an
// event on a node's subject, or a retained value when token is empty)
// whatever its bytes: it never panics; only the node the message is about
// may change, and only on its own subject and when followed; and the index
// then holds only valid digests, sizes and epochs, at the URL the membership
// gave. Seeds: testdata/fuzz/FuzzSubscriberApply.
func FuzzSubscriberApply(f *testing.F) {
	held := digest.FromString("held")
	f.Fuzz(func(t *testing.T, token string, data []byte, anyNode bool) {
		x := NewIndex()
		if err := x.Full("n1", "http://n1", "e", 1, []content.Blob{{Digest: held, Size: 4}}, time.Now()); err != nil {
			t.Fatal(err)
		}
		var members Membership = Neighborhood{Source: Static{{Name: "n1", URL: "http://n1"}, {Name: "n2", URL: "http://n2"}}}
		if anyNode {
			members = followClaimed{}
		}
		s := &Subscriber{opts: SubscriberOptions{Index: x, Members: members, Reader: downReader{}, Period: time.Minute}, repairing: map[string]bool{}}
		before := statusByName(x)
		s.apply(context.Background(), token, data, "event")
		s.stop()
		after := statusByName(x)

		var ev Event
		decoded := len(data) <= MaxEventSize && json.Unmarshal(data, &ev) == nil
		mayChange := decoded && ev.Node != "" && (token == "" || Token(ev.Node) == token)
		for name, st := range after {
			old, ok := before[name]
			if !mayChange || name != ev.Node {
				if !ok || old != st {
					t.Fatalf("token %q, %q: node %s went from %+v to %+v", token, data, name, old, st)
				}
				continue
			}
			if ok && old == st {
				continue
			}
			url, followed := members.Follow(ev.Node, ev.URL)
			if !followed || st.URL != url || st.Epoch == "" || len(st.Epoch) > 64 {
				t.Fatalf("token %q, %q: node %s is now %+v (followed %v at %q)", token, data, name, st, followed, url)
			}
		}
		if len(after) < len(before) {
			t.Fatalf("token %q, %q: nodes %v became %v", token, data, before, after)
		}
		if !decoded {
			return
		}
		var dgsts []digest.Digest
		for _, b := range slices.Concat(ev.Blobs, ev.Added) {
			dgsts = append(dgsts, b.Digest)
		}
		for d, cs := range x.Locate(append(dgsts, ev.Removed...), LocateOptions{}) {
			if d.Validate() != nil {
				t.Fatalf("token %q, %q: the index holds digest %q", token, data, d)
			}
			for _, c := range cs {
				if c.Size < 0 {
					t.Fatalf("token %q, %q: %s holds %s of size %d", token, data, c.Node, d, c.Size)
				}
			}
		}
	})
}

// statusByName returns what x knows of each node, but when it was last seen.
func statusByName(x *Index) map[string]NodeStatus {
	out := map[string]NodeStatus{}
	for _, st := range x.Nodes() {
		st.LastSeen = time.Time{}
		out[st.Name] = st
	}
	return out
}
