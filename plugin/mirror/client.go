package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errhttp"
	"github.com/coopnet/coop/peers"
	digest "github.com/opencontainers/go-digest"
)

// maxAPIAnswer bounds an answer of the mirror's API read by Client.
const maxAPIAnswer = 16 << 20

// Client calls a local mirror's own API (SourcesPath, DownloadsPath).
type Client struct {
	// URL is the mirror's base URL, e.g. http://127.0.0.1:5051. Required.
	URL string
	// HTTP makes the requests. Required.
	HTTP *http.Client
	// Token is the node's mirror API token (ReadToken), sent as
	// "Authorization: Bearer <Token>"; AddSource and DropSource need it.
	Token string
}

// AddSource makes req's node a candidate for its blobs and returns the ID
// that DropSource takes. Without the right Token the error is of class
// errdefs.ErrUnauthenticated; beyond MaxSources, errdefs.ErrResourceExhausted.
func (c *Client) AddSource(ctx context.Context, req SourceRequest) (string, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return "", err
	}
	var sr SourceResponse
	if err := c.do(ctx, http.MethodPost, SourcesPath, nil, bytes.NewReader(b), &sr); err != nil {
		return "", fmt.Errorf("add source: %w", err)
	}
	if sr.ID == "" {
		return "", fmt.Errorf("add source: the mirror answered no id: %w", errdefs.ErrDataLoss)
	}
	return sr.ID, nil
}

// DropSource removes a source AddSource added.
func (c *Client) DropSource(ctx context.Context, id string) error {
	if err := c.do(ctx, http.MethodDelete, SourcesPath+"/"+url.PathEscape(id), nil, nil, nil); err != nil {
		return fmt.Errorf("drop source %s: %w", id, err)
	}
	return nil
}

// Downloads returns what the mirror downloaded of dgsts (everything it
// remembers when dgsts is empty).
func (c *Client) Downloads(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest]Download, error) {
	q := url.Values{}
	for _, d := range dgsts {
		q.Add("digest", d.String())
	}
	var dls []Download
	if err := c.do(ctx, http.MethodGet, DownloadsPath, q, nil, &dls); err != nil {
		return nil, fmt.Errorf("downloads: %w", err)
	}
	out := make(map[digest.Digest]Download, len(dls))
	for _, d := range dls {
		out[d.Digest] = d
	}
	return out, nil
}

func (c *Client) do(ctx context.Context, method, path string, query url.Values, body io.Reader, out any) error {
	u, err := peers.JoinURL(c.URL, path)
	if err != nil {
		return fmt.Errorf("local coop node: %w", err)
	}
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("local coop node at %s: %v: %w", c.URL, err, errdefs.ErrUnavailable)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("local coop node at %s: %s: %s: %w", c.URL, resp.Status, errorMessage(resp.Body), errhttp.ToNative(resp.StatusCode))
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxAPIAnswer)).Decode(out); err != nil {
		return fmt.Errorf("local coop node at %s: %v: %w", c.URL, err, errdefs.ErrDataLoss)
	}
	return nil
}

// errorMessage returns the messages of an OCI error body, or the start of
// any other body.
func errorMessage(body io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(body, 4096))
	var er peers.ErrorResponse
	if json.Unmarshal(b, &er) == nil && len(er.Errors) > 0 {
		var msgs []string
		for _, e := range er.Errors {
			msgs = append(msgs, e.Message)
		}
		return strings.Join(msgs, "; ")
	}
	return string(bytes.TrimSpace(b[:min(len(b), 1024)]))
}
