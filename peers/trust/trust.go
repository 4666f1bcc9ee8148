// Package trust is coop's cluster identity: one cluster CA, a certificate
// per coop process naming it (a node, ClusterKB), and the TLS configurations
// that make every coop-to-coop connection mutual TLS. A process is the name
// in its certificate: Name returns it for a verified peer. Certificates and
// the CA are read again from disk when they change, so a rotation needs no
// restart.
package trust

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/containerd/errdefs"
)

// File names inside a directory of credentials.
const (
	CAFile   = "ca.crt"
	CAKey    = "ca.key"
	CertFile = "tls.crt"
	KeyFile  = "tls.key"
)

// nameRE is what a coop name may be: a DNS label sequence (node names are
// host names), at most 253 bytes.
var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$`)

// ValidName reports whether name can name a coop process in a certificate.
func ValidName(name string) bool {
	return len(name) <= 253 && nameRE.MatchString(name)
}

// CAOptions configure InitCA.
type CAOptions struct {
	// Name is the CA's common name. Default "coop cluster CA".
	Name string
	// Validity is how long the CA is valid. Default 10 years.
	Validity time.Duration
}

// InitCA creates a cluster CA in dir: ca.crt and ca.key (0600). It refuses
// to overwrite an existing CA (errdefs.ErrAlreadyExists).
func InitCA(dir string, o CAOptions) error {
	if o.Name == "" {
		o.Name = "coop cluster CA"
	}
	if o.Validity == 0 {
		o.Validity = 10 * 365 * 24 * time.Hour
	}
	if _, err := os.Stat(filepath.Join(dir, CAKey)); err == nil {
		return fmt.Errorf("%s: a CA is already there: %w", dir, errdefs.ErrAlreadyExists)
	}
	key, tmpl, err := newCertificate(o.Name, o.Validity)
	if err != nil {
		return err
	}
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	tmpl.BasicConstraintsValid, tmpl.IsCA, tmpl.MaxPathLenZero = true, true, true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := writeKey(filepath.Join(dir, CAKey), key); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, CAFile), "CERTIFICATE", der, 0o644)
}

// IssueOptions configure Issue.
type IssueOptions struct {
	// Name is the process's name: a node's --name, or the KB's. Required.
	Name string
	// DNSNames and IPs are extra names a client may dial the process at.
	DNSNames []string
	IPs      []net.IP
	// Validity is how long the certificate is valid. Default 1 year.
	Validity time.Duration
}

// Issue signs a certificate for o.Name with the CA in caDir and writes
// ca.crt, tls.crt and tls.key (0600) into outDir: what a coop process reads
// with --tls-dir. The certificate serves both ends of a connection.
func Issue(caDir, outDir string, o IssueOptions) error {
	if !ValidName(o.Name) {
		return fmt.Errorf("name %q: want a lower-case DNS name: %w", o.Name, errdefs.ErrInvalidArgument)
	}
	if o.Validity == 0 {
		o.Validity = 365 * 24 * time.Hour
	}
	caCert, caKey, err := loadCA(caDir)
	if err != nil {
		return err
	}
	key, tmpl, err := newCertificate(o.Name, o.Validity)
	if err != nil {
		return err
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	tmpl.DNSNames = append([]string{o.Name}, o.DNSNames...)
	tmpl.IPAddresses = o.IPs
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(outDir, 0o700); err != nil {
		return err
	}
	// Key first: a reloading process that sees the new certificate must
	// find its key.
	if err := writeKey(filepath.Join(outDir, KeyFile), key); err != nil {
		return err
	}
	if err := writePEM(filepath.Join(outDir, CertFile), "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return writePEM(filepath.Join(outDir, CAFile), "CERTIFICATE", caCert.Raw, 0o644)
}

// loadCA reads the CA in dir: its certificate and its key (ECDSA, as
// InitCA makes it, or RSA or Ed25519, as other tools make CAs).
func loadCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, nil, fmt.Errorf("CA certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKey))
	if err != nil {
		return nil, nil, fmt.Errorf("CA key: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("CA in %s: %w", dir, err)
	}
	key, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("CA key in %s cannot sign: %w", dir, errdefs.ErrInvalidArgument)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	if !cert.IsCA {
		return nil, nil, fmt.Errorf("%s is not a CA certificate: %w", filepath.Join(dir, CAFile), errdefs.ErrInvalidArgument)
	}
	return cert, key, nil
}

// newCertificate makes a key and the template of a certificate naming name
// (common name), valid from an hour ago (clock skew) for validity.
func newCertificate(name string, validity time.Duration) (*ecdsa.PrivateKey, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	return key, &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, Organization: []string{"coop"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(validity),
	}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

// writePEM writes atomically: a temporary file renamed over path.
func writePEM(path, typ string, der []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := pem.Encode(tmp, &pem.Block{Type: typ, Bytes: der}); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// Name returns the coop name a verified client certificate proves for r,
// and false when r came without one (plain HTTP, or TLS without a client
// certificate).
func Name(r *http.Request) (string, bool) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return "", false
	}
	return nameOf(r.TLS.VerifiedChains[0][0])
}

func nameOf(c *x509.Certificate) (string, bool) {
	n := c.Subject.CommonName
	if !ValidName(n) {
		return "", false
	}
	return n, true
}

// ErrNoCredentials is returned by Load when the directory holds none.
var ErrNoCredentials = errors.New("no TLS credentials")
