//go:build integration

package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coopnet/coop/plugin/node"
	"github.com/coopnet/coop/test/cluster"
	"github.com/coopnet/coop/test/harness"
)

const (
	clusterPrefix = "coopk8s-"
	ctlIP         = cluster.Subnet + "254"
	registryAddr  = ctlIP + ":5000"
)

// kubeHosts are the test cluster's namespaces: the control plane (and the
// registry) and three nodes.
var kubeHosts = []cluster.Host{
	{Name: "ctl", IP: ctlIP},
	{Name: "n1", IP: cluster.Subnet + "11"},
	{Name: "n2", IP: cluster.Subnet + "12"},
	{Name: "n3", IP: cluster.Subnet + "13"},
}

// TestCluster installs the chart on a real cluster (kube-apiserver, etcd,
// controller-manager, scheduler, and three kubelets with their own
// containerd, each node in its own network and mount namespaces) with the
// image `make image` builds, then: a Deployment on one node pulls from the
// registry; with the registry gone, scaled out to the other nodes, its pods
// start, their layers from the first node (coop status says so); a node's
// coop pod deleted under running pods comes back and nothing breaks.
func TestCluster(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestCluster runs kubelets, containerd and network namespaces: run as root (make test)")
	}
	tools, err := harness.FindTools(true)
	if err != nil {
		t.Fatal(err)
	}
	kube, err := harness.FindKubeTools()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	began := time.Now()
	lap := func(what string) { t.Logf("%6.1fs  %s", time.Since(began).Seconds(), what) }

	topo, err := cluster.Build(ctx, clusterPrefix, kubeHosts)
	if err != nil {
		t.Fatal(err)
	}
	defer topo.Close()
	reg, err := harness.StartRegistry(ctx, harness.RegistryOptions{Addr: registryAddr, Listen: func(addr string) (net.Listener, error) {
		return cluster.ListenIn(topo.NSPath("ctl"), addr)
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()

	// coop's image, as `make image` builds it (this machine's platform).
	layout := filepath.Join(t.TempDir(), "image")
	build := exec.CommandContext(ctx, "go", "run", "./contrib/image", "--out", layout, "--platforms", "linux/amd64", "--version", "k8s-test", "--tag", "test")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}
	if _, err := reg.PushLayout(ctx, layout, "coop/coop", "test"); err != nil {
		t.Fatal(err)
	}
	pause, err := reg.PushRandomImage(ctx, harness.ImageSpec{Repo: "coop/pause", Tag: "1", LayerSizes: []int64{1 << 10}, Busybox: harness.BusyboxPath,
		Cmd: []string{"/bin/busybox", "sleep", "2147483647"}})
	if err != nil {
		t.Fatal(err)
	}
	web, err := reg.PushRandomImage(ctx, harness.ImageSpec{Repo: "coop/web", Tag: "1", LayerSizes: []int64{6 << 20, 3 << 20}, Busybox: harness.BusyboxPath})
	if err != nil {
		t.Fatal(err)
	}
	lap("images built and pushed")

	dir, err := os.MkdirTemp("", "coopk8s")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Logf("the cluster's logs are kept in %s", dir)
			return
		}
		os.RemoveAll(dir)
	}()
	cp, err := harness.StartControlPlane(ctx, kube, harness.ControlPlaneOptions{Dir: filepath.Join(dir, "cp"), Address: ctlIP,
		NetNS: topo.NSPath("ctl"), Controllers: true, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	lap("control plane ready")

	nodes := map[string]*harness.KubeNode{}
	for i, h := range kubeHosts[1:] {
		n, err := harness.StartKubeNode(ctx, harness.KubeNodeOptions{
			Name: h.Name, IP: h.IP, NetNS: topo.NSPath(h.Name), PodCIDR: fmt.Sprintf("198.19.%d.0/24", i+1),
			Dir: filepath.Join(dir, h.Name), ControlPlane: cp, Tools: tools, Kube: kube, SandboxImage: pause.Ref,
			Registries: []harness.Upstream{{Host: registryAddr, URL: reg.URL()}}, Logf: t.Logf,
		})
		if err != nil {
			t.Fatal(err)
		}
		defer n.Stop()
		nodes[h.Name] = n
	}
	lap("3 nodes Ready")

	if out, err := cp.Helm(ctx, "install", "coop", chartDir, "--namespace", namespace, "--create-namespace",
		"--set", "image.repository="+registryAddr+"/coop/coop", "--set", "image.tag=test",
		// No cluster DNS nor kube-proxy here: ClusterKB on n1's address.
		"--set", "kb.hostNetwork=true", "--set", "kb.endpoint="+kubeHosts[1].IP,
		"--set", "kb.nodeSelector.kubernetes\\.io/hostname=n1",
		"--set", "node.period=2s",
		"--wait", "--timeout", "3m"); err != nil {
		t.Fatalf("helm install: %v\n%s\n%s", err, out, describe(ctx, cp))
	}
	lap("chart installed: coop node Ready on 3 nodes, ClusterKB Ready")

	// A Deployment on n1 pulls from the registry. By digest: a tag is
	// resolved by the registry alone (coop's mirror serves content, never
	// names), and the registry goes away below.
	if _, err := cp.Kubectl(ctx, []byte(webDeployment(web.DigestRef, 1, "nodeSelector: {kubernetes.io/hostname: n1}")), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "rollout", "status", "deploy/web", "--timeout=3m"); err != nil {
		t.Fatalf("web on n1: %v\n%s", err, describe(ctx, cp))
	}
	lap("web Running on n1 (from the registry)")
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}

	// Scaled out with the registry gone: one pod on each node.
	spread := webDeployment(web.DigestRef, 3, "topologySpreadConstraints: [{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}]")
	if _, err := cp.Kubectl(ctx, []byte(spread), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "rollout", "status", "deploy/web", "--timeout=3m"); err != nil {
		t.Fatalf("web scaled out with the registry down: %v\n%s", err, describe(ctx, cp))
	}
	lap("web Running on 3 nodes with the registry down")
	// The busybox layer came with the sandbox image, from the registry.
	var want int64
	for _, l := range web.Layers {
		if !slices.ContainsFunc(pause.Layers, func(p harness.Blob) bool { return p.Digest == l.Digest }) {
			want += l.Size
		}
	}
	for _, name := range []string{"n2", "n3"} {
		s := coopStatus(ctx, t, cp, name)
		var fromPeers int64
		for _, v := range s.Bytes.FromPeers {
			fromPeers += v
		}
		if fromPeers < want {
			t.Errorf("%s: coop status says %d bytes from peers (%v), want at least the new layers' %d", name, fromPeers, s.Bytes.FromPeers, want)
		}
		if len(s.Problems) > 0 {
			t.Errorf("%s: coop status problems %q", name, s.Problems)
		}
	}

	// A coop pod deleted under running pods comes back; the pods run on.
	pod := coopPod(ctx, t, cp, "n2")
	if _, err := cp.Kubectl(ctx, nil, "-n", namespace, "delete", "pod", pod, "--wait=true"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "-n", namespace, "rollout", "status", "ds/coop-node", "--timeout=2m"); err != nil {
		t.Fatalf("coop node after its pod was deleted: %v\n%s", err, describe(ctx, cp))
	}
	out, err := cp.Kubectl(ctx, nil, "get", "pods", "-l", "app=web", "-o", `jsonpath={range .items[*]}{.spec.nodeName}={.status.phase}/{.status.containerStatuses[0].restartCount} {end}`)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range strings.Fields(out) {
		if !strings.HasSuffix(f, "=Running/0") {
			t.Errorf("web pods after coop's restart: %s, want every one Running with no restart", out)
			break
		}
	}
	if s := coopStatus(ctx, t, cp, "n2"); len(s.Problems) > 0 {
		t.Errorf("n2's new coop pod: problems %q", s.Problems)
	}
	lap("coop pod on n2 restarted; web pods untouched")
}

// webDeployment is the test's Deployment "web" of image, with replicas and
// one more line of pod spec (where its pods go).
func webDeployment(image string, replicas int, placement string) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: %d
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      %s
      containers: [{name: web, image: %q}]
`, replicas, placement, image)
}

// coopPod is the name of the coop node pod on node.
func coopPod(ctx context.Context, t *testing.T, cp *harness.ControlPlane, node string) string {
	t.Helper()
	out, err := cp.Kubectl(ctx, nil, "-n", namespace, "get", "pods", "-l", "app.kubernetes.io/name=coop-node",
		"--field-selector", "spec.nodeName="+node, "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil || strings.TrimSpace(out) == "" {
		t.Fatalf("coop pod on %s: %q, %v", node, out, err)
	}
	return strings.TrimSpace(out)
}

// coopStatus runs coop status --json in node's coop pod.
func coopStatus(ctx context.Context, t *testing.T, cp *harness.ControlPlane, nodeName string) node.Status {
	t.Helper()
	var s node.Status
	out, err := cp.Kubectl(ctx, nil, "-n", namespace, "exec", coopPod(ctx, t, cp, nodeName), "-c", "node", "--", "coop", "status", "--json")
	if jerr := json.Unmarshal([]byte(out), &s); jerr != nil {
		t.Fatalf("coop status on %s: %v, %v: %s", nodeName, err, jerr, out)
	}
	return s
}

// describe is what a failure shows of the cluster.
func describe(ctx context.Context, cp *harness.ControlPlane) string {
	var b strings.Builder
	for _, args := range [][]string{
		{"get", "nodes,pods", "-A", "-o", "wide"},
		{"get", "events", "-A", "--sort-by=.lastTimestamp"},
	} {
		out, err := cp.Kubectl(ctx, nil, args...)
		fmt.Fprintf(&b, "$ kubectl %s\n%s%v\n", strings.Join(args, " "), out, err)
	}
	return b.String()
}
