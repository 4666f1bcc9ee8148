package clusterkb

import (
	"crypto/subtle"

	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/resolver"
	"github.com/nats-io/nats-server/v2/server"
)

// What the broker's clients do, in NATS subjects. The retained inventories
// are the JetStream stream behind the key-value bucket resolver.Bucket; a
// put is a publish on $KV.<bucket>.<key> (acknowledged on the client's
// inbox), a get a direct get, a key listing an ordered consumer pushed to an
// inbox. Each client's inboxes are _INBOX.<token of its name>.…
// (resolver.ConnectBroker names them so).
const (
	jsAPI    = "$JS.API."
	kvStream = "KV_" + resolver.Bucket
	kvPrefix = "$KV." + resolver.Bucket + "."
)

// inbox is the prefix of the inboxes of the broker client named name.
func inbox(name string) string { return "_INBOX." + resolver.Token(name) }

// NodePermissions are what a node may do on the broker: publish its events
// on its own subject (resolver.Subject(name)) and write its own key of the
// bucket; read the bucket (its stream's info, a key's value); follow any
// node's subject; get replies on its own inboxes. Everything else is denied:
// another node's subject or key, creating, changing or deleting the stream,
// consumers, and publishing to any inbox (a forged reply).
func NodePermissions(name string) *server.Permissions {
	return &server.Permissions{
		Publish: &server.SubjectPermission{Allow: []string{
			resolver.Subject(name),
			kvPrefix + resolver.Token(name),
			jsAPI + "STREAM.INFO." + kvStream,
			jsAPI + "DIRECT.GET." + kvStream + ".>",
			jsAPI + "STREAM.MSG.GET." + kvStream, // a bucket without direct gets
		}},
		Subscribe: &server.SubjectPermission{Allow: []string{
			resolver.SubjectPrefix + ">",
			inbox(name) + ".>",
		}},
	}
}

// KBPermissions are ClusterKB's: create the bucket and read all of it
// (values and the list of keys, which takes an ordered consumer with flow
// control), follow every node's subject, get replies on its own inboxes. It
// publishes no inventory and writes no key.
func KBPermissions(name string) *server.Permissions {
	return &server.Permissions{
		Publish: &server.SubjectPermission{Allow: []string{
			jsAPI + "INFO", // asked before creating a bucket
			jsAPI + "STREAM.CREATE." + kvStream,
			jsAPI + "STREAM.INFO." + kvStream,
			jsAPI + "DIRECT.GET." + kvStream + ".>",
			jsAPI + "STREAM.MSG.GET." + kvStream,
			jsAPI + "CONSUMER.CREATE." + kvStream,
			jsAPI + "CONSUMER.CREATE." + kvStream + ".>",
			jsAPI + "CONSUMER.INFO." + kvStream + ".>",
			jsAPI + "CONSUMER.DELETE." + kvStream + ".>",
			"$JS.FC." + kvStream + ".>",
		}},
		Subscribe: &server.SubjectPermission{Allow: []string{
			resolver.SubjectPrefix + ">",
			inbox(name) + ".>",
		}},
	}
}

// certAuth admits a client by the coop name of its verified certificate and
// gives it that name's permissions: kb's are KBPermissions, every other
// name's NodePermissions. The broker's own in-process client (no TLS, over
// a pipe no remote client can open) is admitted with the local token.
type certAuth struct {
	kb    string
	local []byte
}

var _ server.Authentication = certAuth{}

func (a certAuth) Check(c server.ClientAuthentication) bool {
	cs := c.GetTLSConnectionState()
	if cs == nil {
		addr := c.RemoteAddress()
		opts := c.GetOpts()
		return addr != nil && addr.Network() == "pipe" && opts != nil && len(a.local) > 0 &&
			subtle.ConstantTimeCompare([]byte(opts.Token), a.local) == 1
	}
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return false
	}
	name := cs.VerifiedChains[0][0].Subject.CommonName
	if !trust.ValidName(name) {
		return false
	}
	perms := NodePermissions(name)
	if name == a.kb {
		perms = KBPermissions(name)
	}
	c.RegisterUser(&server.User{Username: name, Permissions: perms})
	return true
}
