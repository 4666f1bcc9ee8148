// Package peers is everything coop says to other nodes over HTTP: the peer
// server (read-only OCI blobs and manifests with Range, and the coop API), the
// client that asks peers what they hold and fetches from them, the
// multi-source downloader with its per-peer estimates, and the types and
// parsers (distribution paths, base URLs, Range) both sides share. The
// downloader only moves bytes; whoever writes them (the content store on
// commit, a claim) checks the digest.
package peers
