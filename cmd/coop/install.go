package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/coopnet/coop/plugin"
	"github.com/coopnet/coop/plugin/node"
	"github.com/pelletier/go-toml/v2"
)

// Host paths coop install writes, relative to --host-root.
const (
	unitName           = "coop-node.service"
	containerdUnit     = "containerd.service"
	builtinContentDir  = "io.containerd.content.v1.content"
	defaultCtrdRoot    = "/var/lib/containerd"
	installStateFile   = "install.state"
	configBackupSuffix = ".coop-backup"
)

// installOptions are coop install's flags; every path is a host path.
type installOptions struct {
	HostRoot         string
	BinDir           string
	UnitDir          string
	ConfigDir        string
	ContainerdConfig string
	HostsDir         string
	Restart          string
	Uninstall        bool
	Wait             bool
	// Node is coop node's configuration, from the flags after "--".
	Node nodeConfig
}

// hostRunner runs a host command (systemctl) inside the host's root.
type hostRunner func(ctx context.Context, name string, args ...string) error

// installer does coop install's work on one host.
type installer struct {
	o      installOptions
	run    hostRunner
	self   func() ([]byte, error) // coop's own binary
	stderr io.Writer
}

// installState is written to <config-dir>/install.state after each run:
// what was done, and what is left to restart with --restart none.
type installState struct {
	Version     string    `json:"version"`
	Time        time.Time `json:"time"`
	ContentMode string    `json:"content_mode"`
	// Switched: containerd's content store moved between its own and
	// coop's in this run (blobs moved across).
	Switched bool `json:"switched"`
	// Restart lists the units to restart, in order, with --restart none;
	// empty once done.
	Restart []string `json:"restart,omitempty"`
	// ConfigBackup is containerd's config as it was before coop first
	// changed it ("" when there was none): --uninstall puts it back.
	ConfigBackup string `json:"config_backup,omitempty"`
	// ConfigCreated: there was no containerd config before coop's.
	ConfigCreated bool `json:"config_created,omitempty"`
	// BlobsMoved counts the blobs moved between the stores in this run.
	BlobsMoved int `json:"blobs_moved"`
}

func runInstall(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o installOptions
	fs.StringVar(&o.HostRoot, "host-root", "/", "the host's root filesystem as mounted here (a pod's hostPath /); every other path is the host's")
	fs.StringVar(&o.BinDir, "bin-dir", "/usr/local/bin", "where coop's binary goes")
	fs.StringVar(&o.UnitDir, "unit-dir", "/etc/systemd/system", "systemd's unit directory: "+unitName+" goes there")
	fs.StringVar(&o.ConfigDir, "config-dir", "/etc/coop", "node.toml (the node flags after --) and "+installStateFile+" go there")
	fs.StringVar(&o.ContainerdConfig, "containerd-config", "/etc/containerd/config.toml", "containerd's config.toml (version 3): coop's settings are merged in, the original kept as FILE"+configBackupSuffix)
	fs.StringVar(&o.HostsDir, "hosts-dir", defaultHostsDir, "containerd's registry hosts directory (CRI config_path)")
	fs.StringVar(&o.Restart, "restart", "systemd", "systemd: reload systemd, enable and (re)start "+unitName+", restart containerd when its config changed (the host's systemctl, run chrooted into --host-root); none: only write the files and say what to restart")
	fs.BoolVar(&o.Uninstall, "uninstall", false, "undo it: containerd's config restored, the blobs moved back into containerd's store, the unit, binary and node.toml removed")
	fs.BoolVar(&o.Wait, "wait", false, "then block until SIGTERM (a DaemonSet's main container)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: coop install [flags] -- node [coop node flags]\n\nSets a host up to run coop node under systemd, before containerd (proxy and claim modes need it: coop is then containerd's content store).\n\nflags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	switch {
	case o.Uninstall && len(rest) > 0 && rest[0] != "node":
		return fmt.Errorf("unexpected arguments %q: %w", rest, errUsage)
	case o.Uninstall:
		// The node flags, when given, only name coop's root.
		if len(rest) > 0 {
			rest = rest[1:]
		}
	case len(rest) == 0 || rest[0] != "node":
		return fmt.Errorf("the node's flags go after `-- node`: %w", errUsage)
	default:
		rest = rest[1:]
	}
	var err error
	if o.Node, err = installNodeFlags(rest, o.HostsDir, stderr); err != nil {
		return err
	}
	if o.Restart != "systemd" && o.Restart != "none" {
		return fmt.Errorf("--restart %q: want systemd or none: %w", o.Restart, errUsage)
	}
	in := &installer{o: o, run: chrootRunner(o.HostRoot, stderr), self: readSelf, stderr: stderr}
	if o.Uninstall {
		err = in.uninstall(ctx)
	} else {
		err = in.install(ctx)
	}
	if err != nil || !o.Wait {
		return err
	}
	fmt.Fprintln(stderr, "coop install: done; waiting")
	<-ctx.Done()
	return nil
}

func readSelf() ([]byte, error) {
	p, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return os.ReadFile(p)
}

// chrootRunner runs the host's command with its root at hostRoot.
func chrootRunner(hostRoot string, out io.Writer) hostRunner {
	return func(ctx context.Context, name string, args ...string) error {
		path := ""
		for _, dir := range []string{"/usr/bin", "/bin", "/usr/sbin", "/sbin"} {
			if _, err := os.Stat(filepath.Join(hostRoot, dir, name)); err == nil {
				path = filepath.Join(dir, name)
				break
			}
		}
		if path == "" {
			return fmt.Errorf("%s not found on the host (%s)", name, hostRoot)
		}
		cmd := exec.CommandContext(ctx, path, args...)
		cmd.Dir = "/"
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		if filepath.Clean(hostRoot) != "/" {
			cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: hostRoot}
		}
		var buf bytes.Buffer
		cmd.Stdout, cmd.Stderr = &buf, &buf
		fmt.Fprintf(out, "coop install: %s %s\n", name, strings.Join(args, " "))
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(buf.String()))
		}
		return nil
	}
}

// installNodeFlags parses the node's flags (after `-- node`). The node's
// claims read the hosts.toml tree containerd is given (install's
// --hosts-dir) unless the node's flags name another.
func installNodeFlags(args []string, hostsDir string, stderr io.Writer) (nodeConfig, error) {
	cfg, err := parseNodeFlags(args, stderr)
	if err != nil {
		return cfg, err
	}
	if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(strings.TrimLeft(a, "-"), "hosts-dir") }) {
		cfg.HostsDir = hostsDir
	}
	return cfg, nil
}

// host returns the host path p as seen here.
func (in *installer) host(p string) string { return filepath.Join(in.o.HostRoot, p) }

func (in *installer) logf(format string, args ...any) {
	fmt.Fprintf(in.stderr, "coop install: "+format+"\n", args...)
}

// checkPaths refuses host paths systemd or the merge could misread.
func (in *installer) checkPaths() error {
	for flagName, p := range map[string]string{
		"--bin-dir": in.o.BinDir, "--unit-dir": in.o.UnitDir, "--config-dir": in.o.ConfigDir,
		"--containerd-config": in.o.ContainerdConfig, "--hosts-dir": in.o.HostsDir, "--root": in.o.Node.Root,
	} {
		if !filepath.IsAbs(p) || strings.ContainsAny(p, " \t\n\"'\\%$;") {
			return fmt.Errorf("%s %q: want an absolute path without spaces, quotes or %%$: %w", flagName, p, errUsage)
		}
	}
	return nil
}

func (in *installer) install(ctx context.Context) (retErr error) {
	o := in.o
	if err := in.checkPaths(); err != nil {
		return err
	}
	proxy := o.Node.ContentMode == node.ContentProxy
	// Validate the node's flags as the node will (its TLS directory is the
	// host's).
	check := o.Node
	if check.TLSDir != "" {
		check.TLSDir = in.host(check.TLSDir)
	}
	nodeOpts, err := check.options()
	if err != nil {
		return fmt.Errorf("node flags: %w", err)
	}
	if err := nodeOpts.Validate(); err != nil {
		return fmt.Errorf("node flags: %w", err)
	}
	if proxy && !filepath.IsAbs(o.Node.ContentSocket) {
		return fmt.Errorf("--content-socket %q: want an absolute path: %w", o.Node.ContentSocket, errUsage)
	}
	state := in.readState()

	// 1. containerd's config, merged; the original kept once.
	ctrdCfgPath := in.host(o.ContainerdConfig)
	base, err := os.ReadFile(ctrdCfgPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	wasProxy := usesCoopContent(base)
	merged, err := plugin.MergeContainerdConfig(base, plugin.ContainerdConfigOptions{
		ContentSocket: o.Node.ContentSocket,
		HostsDir:      o.HostsDir,
		Snapshotters:  []string{"overlayfs", "native"},
		Platforms:     []string{"linux/" + runtime.GOARCH},
		Observer:      !proxy,
	})
	if err != nil {
		return fmt.Errorf("%s: %w", o.ContainerdConfig, err)
	}
	if state.ConfigBackup == "" && !state.ConfigCreated {
		if base == nil {
			state.ConfigCreated = true
		} else {
			state.ConfigBackup = o.ContainerdConfig + configBackupSuffix
			if _, err := os.Stat(in.host(state.ConfigBackup)); errors.Is(err, os.ErrNotExist) {
				if err := plugin.WriteFileAtomic(in.host(state.ConfigBackup), base, 0o644); err != nil {
					return err
				}
				in.logf("kept containerd's config as %s", state.ConfigBackup)
			}
		}
	}

	// 2. coop's binary, its config and its unit.
	bin, err := in.self()
	if err != nil {
		return fmt.Errorf("read coop's own binary: %w", err)
	}
	nodeCfg, err := toml.Marshal(o.Node)
	if err != nil {
		return err
	}
	binPath := filepath.Join(o.BinDir, "coop")
	cfgPath := filepath.Join(o.ConfigDir, "node.toml")
	coopChanged := false
	for _, f := range []struct {
		path string
		data []byte
		perm os.FileMode
	}{
		{binPath, bin, 0o755},
		{cfgPath, append([]byte("# Written by coop install; coop node --config reads it.\n"), nodeCfg...), 0o600},
		{filepath.Join(o.UnitDir, unitName), []byte(nodeUnit(binPath, cfgPath)), 0o644},
	} {
		changed, err := writeIfChanged(in.host(f.path), f.data, f.perm)
		if err != nil {
			return err
		}
		if changed {
			in.logf("wrote %s", f.path)
			coopChanged = true
		}
	}
	ctrdChanged := !bytes.Equal(base, merged)
	state.Switched = proxy != wasProxy
	state.ContentMode = o.Node.ContentMode
	state.BlobsMoved = 0

	// 3. Restart what changed. Switching containerd's store moves the
	// blobs while containerd is stopped, so that nothing is pulled again
	// and nothing is written meanwhile; containerd's config is written
	// only once they are across, so a run that failed is done again whole.
	from, to := in.host(filepath.Join(ctrdRoot(base), builtinContentDir)), in.host(o.Node.Root)
	if !proxy || !state.Switched {
		from = ""
	}
	if o.Restart == "none" {
		if from != "" {
			// containerd still runs on its store: link, not move.
			if state.BlobsMoved, err = moveBlobs(from, to, true); err != nil {
				return err
			}
			in.logf("linked %d blobs of containerd's store into coop's (%s)", state.BlobsMoved, o.Node.Root)
		}
		if err := in.writeConfig(ctrdCfgPath, merged, ctrdChanged); err != nil {
			return err
		}
		state.Restart = nil
		if coopChanged || state.Switched {
			state.Restart = append(state.Restart, unitName)
		}
		if ctrdChanged {
			state.Restart = append(state.Restart, containerdUnit)
		}
		if len(state.Restart) > 0 {
			in.logf("restart %s now (in this order)", strings.Join(state.Restart, ", then "))
		}
		return in.writeState(state)
	}
	if err := in.run(ctx, "systemctl", "daemon-reload"); err != nil {
		return err
	}
	if err := in.run(ctx, "systemctl", "enable", unitName); err != nil {
		return err
	}
	if from != "" {
		if err := in.run(ctx, "systemctl", "stop", containerdUnit); err != nil {
			return err
		}
		// containerd comes back whatever happens below: on its old
		// config if the switch failed, waiting for coop otherwise.
		defer func() {
			if retErr != nil {
				if err := in.run(context.WithoutCancel(ctx), "systemctl", "start", containerdUnit); err != nil {
					in.logf("%v", err)
				}
			}
		}()
		if state.BlobsMoved, err = moveBlobs(from, to, false); err != nil {
			return err
		}
		in.logf("moved %d blobs of containerd's store into coop's (%s)", state.BlobsMoved, o.Node.Root)
	}
	if err := in.writeConfig(ctrdCfgPath, merged, ctrdChanged); err != nil {
		return err
	}
	if coopChanged || state.Switched {
		if err := in.run(ctx, "systemctl", "restart", unitName); err != nil {
			return err
		}
	}
	if proxy {
		// containerd would wait for coop anyway; waiting here says in
		// the pod's log when coop does not come up.
		if err := waitSocket(ctx, in.host(o.Node.ContentSocket), time.Minute); err != nil {
			return fmt.Errorf("%s did not come up: %w (journalctl -u %s)", unitName, err, unitName)
		}
	}
	switch {
	case from != "":
		err = in.run(ctx, "systemctl", "start", containerdUnit)
	case ctrdChanged:
		err = in.run(ctx, "systemctl", "restart", containerdUnit)
	}
	if err != nil {
		return err
	}
	state.Restart = nil
	return in.writeState(state)
}

func (in *installer) writeConfig(path string, cfg []byte, changed bool) error {
	if !changed {
		return nil
	}
	if err := plugin.WriteFileAtomic(path, cfg, 0o644); err != nil {
		return err
	}
	in.logf("wrote %s", in.o.ContainerdConfig)
	return nil
}

func (in *installer) uninstall(ctx context.Context) error {
	o := in.o
	if err := in.checkPaths(); err != nil {
		return err
	}
	state := in.readState()
	ctrdCfgPath := in.host(o.ContainerdConfig)
	cur, err := os.ReadFile(ctrdCfgPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var orig []byte
	switch {
	case state.ConfigBackup != "":
		if orig, err = os.ReadFile(in.host(state.ConfigBackup)); err != nil {
			return fmt.Errorf("containerd's original config: %w", err)
		}
	case state.ConfigCreated:
		orig = nil
	default:
		orig = cur // coop never changed it
	}
	wasProxy := usesCoopContent(cur)
	from, to := in.host(o.Node.Root), in.host(filepath.Join(ctrdRoot(orig), builtinContentDir))
	systemd := o.Restart == "systemd"
	if systemd {
		if err := in.run(ctx, "systemctl", "stop", containerdUnit); err != nil {
			return err
		}
	}
	if state.ConfigCreated {
		if err := os.Remove(ctrdCfgPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	} else if err := plugin.WriteFileAtomic(ctrdCfgPath, orig, 0o644); err != nil {
		return err
	}
	in.logf("restored %s", o.ContainerdConfig)
	if wasProxy {
		n, err := moveBlobs(from, to, !systemd)
		if err != nil {
			return err
		}
		in.logf("moved %d blobs of coop's store back into containerd's", n)
	}
	if systemd {
		if err := in.run(ctx, "systemctl", "disable", "--now", unitName); err != nil {
			return err
		}
	}
	for _, p := range []string{filepath.Join(o.UnitDir, unitName), filepath.Join(o.BinDir, "coop"), filepath.Join(o.ConfigDir, "node.toml"), filepath.Join(o.ConfigDir, installStateFile)} {
		if err := os.Remove(in.host(p)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if state.ConfigBackup != "" {
		_ = os.Remove(in.host(state.ConfigBackup))
	}
	if systemd {
		if err := in.run(ctx, "systemctl", "daemon-reload"); err != nil {
			return err
		}
		return in.run(ctx, "systemctl", "start", containerdUnit)
	}
	in.logf("stop %s, then restart %s now", unitName, containerdUnit)
	return nil
}

func (in *installer) readState() installState {
	var s installState
	b, err := os.ReadFile(in.host(filepath.Join(in.o.ConfigDir, installStateFile)))
	if err == nil {
		_ = json.Unmarshal(b, &s) // a broken state is started afresh
	}
	return s
}

func (in *installer) writeState(s installState) error {
	s.Version, s.Time = Version, time.Now().UTC()
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return plugin.WriteFileAtomic(in.host(filepath.Join(in.o.ConfigDir, installStateFile)), append(b, '\n'), 0o644)
}

// nodeUnit is coop node's systemd unit: started before containerd, wanted
// by it (not required: restarting coop must not restart containerd, which
// reconnects to coop by itself).
func nodeUnit(bin, cfg string) string {
	return fmt.Sprintf(`# Written by coop install.
[Unit]
Description=coop node: cooperative content store and registry mirror for containerd
Documentation=https://github.com/coopnet/coop
After=network-online.target local-fs.target
Wants=network-online.target
Before=containerd.service

[Service]
ExecStart=%s node --config %s
Restart=always
RestartSec=2
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target containerd.service
`, bin, cfg)
}

// usesCoopContent says whether a containerd config makes coop its content
// store.
func usesCoopContent(cfg []byte) bool {
	var c struct {
		Proxies map[string]struct {
			Type string `toml:"type"`
		} `toml:"proxy_plugins"`
	}
	if toml.Unmarshal(cfg, &c) != nil {
		return false
	}
	return c.Proxies[plugin.ContentPluginName].Type == "content"
}

// ctrdRoot is the root directory a containerd config names.
func ctrdRoot(cfg []byte) string {
	var c struct {
		Root string `toml:"root"`
	}
	if toml.Unmarshal(cfg, &c) != nil || c.Root == "" || !filepath.IsAbs(c.Root) {
		return defaultCtrdRoot
	}
	return c.Root
}

// writeIfChanged writes data to path atomically unless it holds it already.
func writeIfChanged(path string, data []byte, perm os.FileMode) (bool, error) {
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
		return false, os.Chmod(path, perm)
	}
	return true, plugin.WriteFileAtomic(path, data, perm)
}

// moveBlobs moves every blob under from/blobs/<algorithm>/<hex> (a
// containerd local store) into to/blobs/, or hard-links it with link. A blob
// already there is dropped from from (kept with link). Across filesystems
// (or mounts) it copies, each blob through a temporary file and a rename.
func moveBlobs(from, to string, link bool) (int, error) {
	copying := false
	algs, err := os.ReadDir(filepath.Join(from, "blobs"))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n := 0
	for _, alg := range algs {
		if !alg.IsDir() || !validAlgorithm(alg.Name()) {
			continue
		}
		srcDir, dstDir := filepath.Join(from, "blobs", alg.Name()), filepath.Join(to, "blobs", alg.Name())
		if err := os.MkdirAll(dstDir, 0o755); err != nil {
			return n, err
		}
		ents, err := os.ReadDir(srcDir)
		if err != nil {
			return n, err
		}
		for _, e := range ents {
			if !e.Type().IsRegular() || !validHex(e.Name()) {
				continue
			}
			src, dst := filepath.Join(srcDir, e.Name()), filepath.Join(dstDir, e.Name())
			if _, err := os.Lstat(dst); err == nil {
				if !link {
					if err := os.Remove(src); err != nil {
						return n, err
					}
				}
				continue
			}
			switch {
			case copying:
				err = copyBlob(src, dst, !link)
			case link:
				err = os.Link(src, dst)
			default:
				err = os.Rename(src, dst)
			}
			if errors.Is(err, syscall.EXDEV) {
				// Another filesystem (or mount): copied, then removed
				// when moving.
				copying = true
				err = copyBlob(src, dst, !link)
			}
			if err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

// copyBlob copies src to dst atomically, then removes src with remove.
func copyBlob(src, dst string, remove bool) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	f, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := io.Copy(f, in); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o444); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return err
	}
	if remove {
		return os.Remove(src)
	}
	return nil
}

func validAlgorithm(s string) bool {
	return s == "sha256" || s == "sha384" || s == "sha512"
}

func validHex(s string) bool {
	if len(s) < 64 || len(s) > 128 {
		return false
	}
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// waitSocket waits until a unix socket exists at path.
func waitSocket(ctx context.Context, path string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no socket at %s after %s", path, timeout)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
