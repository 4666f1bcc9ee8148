// Package harness starts real parts for coop's integration tests, demo and
// benchmarks: containerd processes (with or without a coop node as their
// content store), an OCI registry on loopback, and images of incompressible
// layers. Every call that does I/O takes a context first and returns an error;
// nothing here depends on package testing, so main programs use it too.
//
// Everything a harness value starts it also stops: Node.Stop and
// Registry.Close are idempotent, kill what is left, unmount what containerd
// mounted under the node's directories and remove them. Child processes are
// started with a parent-death signal, so a crashed harness leaves no daemons
// behind; a later harness sweeps the directories such a crash left.
package harness
