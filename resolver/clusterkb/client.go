package clusterkb

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/coopnet/coop/peers"
	"github.com/coopnet/coop/resolver"
	"github.com/hashicorp/go-retryablehttp"
	digest "github.com/opencontainers/go-digest"
)

// ClientOptions configure a Client.
type ClientOptions struct {
	// URLs of ClusterKB replicas, tried in order. Required.
	URLs []string
	// Node is the asking node's name, sent with every locate.
	Node string
	// Timeout bounds one request to one replica. Default 500ms.
	Timeout time.Duration
	// Retries per replica before the next is tried. Default 1.
	Retries int
	// TLS, when set, is the client side of mutual TLS with ClusterKB
	// (trust.Credentials.ClientConfig).
	TLS *tls.Config
}

// Client asks ClusterKB. It is the resolver of the kb mode: one batched
// locate question per Locate, failing over between replicas.
type Client struct {
	urls []string
	node string
	http *retryablehttp.Client
}

var _ resolver.Resolver = (*Client)(nil)

// NewClient returns a Client.
func NewClient(opts ClientOptions) (*Client, error) {
	if len(opts.URLs) == 0 {
		return nil, fmt.Errorf("clusterkb client needs at least one URL: %w", errdefs.ErrInvalidArgument)
	}
	urls := make([]string, len(opts.URLs))
	for i, u := range opts.URLs {
		b, err := peers.ParseBaseURL(u)
		if err != nil {
			return nil, fmt.Errorf("clusterkb: %w", err)
		}
		urls[i] = b
	}
	if opts.Timeout == 0 {
		opts.Timeout = 500 * time.Millisecond
	}
	if opts.Retries == 0 {
		opts.Retries = 1
	}
	if opts.Timeout < 0 || opts.Retries < 0 {
		return nil, fmt.Errorf("clusterkb client timeout and retries must be positive: %w", errdefs.ErrInvalidArgument)
	}
	rc := retryablehttp.NewClient()
	rc.Logger = nil
	rc.RetryMax = opts.Retries
	rc.RetryWaitMin = 20 * time.Millisecond
	rc.RetryWaitMax = 100 * time.Millisecond
	rc.HTTPClient = &http.Client{Timeout: opts.Timeout, Transport: &http.Transport{
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     90 * time.Second,
		TLSClientConfig:     opts.TLS,
	}}
	// Give the caller the last error, so it can tell why every replica failed.
	rc.ErrorHandler = retryablehttp.PassthroughErrorHandler
	return &Client{urls: urls, node: opts.Node, http: rc}, nil
}

// ParseURLs splits "URL[,URL]".
func ParseURLs(s string) []string {
	var out []string
	for _, u := range strings.Split(s, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

// Locate asks the first replica that answers.
func (c *Client) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest][]peers.Candidate, error) {
	if err := resolver.ValidateDigests(dgsts); err != nil {
		return nil, err
	}
	if len(dgsts) == 0 {
		return map[digest.Digest][]peers.Candidate{}, nil
	}
	var resp resolver.LocateResponse
	if err := c.do(ctx, http.MethodPost, resolver.LocatePath, resolver.LocateRequest{Node: c.node, Digests: dgsts}, &resp); err != nil {
		return nil, err
	}
	asked := make(map[digest.Digest]bool, len(dgsts))
	for _, d := range dgsts {
		asked[d] = true
	}
	out := make(map[digest.Digest][]peers.Candidate, len(resp.Candidates))
	for d, cs := range resp.Candidates {
		if !asked[d] {
			continue // garbage from the KB: never a candidate
		}
		for _, cand := range cs {
			u, err := peers.ParseBaseURL(cand.URL)
			if cand.Node == "" || cand.Size < 0 || err != nil || cand.Node == c.node {
				continue
			}
			cand.URL = u
			out[d] = append(out[d], cand)
		}
	}
	return out, nil
}

// Register registers the node with every replica (each keeps its own
// members); it succeeds when one does.
func (c *Client) Register(ctx context.Context, req RegisterRequest) error {
	var errs []error
	ok := false
	for _, u := range c.urls {
		var resp RegisterResponse
		if err := c.call(ctx, u, http.MethodPost, NodesPath, req, &resp); err != nil {
			errs = append(errs, err)
			continue
		}
		ok = true
	}
	if ok {
		return nil
	}
	return errors.Join(errs...)
}

// Nodes lists the members, from the first replica that answers.
func (c *Client) Nodes(ctx context.Context) ([]NodeInfo, error) {
	var out []NodeInfo
	if err := c.do(ctx, http.MethodGet, NodesPath, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// do tries each replica in turn.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var errs []error
	for _, u := range c.urls {
		err := c.call(ctx, u, method, path, in, out)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		errs = append(errs, err)
	}
	return fmt.Errorf("every ClusterKB failed: %w: %w", errors.Join(errs...), errdefs.ErrUnavailable)
}

// maxResponse bounds a ClusterKB answer.
const maxResponse = 64 << 20

func (c *Client) call(ctx context.Context, base, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	u, err := peers.JoinURL(base, path)
	if err != nil {
		return fmt.Errorf("clusterkb %s: %w", base, err)
	}
	req, err := retryablehttp.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return fmt.Errorf("%s: %w", base, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s%s: %s: %s", base, path, resp.Status, bytes.TrimSpace(b))
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxResponse)).Decode(out); err != nil {
		return fmt.Errorf("%s%s: bad answer: %v: %w", base, path, err, errdefs.ErrDataLoss)
	}
	return nil
}

// Heartbeat registers req now and every period until ctx ends. When
// neighbors is not nil it is refreshed from the KB's members each period
// (every member but the node itself).
func Heartbeat(ctx context.Context, c *Client, req RegisterRequest, period time.Duration, neighbors *resolver.DynamicNeighbors) {
	beat := func() {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if err := c.Register(rctx, req); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("ClusterKB registration failed; retrying next period")
		}
		if neighbors == nil {
			return
		}
		ns, err := c.Nodes(rctx)
		if err != nil {
			if ctx.Err() == nil {
				log.G(ctx).WithError(err).Warn("neighbours from ClusterKB unavailable; keeping the last list")
			}
			return
		}
		var list []resolver.Neighbor
		for _, n := range ns {
			if u, err := peers.ParseBaseURL(n.URL); err == nil && n.Name != req.Name {
				list = append(list, resolver.Neighbor{Name: n.Name, URL: u})
			}
		}
		neighbors.Set(list)
	}
	beat()
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			beat()
		}
	}
}
