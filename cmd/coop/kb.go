package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/peers/trust"
	"github.com/coopnet/coop/plugin/node"
	"github.com/coopnet/coop/resolver"
	"github.com/coopnet/coop/resolver/clusterkb"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sync/errgroup"
)

func runKB(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("kb", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", ":5060", "ClusterKB API address")
	feed := fs.String("feed", clusterkb.FeedPush, "how the index is fed: pull (poll every node each period) or push (the nodes' events through the broker)")
	periodS := fs.Duration("period", 10*time.Second, "poll period (pull); the nodes' heartbeat and full-update period")
	ttl := fs.Duration("ttl", 0, "drop a registered node silent this long (default 3 periods)")
	nodesS := fs.String("nodes", "", "static members, NAME=URL,NAME=URL (besides the nodes that register)")
	natsListen := fs.String("nats-listen", ":4222", "address of the embedded NATS broker (ignored with --nats-url)")
	natsURL := fs.String("nats-url", "", "use this NATS cluster instead of the embedded broker")
	root := fs.String("root", filepath.Join(os.TempDir(), "coop-kb"), "directory for the embedded broker's state")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	tlsDir := fs.String("tls-dir", "", "ClusterKB's credentials (ca.crt, tls.crt, tls.key from coop ca issue): mutual TLS on its API, its broker and towards the nodes; re-read when rotated")
	insecure := fs.Bool("insecure", false, "without --tls-dir, serve plain HTTP and NATS on non-loopback addresses (anyone who reaches them can register, publish and read every inventory)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q: %w", fs.Args(), errUsage)
	}
	if err := setLogLevel(*logLevel); err != nil {
		return err
	}
	if *periodS <= 0 || *ttl < 0 {
		return fmt.Errorf("--period and --ttl must be positive: %w", errUsage)
	}
	static, err := resolver.ParseNeighbors(*nodesS)
	if err != nil {
		return fmt.Errorf("--nodes: %w", err)
	}
	if *feed != clusterkb.FeedPull && *feed != clusterkb.FeedPush {
		return fmt.Errorf("--feed %q: want pull or push: %w", *feed, errUsage)
	}
	var creds *trust.Credentials
	if *tlsDir != "" {
		if creds, err = trust.Load(*tlsDir); err != nil {
			return fmt.Errorf("--tls-dir: %w", err)
		}
	} else if !*insecure {
		for _, l := range []struct{ flag, addr string }{{"--listen", *listen}, {"--nats-listen", *natsListen}} {
			if l.flag == "--nats-listen" && (*natsURL != "" || *feed != clusterkb.FeedPush) {
				continue
			}
			if !node.Loopback(l.addr) {
				return fmt.Errorf("%s %q is reachable from the network and would take registrations and inventories from anyone: give --tls-dir (see coop ca) or --insecure: %w", l.flag, l.addr, errUsage)
			}
		}
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("kb", *listen))

	brokerURL := *natsURL
	if brokerURL == "" && *feed == clusterkb.FeedPush {
		if err := os.MkdirAll(*root, 0o700); err != nil {
			return fmt.Errorf("--root: %w", err)
		}
		bo := clusterkb.BrokerOptions{Listen: *natsListen, StoreDir: *root}
		if creds != nil {
			bo.TLS, bo.KB = creds.BrokerConfig(), creds.Name()
		}
		ns, err := clusterkb.StartBroker(bo)
		if err != nil {
			return fmt.Errorf("--nats-listen: %w", err)
		}
		defer ns.Shutdown()
		brokerURL = ns.ClientURL()
		log.G(ctx).WithField("broker", ns.Addr().String()).Info("embedded NATS broker ready")
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var clientTLS *tls.Config
	var natsOpts []nats.Option
	if creds != nil {
		clientTLS = creds.ClientConfig()
		natsOpts = append(natsOpts, nats.Secure(clientTLS))
	}
	// ClusterKB's name: its certificate's (the broker's permissions and the
	// nodes' logs go by it), else coop-kb.
	name := "coop-kb"
	if creds != nil {
		name = creds.Name()
	}
	client := &peers.Client{Node: name, HTTP: &http.Client{Transport: &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
		ResponseHeaderTimeout: 5 * time.Second,
		MaxIdleConnsPerHost:   2,
		TLSClientConfig:       clientTLS,
	}}}
	opts := clusterkb.Options{Feed: *feed, Period: *periodS, TTL: *ttl, Static: static, Reader: client, Registerer: reg, Gatherer: reg,
		Authenticated: creds != nil}
	if *feed == clusterkb.FeedPush {
		nc, err := resolver.ConnectBroker(ctx, brokerURL, name, natsOpts...)
		if err != nil {
			return fmt.Errorf("broker %s: %w", brokerURL, err)
		}
		defer nc.Close()
		opts.Conn = nc
	}
	kb, err := clusterkb.New(opts)
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	var handler http.Handler = kb
	if creds != nil {
		l = tls.NewListener(l, creds.ServerConfig())
		handler = peers.Authenticated(kb, peers.OpenPaths...)
	}
	srv := peers.NewHTTPServer(handler, peers.HTTPServerOptions{})
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return kb.Run(gctx) })
	g.Go(func() error { return peers.Serve(gctx, srv, l) })
	log.G(ctx).WithFields(log.Fields{"listen": l.Addr().String(), "feed": *feed, "period": *periodS, "static": len(static)}).Info("coop kb ready")
	err = g.Wait()
	if errors.Is(err, context.Canceled) || (err == nil && ctx.Err() != nil) {
		log.G(ctx).Info("coop kb stopped")
		return nil
	}
	return err
}
