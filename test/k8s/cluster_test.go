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
	// Claim mode's image: layers of 1 MiB or more are claimed.
	web2, err := reg.PushRandomImage(ctx, harness.ImageSpec{Repo: "coop/web2", Tag: "1", LayerSizes: []int64{5 << 20, 2 << 20}, Busybox: harness.BusyboxPath})
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
		"--set", "node.period=2s", "--set", "node.contentMode=observer",
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
	if t.Failed() {
		return
	}
	testClaimMode(ctx, t, cp, reg, nodes, pause, web2, lap)
}

// testClaimMode upgrades the chart to claim mode: on each node, in turn,
// the chart's pod runs coop install (--restart none: the test nodes have no
// systemd, ApplyInstall does its part), which moves containerd's blobs into
// coop's store; coop node then runs on the host and containerd on coop's
// store. Then: the pods of the observer phase run on; a Deployment on n1
// pulls from the registry; scaled out with the registry gone, n2 and n3
// claim its layers from n1; coop killed on n2 under running pods comes back
// and nothing breaks.
func testClaimMode(ctx context.Context, t *testing.T, cp *harness.ControlPlane, reg *harness.Registry, nodes map[string]*harness.KubeNode, pause, web2 *harness.Image, lap func(string)) {
	if err := reg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// systemd's part, for each node whose pod has installed.
	applyCtx, stopApply := context.WithCancel(ctx)
	applied := make(chan error, 1)
	go func() {
		defer close(applied)
		for {
			for _, n := range nodes {
				if _, err := n.ApplyInstall(applyCtx); err != nil && applyCtx.Err() == nil {
					applied <- err
					return
				}
			}
			select {
			case <-applyCtx.Done():
				return
			case <-time.After(300 * time.Millisecond):
			}
		}
	}()
	out, err := cp.Helm(ctx, "upgrade", "coop", chartDir, "--namespace", namespace, "--reuse-values",
		"--set", "node.contentMode=proxy", "--set", "node.claim=true", "--set", "node.host.restart=none",
		"--wait", "--timeout", "4m")
	if err == nil {
		// helm's wait takes a DaemonSet with maxUnavailable pods not
		// Ready yet.
		out, err = cp.Kubectl(ctx, nil, "-n", namespace, "rollout", "status", "ds/coop-node", "--timeout=3m")
	}
	stopApply()
	if aerr := <-applied; aerr != nil {
		t.Fatalf("applying coop install: %v", aerr)
	}
	if err != nil {
		t.Fatalf("helm upgrade to claim mode: %v\n%s\n%s", err, out, describe(ctx, cp))
	}
	lap("chart upgraded to claim mode: coop installed on 3 hosts, containerd on coop's store")
	for name, n := range nodes {
		if _, err := os.Stat(filepath.Join(n.Dir(), "units", "coop-node.service")); err != nil {
			t.Errorf("%s: no unit: %v", name, err)
		}
		// containerd's blobs are coop's now: the sandbox image's among them.
		for _, l := range pause.Layers {
			if _, err := os.Stat(filepath.Join(n.Dir(), "coop", "blobs", "sha256", l.Digest.Encoded())); err != nil {
				t.Errorf("%s: the sandbox image's layer is not in coop's store: %v", name, err)
			}
		}
	}
	checkWebPods(ctx, t, cp, "web", "after containerd moved onto coop's store")

	if _, err := cp.Kubectl(ctx, []byte(deployment("web2", web2.DigestRef, 1, "nodeSelector: {kubernetes.io/hostname: n1}")), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "rollout", "status", "deploy/web2", "--timeout=3m"); err != nil {
		t.Fatalf("web2 on n1: %v\n%s", err, describe(ctx, cp))
	}
	lap("web2 Running on n1 (from the registry, into coop's store)")
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	spread := deployment("web2", web2.DigestRef, 3, "topologySpreadConstraints: [{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web2}}}]")
	if _, err := cp.Kubectl(ctx, []byte(spread), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "rollout", "status", "deploy/web2", "--timeout=3m"); err != nil {
		t.Fatalf("web2 scaled out with the registry down: %v\n%s", err, describe(ctx, cp))
	}
	lap("web2 Running on 3 nodes with the registry down")
	// Claimed: the new layers of 1 MiB or more (the busybox layer came
	// with the sandbox image).
	var claimable int
	for _, l := range web2.Layers {
		if l.Size >= 1<<20 && !slices.ContainsFunc(pause.Layers, func(p harness.Blob) bool { return p.Digest == l.Digest }) {
			claimable++
		}
	}
	for _, name := range []string{"n2", "n3"} {
		s := coopStatusIn(ctx, t, cp, name, "install")
		if s.ContentMode != "proxy" || s.Claims["done"] < int64(claimable) || s.Claims["failed"] > 0 {
			t.Errorf("%s: coop status says mode %q, claims %+v; want proxy and %d claims done, none failed", name, s.ContentMode, s.Claims, claimable)
		}
		if len(s.Problems) > 0 {
			t.Errorf("%s: coop status problems %q", name, s.Problems)
		}
	}

	// coop killed on n2 under running pods: systemd starts it again,
	// containerd reconnects, the pods run on.
	if err := nodes["n2"].RestartHostCoop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "-n", namespace, "rollout", "status", "ds/coop-node", "--timeout=2m"); err != nil {
		t.Fatalf("coop node after a restart on n2: %v\n%s", err, describe(ctx, cp))
	}
	checkWebPods(ctx, t, cp, "web", "after coop's restart on n2")
	checkWebPods(ctx, t, cp, "web2", "after coop's restart on n2")
	if s := coopStatusIn(ctx, t, cp, "n2", "install"); len(s.Problems) > 0 {
		t.Errorf("n2's coop after its restart: problems %q", s.Problems)
	}
	lap("coop on n2 killed and restarted; web and web2 pods untouched")
}

// checkWebPods fails unless every pod of app runs with no restart.
func checkWebPods(ctx context.Context, t *testing.T, cp *harness.ControlPlane, app, when string) {
	t.Helper()
	out, err := cp.Kubectl(ctx, nil, "get", "pods", "-l", "app="+app, "-o", `jsonpath={range .items[*]}{.spec.nodeName}={.status.phase}/{.status.containerStatuses[0].restartCount} {end}`)
	if err != nil {
		t.Fatal(err)
	}
	if len(strings.Fields(out)) == 0 {
		t.Errorf("%s pods %s: none", app, when)
	}
	for _, f := range strings.Fields(out) {
		if !strings.HasSuffix(f, "=Running/0") {
			t.Errorf("%s pods %s: %s, want every one Running with no restart", app, when, out)
			break
		}
	}
}

// webDeployment is the test's Deployment "web" of image, with replicas and
// one more line of pod spec (where its pods go).
func webDeployment(image string, replicas int, placement string) string {
	return deployment("web", image, replicas, placement)
}

// deployment is a Deployment name of image, with replicas and one more line
// of pod spec; its pods are labelled app=name.
func deployment(name, image string, replicas int, placement string) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s, namespace: default}
spec:
  replicas: %[2]d
  selector: {matchLabels: {app: %[1]s}}
  template:
    metadata: {labels: {app: %[1]s}}
    spec:
      %[3]s
      containers: [{name: %[1]s, image: %[4]q}]
`, name, replicas, placement, image)
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
	return coopStatusIn(ctx, t, cp, nodeName, "node")
}

// coopStatusIn runs coop status --json in the container of node's coop pod
// ("install" in proxy mode: it asks the coop node on the host).
func coopStatusIn(ctx context.Context, t *testing.T, cp *harness.ControlPlane, nodeName, container string) node.Status {
	t.Helper()
	var s node.Status
	out, err := cp.Kubectl(ctx, nil, "-n", namespace, "exec", coopPod(ctx, t, cp, nodeName), "-c", container, "--", "coop", "status", "--json")
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
