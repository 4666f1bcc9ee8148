// Package content is coop's proxy content store: containerd's content API over
// a local store on disk, which records every commit and delete in the node's
// inventory, and the Diff (apply) service that unpacks layers straight from
// that store.
package content
