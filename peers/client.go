package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/errdefs"
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

// Client talks to peer servers. Every request carries ForwardedHeader.
type Client struct {
	// HTTP is the client used for every request; it should have no overall
	// timeout (blobs are long), and bound connection setup and headers instead.
	HTTP *http.Client
	// Node is this node's name, sent as ForwardedHeader's value.
	Node string
}

// maxHaveResponse bounds the body of a have answer.
const maxHaveResponse = 8 << 20

// Have asks the peer at baseURL which of dgsts it holds.
func (c *Client) Have(ctx context.Context, baseURL string, dgsts []digest.Digest) (*HaveResponse, error) {
	body, err := json.Marshal(HaveRequest{Digests: dgsts})
	if err != nil {
		return nil, err
	}
	u, err := JoinURL(baseURL, HavePath)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w", baseURL, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrInvalidArgument, err)
	}
	req.Header.Set("Content-Type", "application/json")
	c.mark(req)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrUnavailable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("peer %s: have: %s: %w", baseURL, resp.Status, errdefs.ErrUnavailable)
	}
	var hr HaveResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxHaveResponse)).Decode(&hr); err != nil {
		return nil, fmt.Errorf("peer %s: have: bad answer: %v: %w", baseURL, err, errdefs.ErrDataLoss)
	}
	return &hr, nil
}

// Fetch opens dgst at the peer at baseURL from offset (0 for the whole blob).
// size is the blob's expected size; the peer must serve exactly the bytes
// from offset to size. The caller closes the body and verifies the digest.
func (c *Client) Fetch(ctx context.Context, baseURL string, dgst digest.Digest, offset, size int64) (io.ReadCloser, error) {
	return c.FetchRange(ctx, baseURL, dgst, offset, size-offset, size)
}

// BusyError is a peer's 429: it serves as many uploads as it allows.
type BusyError struct {
	Peer       string
	RetryAfter time.Duration
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("peer %s is busy (retry after %v)", e.Peer, e.RetryAfter)
}

// Unwrap classes a busy peer as unavailable.
func (e *BusyError) Unwrap() error { return errdefs.ErrUnavailable }

// FetchRange opens length bytes of dgst at offset. size is the blob's
// expected size. The peer must answer exactly that range (200 for the whole
// blob, 206 with the matching Content-Range otherwise); a 429 is a
// *BusyError.
func (c *Client) FetchRange(ctx context.Context, baseURL string, dgst digest.Digest, offset, length, size int64) (io.ReadCloser, error) {
	if offset < 0 || length <= 0 || offset+length > size {
		return nil, fmt.Errorf("range %d+%d of a %d-byte blob: %w", offset, length, size, errdefs.ErrInvalidArgument)
	}
	if err := dgst.Validate(); err != nil {
		return nil, fmt.Errorf("digest %q: %v: %w", dgst, err, errdefs.ErrInvalidArgument)
	}
	u, err := JoinURL(baseURL, "/v2/coop/blobs", dgst.String())
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w", baseURL, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrInvalidArgument, err)
	}
	whole := offset == 0 && length == size
	if !whole {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", offset, offset+length-1))
	}
	c.mark(req)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrUnavailable, err)
	}
	want := http.StatusOK
	if !whole {
		want = http.StatusPartialContent
	}
	if resp.StatusCode != want {
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusNotFound:
			return nil, fmt.Errorf("peer %s: blob %s: %w", baseURL, dgst, errdefs.ErrNotFound)
		case http.StatusTooManyRequests:
			secs, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
			return nil, &BusyError{Peer: baseURL, RetryAfter: time.Duration(secs) * time.Second}
		case http.StatusServiceUnavailable:
			if resp.Header.Get(NotYetHeader) != "" {
				return nil, &NotYetError{Peer: baseURL}
			}
		}
		return nil, fmt.Errorf("peer %s: blob %s: %s: %w", baseURL, dgst, resp.Status, errdefs.ErrUnavailable)
	}
	if !whole {
		// A 206 for another range would splice wrong bytes in.
		want := fmt.Sprintf("bytes %d-%d/%d", offset, offset+length-1, size)
		if cr := resp.Header.Get("Content-Range"); cr != want {
			resp.Body.Close()
			return nil, fmt.Errorf("peer %s: blob %s: Content-Range %q, want %q: %w", baseURL, dgst, cr, want, errdefs.ErrDataLoss)
		}
	}
	if resp.ContentLength >= 0 && resp.ContentLength != length {
		resp.Body.Close()
		return nil, fmt.Errorf("peer %s: blob %s: length %d, want %d: %w", baseURL, dgst, resp.ContentLength, length, errdefs.ErrDataLoss)
	}
	return resp.Body, nil
}

func (c *Client) mark(req *http.Request) {
	node := c.Node
	if node == "" {
		node = "1"
	}
	req.Header.Set(ForwardedHeader, node)
}

// MaxManifestSize bounds a manifest fetched from a peer.
const MaxManifestSize = content.MaxManifestSize

// FetchManifest reads the manifest dgst from the peer at baseURL, verifies it
// against dgst and returns it with its media type.
func (c *Client) FetchManifest(ctx context.Context, baseURL string, dgst digest.Digest) ([]byte, string, error) {
	if err := dgst.Validate(); err != nil {
		return nil, "", fmt.Errorf("digest %q: %v: %w", dgst, err, errdefs.ErrInvalidArgument)
	}
	u, err := JoinURL(baseURL, "/v2/coop/manifests", dgst.String())
	if err != nil {
		return nil, "", fmt.Errorf("peer %s: %w", baseURL, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, "", fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrInvalidArgument, err)
	}
	c.mark(req)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, "", fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrUnavailable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode == http.StatusNotFound {
			return nil, "", fmt.Errorf("peer %s: manifest %s: %w", baseURL, dgst, errdefs.ErrNotFound)
		}
		return nil, "", fmt.Errorf("peer %s: manifest %s: %s: %w", baseURL, dgst, resp.Status, errdefs.ErrUnavailable)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxManifestSize+1))
	if err != nil {
		return nil, "", fmt.Errorf("peer %s: manifest %s: %v: %w", baseURL, dgst, err, errdefs.ErrUnavailable)
	}
	if len(b) > MaxManifestSize {
		return nil, "", fmt.Errorf("peer %s: manifest %s larger than %d bytes: %w", baseURL, dgst, MaxManifestSize, errdefs.ErrDataLoss)
	}
	if got := dgst.Algorithm().FromBytes(b); got != dgst {
		return nil, "", fmt.Errorf("peer %s: manifest %s hashes to %s: %w", baseURL, dgst, got, errdefs.ErrDataLoss)
	}
	mt := resp.Header.Get("Content-Type")
	if mt == "" {
		return nil, "", fmt.Errorf("peer %s: manifest %s has no media type: %w", baseURL, dgst, errdefs.ErrDataLoss)
	}
	return b, mt, nil
}

// MaxInventoryResponse bounds an inventory answer: about 200,000 blobs.
const MaxInventoryResponse = 32 << 20

// Inventory reads the peer's inventory. With a non-empty epoch it asks only
// for the changes after seq; the answer says whether it is Full. A full
// answer is checked for valid digests and sizes.
func (c *Client) Inventory(ctx context.Context, baseURL, epoch string, seq uint64) (*InventoryResponse, error) {
	u, err := JoinURL(baseURL, InventoryPath)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w", baseURL, err)
	}
	if epoch != "" {
		u += "?" + SinceQuery + "=" + url.QueryEscape(FormatSince(epoch, seq))
	}
	resp, err := c.get(ctx, baseURL, u)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("peer %s: inventory: %s: %w", baseURL, resp.Status, errdefs.ErrUnavailable)
	}
	var ir InventoryResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, MaxInventoryResponse)).Decode(&ir); err != nil {
		return nil, fmt.Errorf("peer %s: inventory: bad answer: %v: %w", baseURL, err, errdefs.ErrDataLoss)
	}
	if err := ir.Validate(); err != nil {
		return nil, fmt.Errorf("peer %s: inventory: %w", baseURL, err)
	}
	return &ir, nil
}

// get sends a marked GET of u to the peer at baseURL; the caller closes
// the body.
func (c *Client) get(ctx context.Context, baseURL, u string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrInvalidArgument, err)
	}
	c.mark(req)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w: %v", baseURL, errdefs.ErrUnavailable, err)
	}
	return resp, nil
}

// maxPartialResponse bounds a PartialStatus answer: two bitmaps of
// MaxPartialChunks bits in base64, and the rest.
const maxPartialResponse = 64 << 10

// PartialStatus asks the peer which chunks of dgst (of size bytes) it has:
// a blob it is still downloading, or Whole. A peer with neither answers
// ErrNotFound.
func (c *Client) PartialStatus(ctx context.Context, baseURL string, dgst digest.Digest, size int64) (*PartialStatus, error) {
	if err := dgst.Validate(); err != nil {
		return nil, fmt.Errorf("digest %q: %v: %w", dgst, err, errdefs.ErrInvalidArgument)
	}
	u, err := JoinURL(baseURL, PartialPath, dgst.String())
	if err != nil {
		return nil, fmt.Errorf("peer %s: %w", baseURL, err)
	}
	resp, err := c.get(ctx, baseURL, u)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		return nil, fmt.Errorf("peer %s: partial %s: %w", baseURL, dgst, errdefs.ErrNotFound)
	default:
		return nil, fmt.Errorf("peer %s: partial %s: %s: %w", baseURL, dgst, resp.Status, errdefs.ErrUnavailable)
	}
	var st PartialStatus
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxPartialResponse)).Decode(&st); err != nil {
		return nil, fmt.Errorf("peer %s: partial %s: bad answer: %v: %w", baseURL, dgst, err, errdefs.ErrDataLoss)
	}
	if err := st.Validate(dgst, size); err != nil {
		return nil, fmt.Errorf("peer %s: %w", baseURL, err)
	}
	return &st, nil
}

// Container reads the record of container id in namespace ns at the peer.
func (c *Client) Container(ctx context.Context, baseURL, ns, id string) (*ContainerRecord, error) {
	u, err := containerURL(baseURL, ns, id)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("source %s: %w: %v", baseURL, errdefs.ErrInvalidArgument, err)
	}
	c.mark(req)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("source %s unreachable: %v: %w", baseURL, err, errdefs.ErrUnavailable)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return nil, fmt.Errorf("source %s: container %s/%s: %s: %w", baseURL, ns, id, bytes.TrimSpace(b), errdefs.ErrNotFound)
	default:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return nil, fmt.Errorf("source %s: container %s/%s: %s: %s: %w", baseURL, ns, id, resp.Status, bytes.TrimSpace(b), errdefs.ErrUnavailable)
	}
	var rec ContainerRecord
	if err := json.NewDecoder(io.LimitReader(resp.Body, MaxManifestSize)).Decode(&rec); err != nil {
		return nil, fmt.Errorf("source %s: bad container record: %v: %w", baseURL, err, errdefs.ErrDataLoss)
	}
	if rec.Image == "" || rec.Target.Digest.Validate() != nil || len(rec.Spec) == 0 {
		return nil, fmt.Errorf("source %s: container record without image, target or spec: %w", baseURL, errdefs.ErrDataLoss)
	}
	return &rec, nil
}

// StopContainer asks the peer to stop container id's task.
func (c *Client) StopContainer(ctx context.Context, baseURL, ns, id string) error {
	u, err := containerURL(baseURL, ns, id, "stop")
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
	if err != nil {
		return fmt.Errorf("source %s: %w: %v", baseURL, errdefs.ErrInvalidArgument, err)
	}
	c.mark(req)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("source %s unreachable: %v: %w", baseURL, err, errdefs.ErrUnavailable)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return fmt.Errorf("source %s: stop %s/%s: %s: %s", baseURL, ns, id, resp.Status, bytes.TrimSpace(b))
	}
	return nil
}

// containerURL is the URL of container ns/id's record at the peer at
// baseURL, with more path elements after it. ns and id must be containerd
// identifiers.
func containerURL(baseURL, ns, id string, more ...string) (string, error) {
	for _, name := range []string{ns, id} {
		if err := identifiers.Validate(name); err != nil {
			return "", fmt.Errorf("container %s/%s: %w", ns, id, err)
		}
	}
	u, err := JoinURL(baseURL, append([]string{ContainersPath, ns, id}, more...)...)
	if err != nil {
		return "", fmt.Errorf("peer %s: %w", baseURL, err)
	}
	return u, nil
}
