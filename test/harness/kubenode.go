package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// KubeNodeOptions configure a KubeNode.
type KubeNodeOptions struct {
	// Name is the Kubernetes node's name. Required.
	Name string
	// IP is its address in NetNS. Required.
	IP string
	// NetNS is the network namespace it runs in. Required.
	NetNS string
	// PodCIDR is its pods' range (bridge CNI, host-local IPAM). Required.
	PodCIDR string
	// Dir holds everything the node writes. Required; keep it short (it
	// holds sockets).
	Dir string
	// ControlPlane is the cluster. Required.
	ControlPlane *ControlPlane
	// Tools are containerd and its shim; Kube the kubelet. Required.
	Tools *Tools
	Kube  *KubeTools
	// SandboxImage is the pod sandbox image (pinned, so never collected).
	// Required.
	SandboxImage string
	// Registries are written into the node's hosts directory: each host
	// pulls from its upstream URL (plain HTTP test registries).
	Registries []Upstream
	// Logf, if set, receives progress lines.
	Logf func(format string, args ...any)
}

// KubeNode is a real Kubernetes node on this machine: containerd with CRI and
// a kubelet in their own network namespace and their own mount namespace,
// where the node's directories are bound onto the standard paths
// (/run/containerd, /var/lib/kubelet, /etc/containerd/certs.d,
// /var/lib/coop, /etc/cni/net.d, /var/log/pods), so a DaemonSet's hostPaths
// are the node's own. ../shared/KUBERNETES.md records why each setting is
// there. Stop ends it.
type KubeNode struct {
	opts KubeNodeOptions
	// holder keeps the mount namespace alive; everything runs inside it.
	holder     *process
	containerd *process
	kubelet    *process
	cgroups    []string
	// containerdConfig is containerd's config.toml, the node's
	// /etc/containerd/config.toml.
	containerdConfig string
	// hostCoop is coop node run as its systemd unit says, once coop
	// install asked for it (ApplyInstall); installed the install.state
	// applied last.
	hostCoop  *process
	installed time.Time
}

// Node paths inside the node's mount namespace.
const (
	kubeContainerdSock = "/run/containerd/containerd.sock"
	kubeHostsDir       = "/etc/containerd/certs.d"
)

// StartKubeNode starts the node and waits until it is Ready.
func StartKubeNode(ctx context.Context, o KubeNodeOptions) (_ *KubeNode, retErr error) {
	if o.Name == "" || o.IP == "" || o.NetNS == "" || o.PodCIDR == "" || o.Dir == "" || o.ControlPlane == nil || o.Tools == nil || o.Kube == nil || o.SandboxImage == "" {
		return nil, errors.New("kube node: missing options")
	}
	n := &KubeNode{opts: o}
	defer func() {
		if retErr != nil {
			n.Stop()
		}
	}()
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	start := time.Now()
	dirs := map[string]string{}
	for _, d := range []string{"run", "kubelet", "etc-containerd", "certs.d", "coop", "cni", "pods", "containerd", "state", "tmp", "opt", "runc", "fake", "pki",
		"etc-coop", "run-coop", "units", "bin"} {
		dirs[d] = filepath.Join(o.Dir, d)
		if err := os.MkdirAll(dirs[d], 0o755); err != nil {
			return nil, err
		}
	}
	// The node's mount namespace, held by a sleeping process in its
	// network namespace.
	var err error
	if n.holder, err = startProcess(o.Name+"-holder", filepath.Join(o.Dir, "holder.log"), os.Environ(),
		"nsenter", "--net="+o.NetNS, "unshare", "--mount", "--uts", "--propagation", "private", "--", "sleep", "infinity"); err != nil {
		return nil, err
	}
	if err := n.waitOwnMountNS(ctx); err != nil {
		return nil, err
	}
	fake := map[string]string{"overcommit_memory": "1", "panic": "10", "panic_on_oops": "1"}
	for f, v := range fake {
		if err := os.WriteFile(filepath.Join(dirs["fake"], f), []byte(v+"\n"), 0o644); err != nil {
			return nil, err
		}
	}
	script := []string{
		"set -e",
		"hostname " + o.Name,
		// The node's own mounts propagate to its pods' hostPath volumes
		// (HostToContainer), never out of the node.
		"mount --make-rshared /",
		"mkdir -p /run/netns /run/containerd /var/lib/kubelet /etc/containerd /var/lib/coop /etc/cni/net.d /var/log/pods /etc/coop /run/coop",
		// Pod network namespaces stay in the node (KUBERNETES.md, 4).
		"mount -t tmpfs tmpfs /run/netns",
		// The kubelet writes these machine-wide otherwise (3).
		"mount --bind " + filepath.Join(dirs["fake"], "overcommit_memory") + " /proc/sys/vm/overcommit_memory",
		"mount --bind " + filepath.Join(dirs["fake"], "panic") + " /proc/sys/kernel/panic",
		"mount --bind " + filepath.Join(dirs["fake"], "panic_on_oops") + " /proc/sys/kernel/panic_on_oops",
		"mount --bind " + dirs["run"] + " /run/containerd",
		"mount --bind " + dirs["kubelet"] + " /var/lib/kubelet",
		"mount --make-rshared /var/lib/kubelet",
		// containerd's config and hosts directory, and what coop install
		// writes on a host (README, Kubernetes: proxy and claim modes).
		"mount --bind " + dirs["etc-containerd"] + " /etc/containerd",
		"mkdir -p /etc/containerd/certs.d",
		"mount --bind " + dirs["certs.d"] + " /etc/containerd/certs.d",
		"mount --bind " + dirs["etc-coop"] + " /etc/coop",
		"mount --bind " + dirs["run-coop"] + " /run/coop",
		"mount --bind " + dirs["units"] + " /etc/systemd/system",
		"mount --bind " + dirs["bin"] + " /usr/local/bin",
		"mount --bind " + dirs["coop"] + " /var/lib/coop",
		"mount --bind " + dirs["cni"] + " /etc/cni/net.d",
		"mount --bind " + dirs["pods"] + " /var/log/pods",
	}
	if out, err := n.inNode(ctx, "sh", "-c", strings.Join(script, "\n")); err != nil {
		return nil, fmt.Errorf("node %s mounts: %v: %s", o.Name, err, out)
	}
	for _, r := range o.Registries {
		if err := writeHostsToml(dirs["certs.d"], r.Host, r.URL); err != nil {
			return nil, err
		}
	}
	cni := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "coop-test",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "loopback"}
  ]
}
`, o.PodCIDR)
	if err := os.WriteFile(filepath.Join(dirs["cni"], "10-coop-test.conflist"), []byte(cni), 0o644); err != nil {
		return nil, err
	}
	cfg := baseConfig{
		Root: dirs["containerd"], State: dirs["state"], Temp: dirs["tmp"],
		GRPC: kubeContainerdSock, TTRPC: kubeContainerdSock + ".ttrpc",
		ShimSocketDir: "/run/containerd/s", OptDir: dirs["opt"], RuncRoot: dirs["runc"],
		LogLevel: "info", RegistryConfigPath: kubeHostsDir, Snapshotter: "overlayfs",
	}.render()
	cfg += fmt.Sprintf(`    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = %q
  [plugins."io.containerd.cri.v1.runtime"]
    restrict_oom_score_adj = true
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = "/etc/cni/net.d"
`, o.SandboxImage)
	cfgPath := filepath.Join(dirs["etc-containerd"], "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	n.containerdConfig = cfgPath
	if err := n.startContainerd(ctx); err != nil {
		return nil, err
	}
	cgroupRoot := "/coop-" + o.Name
	if err := n.makeCgroups(cgroupRoot); err != nil {
		return nil, err
	}
	kubeconfig, err := o.ControlPlane.IssueKubelet(dirs["pki"], o.Name, net.ParseIP(o.IP))
	if err != nil {
		return nil, err
	}
	kcfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: %q
failSwapOn: false
protectKernelDefaults: false
resolvConf: ""
serializeImagePulls: false
containerRuntimeEndpoint: unix://%s
address: %q
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: %q
tlsPrivateKeyFile: %q
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %q}
authorization: {mode: Webhook}
podCIDR: %q
clusterDomain: cluster.local
evictionHard: {memory.available: "1Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
localStorageCapacityIsolation: false
`, cgroupRoot, kubeContainerdSock, o.IP, filepath.Join(dirs["pki"], "kubelet.crt"), filepath.Join(dirs["pki"], "kubelet.key"), o.ControlPlane.CACert, o.PodCIDR)
	kcfgPath := filepath.Join(o.Dir, "kubelet.yaml")
	if err := os.WriteFile(kcfgPath, []byte(kcfg), 0o644); err != nil {
		return nil, err
	}
	if n.kubelet, err = n.startInNode("kubelet", o.Kube.Kubelet, "--config="+kcfgPath, "--kubeconfig="+kubeconfig,
		"--root-dir=/var/lib/kubelet", "--cert-dir="+dirs["pki"], "--hostname-override="+o.Name, "--node-ip="+o.IP, "--v=1"); err != nil {
		return nil, err
	}
	if err := waitReadyEvery(ctx, 2*time.Minute, time.Second, n.kubelet, n.ready); err != nil {
		return nil, fmt.Errorf("node %s: %w; kubelet: %s", o.Name, err, tailFile(n.kubelet.logPath, 20))
	}
	logf("kube node %s Ready in %v", o.Name, time.Since(start).Round(10*time.Millisecond))
	return n, nil
}

// Name is the node's name.
func (n *KubeNode) Name() string { return n.opts.Name }

// IP is the node's address.
func (n *KubeNode) IP() string { return n.opts.IP }

// Dir is the node's directory on the host (its /var/lib/coop is Dir/coop).
func (n *KubeNode) Dir() string { return n.opts.Dir }

// Exec runs bin with args inside the node (its network and mount
// namespaces) and returns its combined output.
func (n *KubeNode) Exec(ctx context.Context, bin string, args ...string) (string, error) {
	return n.inNode(ctx, bin, args...)
}

// Crictl runs crictl against the node's containerd.
func (n *KubeNode) Crictl(ctx context.Context, tools *Tools, args ...string) (string, error) {
	return n.inNode(ctx, tools.Crictl, append([]string{"--runtime-endpoint", "unix://" + kubeContainerdSock, "--image-endpoint", "unix://" + kubeContainerdSock}, args...)...)
}

func (n *KubeNode) nsenterArgs(bin string, args ...string) []string {
	return append([]string{"-t", strconv.Itoa(n.holder.cmd.Process.Pid), "-m", "-n", "-u", "--", bin}, args...)
}

func (n *KubeNode) inNode(ctx context.Context, bin string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "nsenter", n.nsenterArgs(bin, args...)...).CombinedOutput()
	return string(out), err
}

func (n *KubeNode) startInNode(name, bin string, args ...string) (*process, error) {
	return startProcess(n.opts.Name+"-"+name, filepath.Join(n.opts.Dir, name+".log"), os.Environ(), "nsenter", n.nsenterArgs(bin, args...)...)
}

// waitOwnMountNS waits until the holder has its own mount namespace.
func (n *KubeNode) waitOwnMountNS(ctx context.Context) error {
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		return err
	}
	for range 100 {
		if ok, werr := n.holder.exited(); ok {
			return fmt.Errorf("node %s: the namespace holder exited (%v): %s", n.opts.Name, werr, tailFile(n.holder.logPath, 5))
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", n.holder.cmd.Process.Pid)); err == nil && ns != self {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("node %s: no mount namespace of its own", n.opts.Name)
}

// makeCgroups creates the kubelet's cgroup root in every cgroup v1
// hierarchy (KUBERNETES.md, 1), cpuset's with its parent's cpus and mems.
func (n *KubeNode) makeCgroups(root string) error {
	ents, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return err
	}
	for _, e := range ents {
		base := filepath.Join("/sys/fs/cgroup", e.Name())
		if fi, err := os.Lstat(base); err != nil || fi.Mode()&os.ModeSymlink != 0 || !fi.IsDir() {
			continue
		}
		d := filepath.Join(base, root)
		if err := os.MkdirAll(d, 0o755); err != nil {
			continue // not a hierarchy this root may write
		}
		n.cgroups = append(n.cgroups, d)
		if e.Name() == "cpuset" || strings.Contains(e.Name(), "cpuset") {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if b, err := os.ReadFile(filepath.Join(base, f)); err == nil {
					_ = os.WriteFile(filepath.Join(d, f), b, 0o644)
				}
			}
		}
	}
	return nil
}

// ready is nil once the node's Ready condition is True.
func (n *KubeNode) ready(ctx context.Context) error {
	out, err := n.opts.ControlPlane.Kubectl(ctx, nil, "get", "node", n.opts.Name, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
	if err == nil && strings.TrimSpace(out) != "True" {
		err = fmt.Errorf("node %s Ready: %q", n.opts.Name, out)
	}
	return err
}

// Stop ends the kubelet, then containerd (and the pods' processes with its
// shims), then the namespace holder; the cgroups it made are removed.
func (n *KubeNode) Stop() {
	if n.kubelet != nil {
		_ = n.kubelet.stop(10 * time.Second)
	}
	if n.containerd != nil {
		_ = n.containerd.stop(10 * time.Second)
	}
	if n.hostCoop != nil {
		_ = n.hostCoop.stop(10 * time.Second)
	}
	// The pods' processes (in the node's cgroups) and the shims (in its
	// mount namespace) outlive containerd: end them.
	n.killLeftovers()
	if n.holder != nil {
		_ = n.holder.stop(2 * time.Second)
	}
	for _, d := range n.cgroups {
		removeCgroupTree(d)
	}
}

// killLeftovers kills every process in the node's cgroups and every process
// in its mount namespace but the holder.
func (n *KubeNode) killLeftovers() {
	pids := map[int]bool{}
	for _, d := range n.cgroups {
		_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
			if err != nil || e.IsDir() || e.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids[pid] = true
				}
			}
			return nil
		})
	}
	if n.holder != nil {
		holder := n.holder.cmd.Process.Pid
		if mnt, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", holder)); err == nil {
			ents, _ := os.ReadDir("/proc")
			for _, e := range ents {
				pid, err := strconv.Atoi(e.Name())
				if err != nil || pid == holder {
					continue
				}
				if m, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && m == mnt {
					pids[pid] = true
				}
			}
		}
	}
	for pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if len(pids) > 0 {
		time.Sleep(200 * time.Millisecond)
	}
}

// removeCgroupTree removes the cgroup directory d and its children, deepest
// first (a cgroup with processes stays).
func removeCgroupTree(d string) {
	var dirs []string
	_ = filepath.WalkDir(d, func(p string, e os.DirEntry, err error) error {
		if err == nil && e.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		_ = os.Remove(dirs[i])
	}
}
