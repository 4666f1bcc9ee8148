// Package plugin joins coop to containerd: the loopback mirror containerd
// tries first for every registry, and the config.toml and hosts.toml that
// point containerd at coop.
package plugin
