package trust

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// cluster makes a CA and issues one directory of credentials per name.
func cluster(t *testing.T, names ...string) (caDir string, dirs map[string]string) {
	t.Helper()
	root := t.TempDir()
	caDir = filepath.Join(root, "ca")
	if err := InitCA(caDir, CAOptions{}); err != nil {
		t.Fatal(err)
	}
	dirs = map[string]string{}
	for _, n := range names {
		dirs[n] = filepath.Join(root, n)
		if err := Issue(caDir, dirs[n], IssueOptions{Name: n}); err != nil {
			t.Fatal(err)
		}
	}
	return caDir, dirs
}

func load(t *testing.T, dir string) *Credentials {
	t.Helper()
	c, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// server answers with the name the client's certificate proves.
func server(t *testing.T, c *Credentials) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name, ok := Name(r)
		if !ok {
			http.Error(w, "anonymous", http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, name)
	}))
	srv.TLS = c.ServerConfig()
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func get(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

func clientOf(cfg *tls.Config) *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 5 * time.Second}
}

func TestMutualTLS(t *testing.T) {
	_, dirs := cluster(t, "node-a", "node-b")
	_, otherDirs := cluster(t, "node-b")
	srv := server(t, load(t, dirs["node-a"]))

	for _, tc := range []struct {
		name       string
		client     *http.Client
		wantStatus int
		wantBody   string
		wantErr    bool
	}{
		{"cluster member", clientOf(load(t, dirs["node-b"]).ClientConfig()), 200, "node-b", false},
		{"no client certificate", clientOf(&tls.Config{InsecureSkipVerify: true}), 401, "anonymous", false}, //nolint:gosec // the attacker
		{"another CA's certificate of the same name", clientOf(load(t, otherDirs["node-b"]).ClientConfig()), 0, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, body, err := get(tc.client, srv.URL)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("status %d %q: want the handshake refused", status, body)
				}
				return
			}
			if err != nil || status != tc.wantStatus || strings.TrimSpace(body) != tc.wantBody {
				t.Fatalf("got %d %q %v, want %d %q", status, body, err, tc.wantStatus, tc.wantBody)
			}
		})
	}

	// A client of the cluster refuses a server of another CA.
	other := server(t, load(t, otherDirs["node-b"]))
	if _, _, err := get(clientOf(load(t, dirs["node-b"]).ClientConfig()), other.URL); err == nil {
		t.Fatal("a server of another CA was accepted")
	}
}

// TestRotation: certificates issued again on disk are used without a
// restart; a broken rotation keeps the last good ones and says so.
func TestRotation(t *testing.T) {
	caDir, dirs := cluster(t, "node-a", "node-b")
	a := load(t, dirs["node-a"])
	b := load(t, dirs["node-b"])
	srv := server(t, a)
	cert1, _ := a.current(true)

	if err := Issue(caDir, dirs["node-a"], IssueOptions{Name: "node-a"}); err != nil {
		t.Fatal(err)
	}
	// Make sure the modification time differs from the first issue's.
	future := time.Now().Add(2 * time.Second)
	for _, f := range []string{CertFile, KeyFile} {
		if err := os.Chtimes(filepath.Join(dirs["node-a"], f), future, future); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Check(); err != nil {
		t.Fatal(err)
	}
	cert2, _ := a.current(false)
	if cert1.Leaf.SerialNumber.Cmp(cert2.Leaf.SerialNumber) == 0 {
		t.Fatal("the rotated certificate was not loaded")
	}
	if status, body, err := get(clientOf(b.ClientConfig()), srv.URL); err != nil || status != 200 || body != "node-b" {
		t.Fatalf("after rotation: %d %q %v", status, body, err)
	}

	// A broken file: the last good credentials stay, Check reports it.
	later := future.Add(2 * time.Second)
	if err := os.WriteFile(filepath.Join(dirs["node-a"], CertFile), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(filepath.Join(dirs["node-a"], CertFile), later, later); err != nil {
		t.Fatal(err)
	}
	if err := a.Check(); err == nil {
		t.Fatal("a broken certificate file was not reported")
	}
	if cert3, _ := a.current(false); cert3 != cert2 {
		t.Fatal("a broken rotation replaced the last good certificate")
	}
}

func TestIssueAndLoadErrors(t *testing.T) {
	caDir, dirs := cluster(t, "node-a")
	if err := InitCA(caDir, CAOptions{}); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second InitCA: %v, want already exists", err)
	}
	for _, name := range []string{"", "Node-A", "a b", "-a", strings.Repeat("a", 64), "a/../b"} {
		if err := Issue(caDir, t.TempDir(), IssueOptions{Name: name}); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Issue(%q): %v, want invalid argument", name, err)
		}
	}
	if _, err := Load(t.TempDir()); err == nil {
		t.Fatal("Load of an empty directory succeeded")
	}
	// A certificate that does not chain to the CA beside it.
	_, other := cluster(t, "node-a")
	b, err := os.ReadFile(filepath.Join(other["node-a"], CAFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dirs["node-a"], CAFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dirs["node-a"]); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("Load with a foreign CA: %v, want invalid argument", err)
	}
	if fi, err := os.Stat(filepath.Join(caDir, CAKey)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("CA key mode %v (%v), want 0600", fi.Mode(), err)
	}
}

// A CA made by another tool (an RSA key in PKCS#1, as Helm's genCA and many
// others write it) issues certificates coop loads.
func TestIssueFromRSACA(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca := t.TempDir()
	if err := os.WriteFile(filepath.Join(ca, CAFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ca, CAKey), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	if err := Issue(ca, out, IssueOptions{Name: "node-a"}); err != nil {
		t.Fatal(err)
	}
	c, err := Load(out)
	if err != nil {
		t.Fatal(err)
	}
	if c.Name() != "node-a" || time.Until(c.NotAfter()) < 300*24*time.Hour {
		t.Fatalf("loaded %q until %v", c.Name(), c.NotAfter())
	}
}
