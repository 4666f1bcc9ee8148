// Package peers is everything coop says to other nodes over HTTP: the peer
// server (read-only OCI blobs and manifests with Range, and the coop API), the
// client that asks peers what they hold and fetches from them, and the types
// both sides share.
package peers
