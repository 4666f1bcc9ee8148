// Package content is coop's proxy content store: containerd's content API over
// a local store on disk, which records every commit and delete in the node's
// inventory, and the Diff (apply) service that unpacks layers straight from
// that store; and the claim store (claim.go), which answers containerd's Info
// for blobs that peers hold as found and serves their bytes as they arrive.
package content
