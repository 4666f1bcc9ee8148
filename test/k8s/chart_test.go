//go:build integration

// Package k8s tests coop on Kubernetes: its Helm chart against a real API
// server, and (TestCluster) the chart installed on a real cluster.
package k8s

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coopnet/coop/test/harness"
)

const (
	chartDir    = "../../contrib/helm/coop"
	kubeVersion = "1.37.2"
	namespace   = "coop-system"
)

// minimalCRDs lets the API server take the chart's cert-manager and
// Prometheus operator objects (their own schemas are not available here:
// only their group, version and kind are checked).
func minimalCRDs() string {
	var b strings.Builder
	for _, c := range []struct{ group, kind, plural string }{
		{"cert-manager.io", "Issuer", "issuers"},
		{"cert-manager.io", "Certificate", "certificates"},
		{"monitoring.coreos.com", "ServiceMonitor", "servicemonitors"},
	} {
		fmt.Fprintf(&b, `---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: %[3]s.%[1]s}
spec:
  group: %[1]s
  names: {kind: %[2]s, plural: %[3]s}
  scope: Namespaced
  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]
`, c.group, c.kind, c.plural)
	}
	return b.String()
}

// TestChart lints the chart, renders it with every mode and option that
// changes its objects, has a real API server validate every rendering
// (server-side dry run: the Kubernetes schemas, admission), refuses the
// values it must refuse, and checks what the default rendering promises.
func TestChart(t *testing.T) {
	tools, err := harness.FindKubeTools()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cp, err := harness.StartControlPlane(ctx, tools, harness.ControlPlaneOptions{Dir: t.TempDir(), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	if out, err := cp.Helm(ctx, "lint", "--strict", "--kube-version", kubeVersion, chartDir); err != nil {
		t.Fatalf("helm lint: %v\n%s", err, out)
	}
	if _, err := cp.Kubectl(ctx, []byte(minimalCRDs()), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "create", "namespace", namespace); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Kubectl(ctx, nil, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		set  []string
		// refused: helm template must fail with this in its message.
		refused string
		check   func(t *testing.T, objs []object)
	}{
		{name: "defaults: host mode, claims", check: checkHostMode(hostMode{claim: true, restart: "systemd"})},
		{name: "observer", set: []string{"node.contentMode=observer"}, check: checkObserver},
		{name: "CA from a secret", set: []string{"tls.ca.source=secret", "tls.ca.secretName=my-ca"}, check: func(t *testing.T, objs []object) {
			if find(objs, "Secret", "") != nil {
				t.Error("a CA Secret is rendered although the operator gives one")
			}
			ds := find(objs, "DaemonSet", "")
			if !strings.Contains(ds.raw, `"secretName":"my-ca"`) {
				t.Error("the DaemonSet does not mount the operator's CA Secret")
			}
		}},
		{name: "CA from cert-manager", set: []string{"tls.ca.source=cert-manager"}, check: func(t *testing.T, objs []object) {
			if find(objs, "Certificate", "") == nil || find(objs, "Issuer", "") == nil {
				t.Error("no cert-manager Issuer and Certificate")
			}
			if !strings.Contains(find(objs, "DaemonSet", "").raw, `"key":"tls.key","path":"ca.key"`) {
				t.Error("the CA's tls.key is not mounted as ca.key")
			}
		}},
		{name: "without TLS", set: []string{"tls.enabled=false"}, check: func(t *testing.T, objs []object) {
			ds := find(objs, "DaemonSet", "")
			if !slices.Contains(ds.args("node"), "--insecure") || strings.Contains(ds.raw, "--tls-dir") {
				t.Errorf("node args %q: want --insecure and no --tls-dir", ds.args("node"))
			}
		}},
		{name: "online index, pull feed, metrics, options", set: []string{"node.index=online", "kb.feed=pull", "metrics.serviceMonitor.enabled=true",
			"node.shareNamespaces={k8s.io}", "node.serveContainers={k8s.io}", "node.allowRemoteStop=true", "node.extraArgs={--claim-parallel=2}",
			"containerd.registries={docker.io,_default}", "image.digest=sha256:" + strings.Repeat("a", 64)}, check: func(t *testing.T, objs []object) {
			if n := count(objs, "ServiceMonitor"); n != 2 {
				t.Errorf("%d ServiceMonitors, want 2 (nodes and ClusterKB)", n)
			}
			ds := find(objs, "DaemonSet", "")
			for _, want := range []string{"--index=online", "--share-namespaces=k8s.io", "--serve-containers=k8s.io", "--allow-remote-stop", "--claim-parallel=2"} {
				if !slices.Contains(ds.args("node"), want) {
					t.Errorf("node args %q lack %s", ds.args("node"), want)
				}
			}
			if slices.ContainsFunc(ds.args("node"), func(a string) bool { return strings.HasPrefix(a, "--nats-url") }) {
				t.Error("a pull-fed ClusterKB, yet the nodes publish to a broker")
			}
			if !strings.Contains(ds.raw, "@sha256:aaaa") {
				t.Error("the image is not pulled by digest")
			}
		}},
		{name: "nodes only, no index", set: []string{"kb.enabled=false", "node.index=none"}, check: func(t *testing.T, objs []object) {
			if find(objs, "Deployment", "") != nil {
				t.Error("ClusterKB rendered although disabled")
			}
		}},
		{name: "host mode, no claims", set: []string{"node.claim=false"}, check: checkHostMode(hostMode{restart: "systemd"})},
		{name: "host mode, claim, files only", set: []string{"node.contentMode=proxy", "node.claim=true", "node.host.restart=none"},
			check: checkHostMode(hostMode{claim: true, restart: "none"})},
		{name: "host mode, credentials", set: []string{"node.registryCredentials=/etc/coop/registry.json"},
			check: checkHostMode(hostMode{claim: true, restart: "systemd", credentials: "/etc/coop/registry.json"})},
		{name: "host mode, uninstall", set: []string{"node.host.uninstall=true"}, check: checkHostMode(hostMode{claim: true, restart: "systemd", uninstall: true})},
		{name: "credentials without claims", set: []string{"node.claim=false", "node.registryCredentials=/etc/coop/r.json"}, refused: "node.registryCredentials: only claims"},
		{name: "credentials in observer mode", set: []string{"node.contentMode=observer", "node.registryCredentials=/etc/coop/r.json"}, refused: "node.registryCredentials: only claims"},
		{name: "unknown content mode", set: []string{"node.contentMode=bogus"}, refused: `node.contentMode "bogus"`},
		{name: "unknown host restart", set: []string{"node.host.restart=bogus"}, refused: `node.host.restart "bogus"`},
		{name: "unknown index", set: []string{"node.index=gossip"}, refused: `node.index "gossip"`},
		{name: "kb index without ClusterKB", set: []string{"kb.enabled=false"}, refused: "set kb.enabled"},
		{name: "unknown CA source", set: []string{"tls.ca.source=vault"}, refused: `tls.ca.source "vault"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"template", "coop", chartDir, "--namespace", namespace, "--kube-version", kubeVersion}
			for _, s := range tc.set {
				args = append(args, "--set", s)
			}
			rendered, err := cp.Helm(ctx, args...)
			if tc.refused != "" {
				if err == nil || !strings.Contains(err.Error(), tc.refused) {
					t.Fatalf("helm template with %q: %v; want a refusal naming %q", tc.set, err, tc.refused)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			out, err := cp.Kubectl(ctx, []byte(rendered), "apply", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-")
			if err != nil {
				t.Fatalf("the API server refused the rendering: %v", err)
			}
			objs, err := parseObjects(out)
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, objs)
		})
	}
}

// checkObserver: what an observer rendering promises (no privilege, no
// restart of containerd).
func checkObserver(t *testing.T, objs []object) {
	ds := find(objs, "DaemonSet", "")
	if ds == nil {
		t.Fatal("no DaemonSet")
	}
	var spec struct {
		Spec struct {
			Template struct {
				Spec struct {
					HostNetwork    bool `json:"hostNetwork"`
					InitContainers []struct {
						Name string `json:"name"`
					} `json:"initContainers"`
					Containers []struct {
						Name            string `json:"name"`
						SecurityContext struct {
							Privileged               *bool `json:"privileged"`
							AllowPrivilegeEscalation *bool `json:"allowPrivilegeEscalation"`
							Capabilities             struct {
								Drop []string `json:"drop"`
							} `json:"capabilities"`
						} `json:"securityContext"`
					} `json:"containers"`
				} `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	if err := json.Unmarshal([]byte(ds.raw), &spec); err != nil {
		t.Fatal(err)
	}
	ps := spec.Spec.Template.Spec
	if !ps.HostNetwork {
		t.Error("coop node is not on the host network: containerd could not reach its mirror on loopback")
	}
	var inits []string
	for _, c := range ps.InitContainers {
		inits = append(inits, c.Name)
	}
	if !slices.Equal(inits, []string{"certificate", "containerd-hosts"}) {
		t.Errorf("init containers %q, want certificate then containerd-hosts", inits)
	}
	sc := ps.Containers[0].SecurityContext
	if (sc.Privileged != nil && *sc.Privileged) || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Errorf("coop node's security context %+v: want no privilege and every capability dropped", sc)
	}
	for _, want := range []string{"--content-mode=observer", "--tls-dir=/tls", "--index=kb", "--neighbors-from-kb"} {
		if !slices.Contains(ds.args("node"), want) {
			t.Errorf("node args %q lack %s", ds.args("node"), want)
		}
	}
	if find(objs, "Secret", "") == nil || find(objs, "Deployment", "") == nil || count(objs, "Service") != 2 {
		t.Error("want the CA Secret, ClusterKB's Deployment and two Services")
	}
}

// hostMode is what a proxy (host mode) rendering was asked for.
type hostMode struct {
	claim       bool
	restart     string
	uninstall   bool
	credentials string
}

// checkHostMode: what a proxy rendering promises. One privileged install
// container, root, with the host's / at /host, that installs coop node on
// the host (every path in its node args a host path) and waits; the
// certificate is issued into a host directory, where the host's coop reads
// it; no volume of the pod's coop node is left.
func checkHostMode(want hostMode) func(t *testing.T, objs []object) {
	return func(t *testing.T, objs []object) {
		ds := find(objs, "DaemonSet", "")
		if ds == nil {
			t.Fatal("no DaemonSet")
		}
		type mount struct {
			Name             string `json:"name"`
			MountPath        string `json:"mountPath"`
			MountPropagation string `json:"mountPropagation"`
		}
		type container struct {
			Name            string          `json:"name"`
			Args            []string        `json:"args"`
			ReadinessProbe  json.RawMessage `json:"readinessProbe"`
			LivenessProbe   json.RawMessage `json:"livenessProbe"`
			SecurityContext struct {
				Privileged *bool  `json:"privileged"`
				RunAsUser  *int64 `json:"runAsUser"`
			} `json:"securityContext"`
			VolumeMounts []mount `json:"volumeMounts"`
		}
		var spec struct {
			Spec struct {
				Template struct {
					Spec struct {
						HostNetwork     bool `json:"hostNetwork"`
						SecurityContext struct {
							RunAsUser *int64 `json:"runAsUser"`
						} `json:"securityContext"`
						InitContainers []container `json:"initContainers"`
						Containers     []container `json:"containers"`
						Volumes        []struct {
							Name     string `json:"name"`
							HostPath *struct {
								Path string `json:"path"`
							} `json:"hostPath"`
						} `json:"volumes"`
					} `json:"spec"`
				} `json:"template"`
			} `json:"spec"`
		}
		if err := json.Unmarshal([]byte(ds.raw), &spec); err != nil {
			t.Fatal(err)
		}
		ps := spec.Spec.Template.Spec
		if !ps.HostNetwork {
			t.Error("not on the host network: the readiness probe would not reach the host's coop node")
		}
		if len(ps.Containers) != 1 || ps.Containers[0].Name != "install" {
			t.Fatalf("%d containers, the first %q: want the install container alone", len(ps.Containers), ps.Containers[0].Name)
		}
		in := ps.Containers[0]
		if sc := in.SecurityContext; sc.Privileged == nil || !*sc.Privileged {
			t.Error("the install container is not privileged: it could not write the host's files nor run its systemctl")
		}
		if uid := cmp.Or(in.SecurityContext.RunAsUser, ps.SecurityContext.RunAsUser); uid == nil || *uid != 0 {
			t.Error("the install container does not run as root")
		}
		if !slices.Contains(in.VolumeMounts, mount{Name: "host", MountPath: "/host", MountPropagation: "HostToContainer"}) {
			t.Errorf("install mounts %+v: want the host volume at /host, HostToContainer", in.VolumeMounts)
		}
		if len(in.LivenessProbe) != 0 {
			t.Error("a liveness probe: a new pod would not mend the host's coop node")
		}
		if want.uninstall != (len(in.ReadinessProbe) == 0) {
			t.Errorf("readiness probe %s; want one unless uninstalling (uninstall %v)", in.ReadinessProbe, want.uninstall)
		}

		// install [flags] -- node [node flags]
		sep := slices.Index(in.Args, "--")
		if sep < 0 || in.Args[0] != "install" || sep+1 >= len(in.Args) || in.Args[sep+1] != "node" {
			t.Fatalf("install args %q: want install [flags] -- node [flags]", in.Args)
		}
		flags, nodeArgs := in.Args[:sep], in.Args[sep+1:]
		for _, w := range []string{"--host-root=/host", "--hosts-dir=/etc/containerd/certs.d", "--config-dir=/etc/coop", "--restart=" + want.restart, "--wait"} {
			if !slices.Contains(flags, w) {
				t.Errorf("install flags %q lack %s", flags, w)
			}
		}
		if slices.Contains(flags, "--uninstall") != want.uninstall {
			t.Errorf("install flags %q: --uninstall %v, want %v", flags, !want.uninstall, want.uninstall)
		}
		for _, w := range []string{"--content-mode=proxy", "--tls-dir=/etc/coop/tls", "--root=/var/lib/coop",
			"--containerd-address=/run/containerd/containerd.sock", "--content-socket=/run/coop/content.sock", "--name=$(NODE_NAME)"} {
			if !slices.Contains(nodeArgs, w) {
				t.Errorf("node args %q lack %s", nodeArgs, w)
			}
		}
		for _, w := range []string{"--claim", "--claim-parallel=3", "--claim-registry=true", "--hosts-dir=/etc/containerd/certs.d"} {
			if slices.Contains(nodeArgs, w) != want.claim {
				t.Errorf("node args %q: %s %v, want %v", nodeArgs, w, !want.claim, want.claim)
			}
		}
		if slices.Contains(nodeArgs, "--claim=false") == want.claim {
			t.Errorf("node args %q: claims off must be said (coop node claims by default)", nodeArgs)
		}
		if got := slices.Contains(nodeArgs, "--registry-credentials="+want.credentials); got != (want.credentials != "") {
			t.Errorf("node args %q: credentials %q", nodeArgs, want.credentials)
		}

		hostPaths := map[string]string{}
		defined := map[string]bool{}
		for _, v := range ps.Volumes {
			defined[v.Name] = true
			if v.HostPath != nil {
				hostPaths[v.Name] = v.HostPath.Path
			}
		}
		if hostPaths["host"] != "/" {
			t.Errorf("the host volume is hostPath %q, want /", hostPaths["host"])
		}
		var certificate *container
		used := map[string]bool{}
		for i, c := range append(slices.Clone(ps.InitContainers), ps.Containers...) {
			if i < len(ps.InitContainers) && c.Name == "certificate" {
				certificate = &ps.InitContainers[i]
			}
			for _, m := range c.VolumeMounts {
				used[m.Name] = true
				if !defined[m.Name] {
					t.Errorf("%s mounts volume %q, which is not defined", c.Name, m.Name)
				}
			}
		}
		for v := range defined {
			if !used[v] {
				t.Errorf("volume %q is defined but mounted nowhere", v)
			}
		}
		if certificate == nil {
			t.Fatal("no certificate init container")
		}
		out := ""
		for _, m := range certificate.VolumeMounts {
			if slices.Contains(certificate.Args, "--out="+m.MountPath) {
				out = m.Name
			}
		}
		if hostPaths[out] != "/etc/coop/tls" {
			t.Errorf("the certificate init writes into volume %q (hostPath %q), want hostPath /etc/coop/tls", out, hostPaths[out])
		}
	}
}

// object is one object the API server returned.
type object struct {
	Kind     string `json:"kind"`
	Metadata struct {
		Name string `json:"name"`
	} `json:"metadata"`
	raw string
}

// args returns the args of the container named c.
func (o *object) args(c string) []string {
	var v struct {
		Spec struct {
			Template struct {
				Spec struct {
					Containers []struct {
						Name string   `json:"name"`
						Args []string `json:"args"`
					} `json:"containers"`
				} `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	_ = json.Unmarshal([]byte(o.raw), &v)
	for _, ct := range v.Spec.Template.Spec.Containers {
		if ct.Name == c {
			return ct.Args
		}
	}
	for _, ct := range v.Spec.Template.Spec.Containers {
		// Host mode: coop node's args follow install's, after --.
		if sep := slices.Index(ct.Args, "--"); c == "node" && ct.Name == "install" && sep >= 0 {
			return ct.Args[sep+1:]
		}
	}
	return nil
}

// parseObjects reads kubectl's -o json output: one object, or a List.
func parseObjects(out string) ([]object, error) {
	var list struct {
		Kind  string            `json:"kind"`
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, err
	}
	raws := list.Items
	if list.Kind != "List" {
		raws = []json.RawMessage{json.RawMessage(out)}
	}
	var objs []object
	for _, r := range raws {
		var o object
		if err := json.Unmarshal(r, &o); err != nil {
			return nil, err
		}
		var compact strings.Builder
		var v any
		_ = json.Unmarshal(r, &v)
		b, _ := json.Marshal(v)
		compact.Write(b)
		o.raw = compact.String()
		objs = append(objs, o)
	}
	return objs, nil
}

func find(objs []object, kind, name string) *object {
	for i := range objs {
		if objs[i].Kind == kind && (name == "" || objs[i].Metadata.Name == name) {
			return &objs[i]
		}
	}
	return nil
}

func count(objs []object, kind string) int {
	n := 0
	for _, o := range objs {
		if o.Kind == kind {
			n++
		}
	}
	return n
}
