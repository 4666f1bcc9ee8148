package clusterkb

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/resolver"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// BrokerOptions configure an embedded NATS broker.
type BrokerOptions struct {
	// Listen is host:port for NATS clients. Required.
	Listen string
	// StoreDir holds JetStream state (the retained inventories live in
	// memory; JetStream still wants a directory). Required.
	StoreDir string
	// MaxPayload bounds one message. Default 8 MiB, so full inventories of
	// about 80,000 blobs fit in one message.
	MaxPayload int32
	// TLS, when set, makes the broker speak TLS and refuse clients without
	// a certificate of the cluster CA (trust.Credentials.BrokerConfig).
	// Each client is then known by the coop name in its certificate and
	// may do only what that name may (NodePermissions, KBPermissions).
	TLS *tls.Config
	// KB is the name in ClusterKB's certificate: that client may create
	// the inventory bucket and read all of it; every other name is a node.
	// Required with TLS.
	KB string
}

// StartBroker starts an embedded NATS server with JetStream, creates the
// inventory bucket (so that it exists whoever connects first, nodes being
// allowed to write it but not to create it) and waits until it accepts
// clients. Shutdown stops it.
func StartBroker(opts BrokerOptions) (*server.Server, error) {
	host, port, err := net.SplitHostPort(opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("broker listen %q: %v: %w", opts.Listen, err, errdefs.ErrInvalidArgument)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return nil, fmt.Errorf("broker listen %q: bad port: %w", opts.Listen, errdefs.ErrInvalidArgument)
	}
	if p == 0 {
		p = server.RANDOM_PORT // NATS reads 0 as its default port, 4222
	}
	if opts.StoreDir == "" {
		return nil, fmt.Errorf("broker needs a store directory: %w", errdefs.ErrInvalidArgument)
	}
	if opts.TLS != nil && opts.KB == "" {
		return nil, fmt.Errorf("a broker with TLS needs ClusterKB's name: %w", errdefs.ErrInvalidArgument)
	}
	if opts.MaxPayload == 0 {
		opts.MaxPayload = 8 << 20
	}
	sopts := &server.Options{
		ServerName:         "coop-kb",
		Host:               host,
		Port:               p,
		NoSigs:             true,
		NoLog:              true,
		MaxPayload:         opts.MaxPayload,
		JetStream:          true,
		StoreDir:           opts.StoreDir,
		JetStreamMaxMemory: 1 << 30,
	}
	var local []byte // the in-process client's token: it creates the bucket
	if opts.TLS != nil {
		sopts.TLS, sopts.TLSVerify, sopts.TLSConfig = true, true, opts.TLS
		sopts.TLSTimeout = 2
		local = []byte(rand.Text())
		sopts.CustomClientAuthentication = certAuth{kb: opts.KB, local: local}
	}
	ns, err := server.NewServer(sopts)
	if err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, fmt.Errorf("broker on %s did not start: %w", opts.Listen, errdefs.ErrUnavailable)
	}
	if err := createBucket(ns, string(local)); err != nil {
		ns.Shutdown()
		return nil, fmt.Errorf("broker on %s: %w", opts.Listen, err)
	}
	return ns, nil
}

// createBucket creates the inventory bucket through an in-process
// connection presenting token.
func createBucket(ns *server.Server, token string) error {
	nc, err := nats.Connect("", nats.InProcessServer(ns), nats.Token(token), nats.Name("coop broker"))
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = resolver.InventoryBucket(ctx, nc)
	return err
}
