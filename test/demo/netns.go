package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// The demo's cluster lives in network namespaces joined by one bridge, in
// 198.18.0.0/24 (a benchmarking range that exists only there): nothing is
// bridged to the host's network and there is no default route. Each node's
// uplink is its veth's egress, shaped with tbf.

const (
	nsPrefix = "coopdemo-"
	bridgeNS = nsPrefix + "br"
	ctlNS    = nsPrefix + "ctl"
	subnet   = "198.18.0."
)

// host is one namespace on the bridge.
type host struct {
	name string // namespace suffix; also the veth suffix (≤ 10 bytes)
	ip   string // 198.18.0.X
	mbit int    // uplink in Mbit/s; 0: unshaped
}

func nsPath(name string) string { return "/run/netns/" + nsPrefix + name }

func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// sweep deletes the namespaces a killed demo left behind.
func sweep() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], nsPrefix) {
			_ = exec.Command("ip", "netns", "del", f[0]).Run()
		}
	}
}

// buildTopology creates the bridge namespace and one namespace per host.
func buildTopology(ctx context.Context, hosts []host) error {
	sweep()
	if err := ip(ctx, "netns", "add", bridgeNS); err != nil {
		return err
	}
	for _, c := range [][]string{
		{"-n", bridgeNS, "link", "add", "br0", "type", "bridge"},
		{"-n", bridgeNS, "link", "set", "br0", "up"},
		{"-n", bridgeNS, "link", "set", "lo", "up"},
	} {
		if err := ip(ctx, c...); err != nil {
			return err
		}
	}
	for _, h := range hosts {
		ns := nsPrefix + h.name
		outer, inner := "v"+h.name, "e"+h.name
		for _, c := range [][]string{
			{"netns", "add", ns},
			{"link", "add", outer, "type", "veth", "peer", "name", inner},
			{"link", "set", outer, "netns", bridgeNS},
			{"link", "set", inner, "netns", ns},
			{"-n", bridgeNS, "link", "set", outer, "master", "br0", "up"},
			{"-n", ns, "link", "set", inner, "name", "eth0"},
			{"-n", ns, "addr", "add", h.ip + "/24", "dev", "eth0"},
			{"-n", ns, "link", "set", "eth0", "up"},
			{"-n", ns, "link", "set", "lo", "up"},
		} {
			if err := ip(ctx, c...); err != nil {
				return err
			}
		}
		if h.mbit > 0 {
			out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
				"tbf", "rate", fmt.Sprintf("%dmbit", h.mbit), "burst", "256kb", "latency", "100ms").CombinedOutput()
			if err != nil {
				return fmt.Errorf("tc tbf on %s: %v: %s", h.name, err, strings.TrimSpace(string(out)))
			}
		}
	}
	return nil
}

// inNS returns the command line running bin with args in host's namespace.
func inNS(name, bin string, args ...string) (string, []string) {
	return "nsenter", append([]string{"--net=" + nsPath(name), bin}, args...)
}

// reexecInCtl runs this program again inside the control namespace (on the
// bridge, so it reaches every node) and returns its error.
func reexecInCtl(ctx context.Context) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	bin, args := inNS("ctl", self, os.Args[1:]...)
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), innerEnv+"=1")
	// The inner demo gets Ctrl-C itself (same process group) and tears its
	// processes down; give it time before the namespaces go.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 30e9
	return cmd.Run()
}

const innerEnv = "COOP_DEMO_INNER"

var _ = ctlNS
