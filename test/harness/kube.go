package harness

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// KubeTools are the Kubernetes binaries `make k8s-tools` builds into
// bin/k8s (test/k8s/tools.sh).
type KubeTools struct {
	Dir                                                                   string
	APIServer, ControllerManager, Scheduler, Kubelet, Kubectl, Etcd, Helm string
}

// FindKubeTools finds the Kubernetes binaries under $COOP_BIN/k8s (default
// bin/k8s of the repository), failing with what is missing.
func FindKubeTools() (*KubeTools, error) {
	bin := os.Getenv(BinEnv)
	if bin == "" {
		root, err := repoRoot()
		if err != nil {
			return nil, err
		}
		bin = filepath.Join(root, "bin")
	}
	dir := filepath.Join(bin, "k8s")
	t := &KubeTools{Dir: dir}
	var missing []string
	for name, p := range map[string]*string{
		"kube-apiserver": &t.APIServer, "kube-controller-manager": &t.ControllerManager, "kube-scheduler": &t.Scheduler,
		"kubelet": &t.Kubelet, "kubectl": &t.Kubectl, "etcd": &t.Etcd, "helm": &t.Helm,
	} {
		*p = filepath.Join(dir, name)
		if !isExecutable(*p) {
			missing = append(missing, *p)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing %s: run make k8s-tools", strings.Join(missing, ", "))
	}
	return t, nil
}

// ControlPlaneOptions configure a ControlPlane.
type ControlPlaneOptions struct {
	// Dir holds its data, certificates and logs. Required.
	Dir string
	// Address is where the API server listens and what it advertises.
	// Default 127.0.0.1.
	Address string
	// ServiceCIDR is the Services' range. Default 198.19.128.0/24.
	ServiceCIDR string
	// Controllers also starts kube-controller-manager and kube-scheduler
	// (what a Deployment or a DaemonSet needs); the API server alone
	// validates manifests.
	Controllers bool
	// NetNS, when set, is the network namespace the control plane runs in
	// (and kubectl and helm with it).
	NetNS string
	// Logf, if set, receives progress lines.
	Logf func(format string, args ...any)
}

// ControlPlane is a real Kubernetes control plane: etcd, kube-apiserver
// and, optionally, kube-controller-manager and kube-scheduler, on one
// address, with one CA. Stop ends it.
type ControlPlane struct {
	opts  ControlPlaneOptions
	tools *KubeTools
	// Kubeconfig is the cluster admin's kubeconfig.
	Kubeconfig string
	// URL is the API server's URL.
	URL string
	// CACert is the cluster CA's certificate (PEM, in Dir/pki).
	CACert string
	ca     *kubeCA
	procs  []*process
}

// StartControlPlane starts etcd and the API server (and the controllers)
// and waits until the API server is ready.
func StartControlPlane(ctx context.Context, tools *KubeTools, o ControlPlaneOptions) (_ *ControlPlane, retErr error) {
	if o.Dir == "" {
		return nil, errors.New("control plane needs a directory")
	}
	if o.Address == "" {
		o.Address = "127.0.0.1"
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = "198.19.128.0/24"
	}
	cp := &ControlPlane{opts: o, tools: tools}
	defer func() {
		if retErr != nil {
			cp.Stop()
		}
	}()
	pki := filepath.Join(o.Dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, err
	}
	ca, err := newKubeCA(pki)
	if err != nil {
		return nil, err
	}
	cp.CACert, cp.ca = ca.certPath, ca
	// In a namespace of its own the standard ports are free; here, any.
	apiPort, etcdPort, peerPort := 6443, 2379, 2380
	if o.NetNS == "" {
		ports, err := freePorts(3)
		if err != nil {
			return nil, err
		}
		for i, p := range []*int{&apiPort, &etcdPort, &peerPort} {
			_, port, _ := net.SplitHostPort(ports[i])
			*p, _ = strconv.Atoi(port)
		}
	}
	cp.URL = "https://" + net.JoinHostPort(o.Address, strconv.Itoa(apiPort))
	svcIP, err := firstServiceIP(o.ServiceCIDR)
	if err != nil {
		return nil, err
	}
	if err := ca.issue(pki, "apiserver", kubeCert{cn: "kube-apiserver", server: true,
		ips: []net.IP{net.ParseIP(o.Address), svcIP, net.ParseIP("127.0.0.1")},
		dns: []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"}}); err != nil {
		return nil, err
	}
	for name, c := range map[string]kubeCert{
		"admin":              {cn: "coop-test-admin", org: "system:masters"},
		"apiserver-kubelet":  {cn: "kube-apiserver-kubelet-client", org: "system:masters"},
		"controller-manager": {cn: "system:kube-controller-manager"},
		"scheduler":          {cn: "system:kube-scheduler"},
	} {
		if err := ca.issue(pki, name, c); err != nil {
			return nil, err
		}
	}
	if err := writeServiceAccountKey(pki); err != nil {
		return nil, err
	}
	for _, name := range []string{"admin", "controller-manager", "scheduler"} {
		if err := cp.WriteKubeconfig(filepath.Join(o.Dir, name+".kubeconfig"), filepath.Join(pki, name+".crt"), filepath.Join(pki, name+".key")); err != nil {
			return nil, err
		}
	}
	cp.Kubeconfig = filepath.Join(o.Dir, "admin.kubeconfig")

	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	start := time.Now()
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	if err := cp.start("etcd", tools.Etcd, "--name=coop-test", "--data-dir="+filepath.Join(o.Dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		fmt.Sprintf("--listen-peer-urls=http://127.0.0.1:%d", peerPort), fmt.Sprintf("--initial-advertise-peer-urls=http://127.0.0.1:%d", peerPort),
		fmt.Sprintf("--initial-cluster=coop-test=http://127.0.0.1:%d", peerPort),
		"--unsafe-no-fsync", "--log-level=warn"); err != nil {
		return nil, err
	}
	p := func(name string) string { return filepath.Join(pki, name) }
	reconciler := "lease"
	if ip := net.ParseIP(o.Address); ip != nil && ip.IsLoopback() {
		reconciler = "none" // the kubernetes Service cannot point at loopback
	}
	if err := cp.start("kube-apiserver", tools.APIServer, "--endpoint-reconciler-type="+reconciler,
		"--etcd-servers="+etcdURL,
		"--bind-address="+o.Address, "--advertise-address="+o.Address, fmt.Sprintf("--secure-port=%d", apiPort),
		"--service-cluster-ip-range="+o.ServiceCIDR,
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
		"--client-ca-file="+p("ca.crt"), "--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--kubelet-client-certificate="+p("apiserver-kubelet.crt"), "--kubelet-client-key="+p("apiserver-kubelet.key"),
		"--kubelet-certificate-authority="+p("ca.crt"), "--kubelet-preferred-address-types=InternalIP,Hostname",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--profiling=false", "--v=1"); err != nil {
		return nil, err
	}
	if err := cp.waitReady(ctx); err != nil {
		return nil, err
	}
	logf("control plane: API server ready at %s in %v", cp.URL, time.Since(start).Round(10*time.Millisecond))
	if o.Controllers {
		if err := cp.start("kube-controller-manager", tools.ControllerManager,
			"--kubeconfig="+filepath.Join(o.Dir, "controller-manager.kubeconfig"),
			"--authentication-kubeconfig="+filepath.Join(o.Dir, "controller-manager.kubeconfig"),
			"--authorization-kubeconfig="+filepath.Join(o.Dir, "controller-manager.kubeconfig"),
			"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
			"--use-service-account-credentials", "--root-ca-file="+p("ca.crt"),
			"--service-account-private-key-file="+p("sa.key"),
			"--cluster-signing-cert-file="+p("ca.crt"), "--cluster-signing-key-file="+p("ca.key"),
			"--v=1"); err != nil {
			return nil, err
		}
		if err := cp.start("kube-scheduler", tools.Scheduler,
			"--kubeconfig="+filepath.Join(o.Dir, "scheduler.kubeconfig"),
			"--authentication-kubeconfig="+filepath.Join(o.Dir, "scheduler.kubeconfig"),
			"--authorization-kubeconfig="+filepath.Join(o.Dir, "scheduler.kubeconfig"),
			"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0", "--v=1"); err != nil {
			return nil, err
		}
	}
	return cp, nil
}

// command returns bin with args, inside the control plane's network
// namespace when it has one.
func (cp *ControlPlane) command(bin string, args ...string) (string, []string) {
	if cp.opts.NetNS == "" {
		return bin, args
	}
	return "nsenter", append([]string{"--net=" + cp.opts.NetNS, bin}, args...)
}

func (cp *ControlPlane) start(name, bin string, args ...string) error {
	bin, args = cp.command(bin, args...)
	p, err := startProcess(name, filepath.Join(cp.opts.Dir, name+".log"), os.Environ(), bin, args...)
	if err != nil {
		return err
	}
	cp.procs = append(cp.procs, p)
	return nil
}

// waitReady asks /readyz (through kubectl, from the control plane's
// namespace) for up to a minute.
func (cp *ControlPlane) waitReady(ctx context.Context) error {
	api := cp.procs[len(cp.procs)-1]
	err := waitReadyEvery(ctx, time.Minute, 200*time.Millisecond, api, func(ctx context.Context) error {
		out, err := cp.Kubectl(ctx, nil, "get", "--raw=/readyz", "--request-timeout=2s")
		if err == nil && strings.TrimSpace(out) != "ok" {
			err = fmt.Errorf("readyz: %q", out)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("%w; its log: %s", err, tailFile(api.logPath, 20))
	}
	return nil
}

// Kubectl runs kubectl as the cluster admin and returns its stdout.
func (cp *ControlPlane) Kubectl(ctx context.Context, stdin []byte, args ...string) (string, error) {
	var in io.Reader
	if stdin != nil {
		in = bytes.NewReader(stdin)
	}
	bin, full := cp.command(cp.tools.Kubectl, append([]string{"--kubeconfig=" + cp.Kubeconfig}, args...)...)
	return runCommandInput(ctx, os.Environ(), in, nil, bin, full...)
}

// Helm runs helm against the cluster and returns its stdout; its caches
// live in the control plane's directory.
func (cp *ControlPlane) Helm(ctx context.Context, args ...string) (string, error) {
	home := filepath.Join(cp.opts.Dir, "helm")
	env := append(os.Environ(), "HELM_CACHE_HOME="+home+"/cache", "HELM_CONFIG_HOME="+home+"/config", "HELM_DATA_HOME="+home+"/data")
	bin, full := cp.command(cp.tools.Helm, append([]string{"--kubeconfig=" + cp.Kubeconfig}, args...)...)
	return runCommandInput(ctx, env, nil, nil, bin, full...)
}

// WriteKubeconfig writes a kubeconfig for the API server with the client
// certificate cert and key.
func (cp *ControlPlane) WriteKubeconfig(path, cert, key string) error {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: coop-test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: u
  user: {client-certificate: %q, client-key: %q}
contexts:
- name: c
  context: {cluster: coop-test, user: u}
current-context: c
`, cp.URL, cp.CACert, cert, key)
	return os.WriteFile(path, []byte(kc), 0o600)
}

// Stop ends the control plane's processes, last started first.
func (cp *ControlPlane) Stop() {
	for i := len(cp.procs) - 1; i >= 0; i-- {
		_ = cp.procs[i].stop(5 * time.Second)
	}
	cp.procs = nil
}

// kubeCA is the test cluster's CA.
type kubeCA struct {
	cert              *x509.Certificate
	key               *ecdsa.PrivateKey
	certPath, keyPath string
}

type kubeCert struct {
	cn, org string
	server  bool
	ips     []net.IP
	dns     []string
}

func newKubeCA(dir string) (*kubeCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "coop-test-kubernetes-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(7 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	ca := &kubeCA{cert: cert, key: key, certPath: filepath.Join(dir, "ca.crt"), keyPath: filepath.Join(dir, "ca.key")}
	if err := writePEMFile(ca.certPath, "CERTIFICATE", der); err != nil {
		return nil, err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return ca, writePEMFile(ca.keyPath, "EC PRIVATE KEY", kder)
}

// issue writes dir/name.crt and dir/name.key.
func (ca *kubeCA) issue(dir, name string, c kubeCert) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 100))
	if err != nil {
		return err
	}
	subj := pkix.Name{CommonName: c.cn}
	if c.org != "" {
		subj.Organization = []string{c.org}
	}
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: subj, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(7 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		IPAddresses: c.ips, DNSNames: c.dns}
	if c.server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return err
	}
	if err := writePEMFile(filepath.Join(dir, name+".crt"), "CERTIFICATE", der); err != nil {
		return err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEMFile(filepath.Join(dir, name+".key"), "EC PRIVATE KEY", kder)
}

// IssueKubelet writes dir/kubelet.crt and .key for node name (the Node
// authorizer's system:node:<name>, serving its IP too) and a kubeconfig.
func (cp *ControlPlane) IssueKubelet(dir, name string, ip net.IP) (kubeconfig string, err error) {
	if err := cp.ca.issue(dir, "kubelet", kubeCert{cn: "system:node:" + name, org: "system:nodes", server: true, ips: []net.IP{ip}, dns: []string{name}}); err != nil {
		return "", err
	}
	kubeconfig = filepath.Join(dir, "kubelet.kubeconfig")
	return kubeconfig, cp.WriteKubeconfig(kubeconfig, filepath.Join(dir, "kubelet.crt"), filepath.Join(dir, "kubelet.key"))
}

// writeServiceAccountKey writes the service-account signing key pair.
func writeServiceAccountKey(dir string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := writePEMFile(filepath.Join(dir, "sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key)); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	return writePEMFile(filepath.Join(dir, "sa.pub"), "PUBLIC KEY", pub)
}

func writePEMFile(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

// firstServiceIP is the kubernetes Service's address: the range's first.
func firstServiceIP(cidr string) (net.IP, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, err
	}
	ip := n.IP.To4()
	if ip == nil {
		return nil, fmt.Errorf("service range %s: want IPv4", cidr)
	}
	out := make(net.IP, 4)
	copy(out, ip)
	out[3]++
	return out, nil
}
