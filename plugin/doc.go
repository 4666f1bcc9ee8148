// Package plugin is coop's side of containerd: the config.toml and
// hosts.toml that point containerd at coop (config.go), the observer that
// follows containerd's built-in content store and reads its blobs for peers
// (observer.go), and the container records a migration reads and stops
// through containerd's API (containers.go).
//
// The parts built on it have rooms of their own: plugin/mirror (the loopback
// OCI endpoint containerd tries first, and its API), plugin/migrate (coop
// migrate's library) and plugin/node (a whole node assembled from its
// parts).
package plugin
