package peers

import (
	"github.com/coopnet/coop/content"
	digest "github.com/opencontainers/go-digest"
)

// ForwardedHeader marks a request made by a coop node to a peer. A peer server
// never forwards anything; a mirror receiving it answers 404 at once, so
// requests cannot loop between nodes.
const ForwardedHeader = "X-Coop-Forwarded"

// Paths of the coop API on the peer server.
const (
	InventoryPath = "/coop/v1/inventory"
	HavePath      = "/coop/v1/have"
	HealthPath    = "/healthz"
	MetricsPath   = "/metrics"
)

// MaxHaveDigests is the most digests one /coop/v1/have request may carry.
const MaxHaveDigests = 10000

// Candidate is a node that holds a blob and can serve it.
type Candidate struct {
	// Node is the node's name.
	Node string `json:"node"`
	// URL is the node's peer endpoint, such as http://198.18.0.2:5050.
	URL string `json:"url"`
	// Size is the blob's size as the node reports it.
	Size int64 `json:"size"`
}

// InventoryResponse is the body of GET /coop/v1/inventory.
type InventoryResponse struct {
	Node  string         `json:"node"`
	Epoch string         `json:"epoch"`
	Seq   uint64         `json:"seq"`
	Blobs []content.Blob `json:"blobs"`
}

// HaveRequest is the body of POST /coop/v1/have.
type HaveRequest struct {
	Digests []digest.Digest `json:"digests"`
}

// HaveResponse is the answer to a HaveRequest: the blobs held among those
// asked, with their sizes.
type HaveResponse struct {
	Node  string         `json:"node"`
	Epoch string         `json:"epoch"`
	Seq   uint64         `json:"seq"`
	Blobs []content.Blob `json:"blobs"`
}
