// Package cluster builds isolated network topologies for multi-node runs on
// one machine: one bridge namespace and one network namespace per host, in
// 198.18.0.0/24 (a benchmarking range that exists only there), nothing
// bridged to the host's own network and no default route. Each host's
// uplink is its veth's egress, shaped with tbf (netem is not available
// here, so there is no latency emulation).
package cluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Subnet prefixes every host address.
const Subnet = "198.18.0."

// Host is one namespace on the bridge.
type Host struct {
	// Name is the namespace suffix and the veth suffix (at most 10 bytes).
	Name string
	// IP is the host's address, Subnet+"N".
	IP string
	// Mbit is the uplink rate in Mbit/s; 0 leaves it unshaped.
	Mbit int
}

// Topology is a built set of namespaces.
type Topology struct {
	prefix string
}

// NSPath is the path of host name's network namespace.
func (t *Topology) NSPath(name string) string { return PathOf(t.prefix, name) }

// PathOf is the path of host name's namespace in a topology built with
// prefix (for a process that did not build it).
func PathOf(prefix, name string) string { return "/run/netns/" + prefix + name }

// InNS returns the command line running bin with args in host name's
// namespace (nsenter execs bin: same pid, same signals).
func (t *Topology) InNS(name, bin string, args ...string) (string, []string) {
	return "nsenter", append([]string{"--net=" + t.NSPath(name), bin}, args...)
}

func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Sweep deletes every namespace whose name starts with prefix (left by a
// killed run).
func Sweep(prefix string) {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			_ = exec.Command("ip", "netns", "del", f[0]).Run()
		}
	}
}

// Build creates the bridge namespace prefix+"br" and one namespace per
// host, after sweeping what a killed run with the same prefix left. Close
// removes them. It needs root.
func Build(ctx context.Context, prefix string, hosts []Host) (*Topology, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("network namespaces need root")
	}
	Sweep(prefix)
	t := &Topology{prefix: prefix}
	br := prefix + "br"
	if err := t.build(ctx, br, hosts); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

func (t *Topology) build(ctx context.Context, br string, hosts []Host) error {
	for _, c := range [][]string{
		{"netns", "add", br},
		{"-n", br, "link", "add", "br0", "type", "bridge"},
		{"-n", br, "link", "set", "br0", "up"},
		{"-n", br, "link", "set", "lo", "up"},
	} {
		if err := ip(ctx, c...); err != nil {
			return err
		}
	}
	for _, h := range hosts {
		ns := t.prefix + h.Name
		outer, inner := "v"+h.Name, "e"+h.Name
		for _, c := range [][]string{
			{"netns", "add", ns},
			{"link", "add", outer, "type", "veth", "peer", "name", inner},
			{"link", "set", outer, "netns", br},
			{"link", "set", inner, "netns", ns},
			{"-n", br, "link", "set", outer, "master", "br0", "up"},
			{"-n", ns, "link", "set", inner, "name", "eth0"},
			{"-n", ns, "addr", "add", h.IP + "/24", "dev", "eth0"},
			{"-n", ns, "link", "set", "eth0", "up"},
			{"-n", ns, "link", "set", "lo", "up"},
		} {
			if err := ip(ctx, c...); err != nil {
				return err
			}
		}
		if h.Mbit > 0 {
			// A burst of 256 KiB keeps tbf's goodput near the rate at
			// these speeds (100 Mbit/s measured 95.7 here).
			out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
				"tbf", "rate", fmt.Sprintf("%dmbit", h.Mbit), "burst", "256kb", "latency", "100ms").CombinedOutput()
			if err != nil {
				return fmt.Errorf("tc tbf on %s: %v: %s", h.Name, err, strings.TrimSpace(string(out)))
			}
		}
	}
	return nil
}

// Close deletes the namespaces (and with them the veths).
func (t *Topology) Close() { Sweep(t.prefix) }

// Reexec runs this program again inside host name's namespace with extra
// environment variables, its standard streams passed through, and returns
// its error. On ctx's end the child gets SIGINT, and 30 s to tear down.
func (t *Topology) Reexec(ctx context.Context, name string, env ...string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	bin, args := t.InNS(name, self, os.Args[1:]...)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), env...)
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 30e9
	return cmd.Run()
}

// ListenIn opens a TCP listener on addr inside the network namespace at
// nsPath: a socket belongs to the namespace it was created in, so an
// in-process server can serve from another host of the topology.
func ListenIn(nsPath, addr string) (net.Listener, error) {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	target, err := os.Open(nsPath)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("enter %s: %w", nsPath, err)
	}
	l, lerr := net.Listen("tcp", addr)
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread stays locked and in the wrong namespace: Go ends it
		// with this goroutine.
		if l != nil {
			l.Close()
		}
		return nil, fmt.Errorf("leave %s: %w", nsPath, err)
	}
	runtime.UnlockOSThread()
	return l, lerr
}
