package harness

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// The units coop install names; the test nodes have no systemd, so
// ApplyInstall does what systemd would.
const (
	coopUnit       = "coop-node.service"
	containerdUnit = "containerd.service"
)

// installState is the part of coop install's install.state the harness
// reads.
type installState struct {
	Time        time.Time `json:"time"`
	ContentMode string    `json:"content_mode"`
	Restart     []string  `json:"restart"`
}

// startContainerd starts the node's containerd on its config and waits for
// its socket.
func (n *KubeNode) startContainerd(ctx context.Context) error {
	var err error
	if n.containerd, err = n.startInNode("containerd", n.opts.Tools.Containerd, "--config", n.containerdConfig); err != nil {
		return err
	}
	sock := filepath.Join(n.opts.Dir, "run", "containerd.sock")
	if err := waitReady(ctx, 30*time.Second, n.containerd, func(context.Context) error {
		_, err := os.Stat(sock)
		return err
	}); err != nil {
		return fmt.Errorf("node %s: %w; containerd: %s", n.opts.Name, err, tailFile(n.containerd.logPath, 20))
	}
	return nil
}

// ApplyInstall does what systemd does after `coop install --restart none`
// ran on the node (in a pod of the chart): when a new install.state asks
// for restarts, containerd is stopped, coop node started as its unit's
// ExecStart says (in the node's namespaces, as root) and containerd started
// again. It reports whether it restarted anything.
func (n *KubeNode) ApplyInstall(ctx context.Context) (bool, error) {
	b, err := os.ReadFile(filepath.Join(n.opts.Dir, "etc-coop", "install.state"))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var s installState
	if err := json.Unmarshal(b, &s); err != nil {
		return false, fmt.Errorf("node %s: install.state: %w", n.opts.Name, err)
	}
	if !s.Time.After(n.installed) || len(s.Restart) == 0 {
		return false, nil
	}
	n.installed = s.Time
	restartCtrd := slices.Contains(s.Restart, containerdUnit)
	if restartCtrd && n.containerd != nil {
		if err := n.containerd.stop(10 * time.Second); err != nil {
			return false, err
		}
	}
	if slices.Contains(s.Restart, coopUnit) {
		if err := n.RestartHostCoop(ctx); err != nil {
			return false, err
		}
	}
	if restartCtrd {
		if err := n.startContainerd(ctx); err != nil {
			return false, err
		}
	}
	n.logf("node %s: applied coop install (restarted %s)", n.opts.Name, strings.Join(s.Restart, ", "))
	return true, nil
}

// RestartHostCoop kills the coop node that ApplyInstall started (as a crash
// would) and starts it again from its unit, as systemd's Restart=always
// does; it waits for coop's content socket in proxy mode.
func (n *KubeNode) RestartHostCoop(ctx context.Context) error {
	argv, err := n.unitExecStart()
	if err != nil {
		return err
	}
	if n.hostCoop != nil {
		if err := n.hostCoop.kill(); err != nil {
			return err
		}
	}
	sock := filepath.Join(n.opts.Dir, "run-coop", "content.sock")
	_ = os.Remove(sock) // a killed coop leaves it
	if n.hostCoop, err = n.startInNode("coop-node", argv[0], argv[1:]...); err != nil {
		return err
	}
	var cfg struct {
		ContentMode string `toml:"content_mode"`
	}
	b, err := os.ReadFile(filepath.Join(n.opts.Dir, "etc-coop", "node.toml"))
	if err != nil {
		return err
	}
	if err := toml.Unmarshal(b, &cfg); err != nil {
		return fmt.Errorf("node %s: node.toml: %w", n.opts.Name, err)
	}
	if cfg.ContentMode != "proxy" {
		return nil
	}
	return waitReady(ctx, 30*time.Second, n.hostCoop, func(context.Context) error {
		_, err := os.Stat(sock)
		return err
	})
}

// HostCoopLog is the log of the coop node ApplyInstall started.
func (n *KubeNode) HostCoopLog() string { return filepath.Join(n.opts.Dir, "coop-node.log") }

// unitExecStart is coop-node.service's ExecStart, split on spaces (coop
// install refuses paths with spaces).
func (n *KubeNode) unitExecStart() ([]string, error) {
	f, err := os.Open(filepath.Join(n.opts.Dir, "units", coopUnit))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "ExecStart="); ok {
			if argv := strings.Fields(v); len(argv) > 0 {
				return argv, nil
			}
		}
	}
	return nil, fmt.Errorf("node %s: %s has no ExecStart", n.opts.Name, coopUnit)
}

func (n *KubeNode) logf(format string, args ...any) {
	if n.opts.Logf != nil {
		n.opts.Logf(format, args...)
	}
}
