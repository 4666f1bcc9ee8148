package trust

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// recheck is how often, at most, Credentials look at their files again.
const recheck = time.Second

// Credentials are a coop process's TLS credentials, read from a directory
// holding ca.crt, tls.crt and tls.key (what Issue writes, or a Kubernetes
// TLS Secret with the CA beside it). They are read again when a file
// changes (checked at most once a second, at a handshake), so rotated
// certificates take effect without a restart; a rotation that leaves the
// files unreadable or mismatched keeps the last good ones and is reported by
// Check. Credentials are safe for concurrent use.
type Credentials struct {
	dir string

	mu      sync.Mutex
	checked time.Time
	stamp   [3]time.Time
	cert    *tls.Certificate
	pool    *x509.CertPool
	name    string
	lastErr error
}

// Load reads the credentials in dir. The certificate must chain to the CA
// beside it and name its process (a valid coop name as common name).
func Load(dir string) (*Credentials, error) {
	c := &Credentials{dir: dir}
	if err := c.reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Dir is the directory the credentials come from.
func (c *Credentials) Dir() string { return c.dir }

// Name is the name the process's own certificate proves.
func (c *Credentials) Name() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.name
}

// NotAfter is when the process's certificate in use expires.
func (c *Credentials) NotAfter() time.Time {
	cert, _ := c.current(false)
	if cert == nil || cert.Leaf == nil {
		return time.Time{}
	}
	return cert.Leaf.NotAfter
}

// Check reads the files again if they changed and returns the error of the
// last read, nil when the credentials in use are the files' own.
func (c *Credentials) Check() error {
	c.current(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

func (c *Credentials) paths() [3]string {
	return [3]string{filepath.Join(c.dir, CAFile), filepath.Join(c.dir, CertFile), filepath.Join(c.dir, KeyFile)}
}

// current returns the credentials in use, reading the files again when one
// changed (at most once a second unless force).
func (c *Credentials) current(force bool) (*tls.Certificate, *x509.CertPool) {
	c.mu.Lock()
	due := force || time.Since(c.checked) >= recheck
	c.mu.Unlock()
	if due {
		_ = c.reload()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cert, c.pool
}

func (c *Credentials) reload() error {
	var stamp [3]time.Time
	for i, p := range c.paths() {
		fi, err := os.Stat(p)
		if err != nil {
			return c.fail(fmt.Errorf("TLS credentials in %s: %w", c.dir, errors.Join(err, ErrNoCredentials)))
		}
		stamp[i] = fi.ModTime()
	}
	c.mu.Lock()
	c.checked = time.Now()
	same := c.cert != nil && stamp == c.stamp
	c.mu.Unlock()
	if same {
		return nil
	}
	cert, pool, name, err := read(c.paths())
	if err != nil {
		return c.fail(fmt.Errorf("TLS credentials in %s: %w", c.dir, err))
	}
	c.mu.Lock()
	c.cert, c.pool, c.name, c.stamp, c.lastErr = cert, pool, name, stamp, nil
	c.mu.Unlock()
	return nil
}

func (c *Credentials) fail(err error) error {
	c.mu.Lock()
	c.checked = time.Now()
	c.lastErr = err
	c.mu.Unlock()
	return err
}

// read parses and checks the three files.
func read(paths [3]string) (*tls.Certificate, *x509.CertPool, string, error) {
	caPEM, err := os.ReadFile(paths[0])
	if err != nil {
		return nil, nil, "", err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, nil, "", fmt.Errorf("%s holds no certificate: %w", paths[0], errdefs.ErrInvalidArgument)
	}
	pair, err := tls.LoadX509KeyPair(paths[1], paths[2])
	if err != nil {
		return nil, nil, "", fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, "", err
	}
	pair.Leaf = leaf
	inter := x509.NewCertPool()
	for _, der := range pair.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(ic)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, nil, "", fmt.Errorf("%s does not chain to %s: %v: %w", paths[1], paths[0], err, errdefs.ErrInvalidArgument)
	}
	name, ok := nameOf(leaf)
	if !ok {
		return nil, nil, "", fmt.Errorf("%s names %q, not a coop name: %w", paths[1], leaf.Subject.CommonName, errdefs.ErrInvalidArgument)
	}
	return &pair, pool, name, nil
}

// ServerConfig is the TLS configuration of a coop server: its certificate,
// and client certificates verified against the cluster CA when given (a
// handler decides what an unauthenticated client may see: Name tells).
func (c *Credentials) ServerConfig() *tls.Config {
	return c.serverConfig(tls.VerifyClientCertIfGiven)
}

// BrokerConfig is ServerConfig for a server that serves cluster members
// only (the NATS broker): a client without a certificate of the cluster CA
// is refused at the handshake.
func (c *Credentials) BrokerConfig() *tls.Config {
	return c.serverConfig(tls.RequireAndVerifyClientCert)
}

func (c *Credentials) serverConfig(auth tls.ClientAuthType) *tls.Config {
	current := func() *tls.Config {
		cert, pool := c.current(false)
		return &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{*cert},
			ClientCAs:    pool,
			ClientAuth:   auth,
		}
	}
	// Each handshake takes the credentials in use then (rotation).
	cfg := current()
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) { return current(), nil }
	return cfg
}

// ClientConfig is the TLS configuration of a coop client: it presents the
// process's certificate, and accepts a server whose certificate chains to
// the cluster CA, whatever address it was dialled at (coop processes are
// known by name, not address; ServerName, if the caller sets one, is
// checked against the certificate's name).
func (c *Credentials) ClientConfig() *tls.Config {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Verified below against the cluster CA, by name rather than by
		// the address dialled.
		InsecureSkipVerify: true, //nolint:gosec // VerifyConnection verifies
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, _ := c.current(false)
			return cert, nil
		},
	}
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		_, pool := c.current(false)
		return verifyServer(cs, pool)
	}
	return cfg
}

func verifyServer(cs tls.ConnectionState, pool *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("server sent no certificate: %w", errdefs.ErrPermissionDenied)
	}
	inter := x509.NewCertPool()
	for _, ic := range cs.PeerCertificates[1:] {
		inter.AddCert(ic)
	}
	leaf := cs.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return fmt.Errorf("server certificate: %v: %w", err, errdefs.ErrPermissionDenied)
	}
	name, ok := nameOf(leaf)
	if !ok {
		return fmt.Errorf("server certificate names %q: %w", leaf.Subject.CommonName, errdefs.ErrPermissionDenied)
	}
	if cs.ServerName != "" && !isIP(cs.ServerName) && cs.ServerName != name && leaf.VerifyHostname(cs.ServerName) != nil {
		return fmt.Errorf("server is %q, not %q: %w", name, cs.ServerName, errdefs.ErrPermissionDenied)
	}
	return nil
}

func isIP(host string) bool { return net.ParseIP(host) != nil }
