package harness

import (
	"crypto/tls"
	"net/http"
	"path/filepath"
	"time"

	"github.com/coopnet/coop/peers/trust"
)

// HarnessName is the name in the harness's own client certificate.
const HarnessName = "coop-harness"

// PKI is a test cluster's CA, made with coop's own code (what `coop ca`
// does), and the harness's client certificate, so that the tests talk to
// coop processes over mutual TLS as their peers do.
type PKI struct {
	// Dir holds the CA (Dir/ca) and the harness's credentials.
	Dir    string
	client *trust.Credentials
}

// NewPKI makes a CA in dir.
func NewPKI(dir string) (*PKI, error) {
	ca := filepath.Join(dir, "ca")
	if err := trust.InitCA(ca, trust.CAOptions{Name: "coop test CA"}); err != nil {
		return nil, err
	}
	own := filepath.Join(dir, HarnessName)
	if err := trust.Issue(ca, own, trust.IssueOptions{Name: HarnessName}); err != nil {
		return nil, err
	}
	c, err := trust.Load(own)
	if err != nil {
		return nil, err
	}
	return &PKI{Dir: dir, client: c}, nil
}

// Issue writes a certificate for name into dir (a process's --tls-dir).
func (p *PKI) Issue(name, dir string) error {
	return trust.Issue(filepath.Join(p.Dir, "ca"), dir, trust.IssueOptions{Name: name})
}

// ClientTLS is the harness's client side of mutual TLS.
func (p *PKI) ClientTLS() *tls.Config { return p.client.ClientConfig() }

// HTTPClient returns an HTTP client presenting the harness's certificate; a
// nil PKI gives a plain one.
func (p *PKI) HTTPClient() *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 8, IdleConnTimeout: 30 * time.Second}
	if p != nil {
		tr.TLSClientConfig = p.ClientTLS()
	}
	return &http.Client{Transport: tr}
}

// Scheme is the URL scheme of coop processes: https with a PKI, else http.
func (p *PKI) Scheme() string {
	if p == nil {
		return "http://"
	}
	return "https://"
}

// Credentials issues a certificate for name into dir and loads it: the
// identity of a process the test plays itself (a fake peer, a node that
// lies about its name).
func (p *PKI) Credentials(name, dir string) (*trust.Credentials, error) {
	if err := p.Issue(name, dir); err != nil {
		return nil, err
	}
	return trust.Load(dir)
}

// ClientTLSAs is the client side of mutual TLS presenting a certificate
// of name, issued into dir.
func (p *PKI) ClientTLSAs(name, dir string) (*tls.Config, error) {
	c, err := p.Credentials(name, dir)
	if err != nil {
		return nil, err
	}
	return c.ClientConfig(), nil
}

// ServerTLSAs is the server side of mutual TLS with a certificate of name,
// issued into dir: a fake coop server the real ones accept as name.
func (p *PKI) ServerTLSAs(name, dir string) (*tls.Config, error) {
	c, err := p.Credentials(name, dir)
	if err != nil {
		return nil, err
	}
	return c.ServerConfig(), nil
}

// HTTPClientAs is an HTTP client presenting a certificate of name, issued
// into dir.
func (p *PKI) HTTPClientAs(name, dir string) (*http.Client, error) {
	cfg, err := p.ClientTLSAs(name, dir)
	if err != nil {
		return nil, err
	}
	return TLSHTTPClient(cfg), nil
}

// StrangerTLS is TLS as a stranger speaks it: no client certificate, and
// any server accepted (a stranger does not care who answers, so only the
// server can refuse).
func StrangerTLS() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: true} //nolint:gosec // an attacker's client
}

// TLSHTTPClient is an HTTP client speaking TLS with cfg, keeping no idle
// connection (each request shows its own handshake).
func TLSHTTPClient(cfg *tls.Config) *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}, Timeout: 30 * time.Second}
}
