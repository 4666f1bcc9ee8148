package upstream

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/errdefs"
)

// maxCredentialsFile bounds what LoadCredentials reads.
const maxCredentialsFile = 1 << 20

// LoadCredentials reads registry credentials from a file in the format of
// Docker's config.json, which `docker login` and `nerdctl login` write:
//
//	{"auths": {"registry.example:5000": {"auth": "<base64 of user:password>"}}}
//
// ("username" and "password" may replace "auth"; "identitytoken" is sent as
// a refresh token). Keys may carry a scheme and a path
// (https://index.docker.io/v1/ is docker.io). The returned function gives a
// host's credentials, or empty ones for a host not listed. The file must not
// be readable by other users.
func LoadCredentials(path string) (func(host string) (string, string, error), error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("registry credentials: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("registry credentials: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("registry credentials %s: mode %v lets other users read it (chmod 600): %w", path, fi.Mode().Perm(), errdefs.ErrFailedPrecondition)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxCredentialsFile+1))
	if err != nil {
		return nil, fmt.Errorf("registry credentials: %w", err)
	}
	if len(b) > maxCredentialsFile {
		return nil, fmt.Errorf("registry credentials %s: larger than %d bytes: %w", path, maxCredentialsFile, errdefs.ErrInvalidArgument)
	}
	creds, err := ParseCredentials(b)
	if err != nil {
		return nil, fmt.Errorf("registry credentials %s: %w", path, err)
	}
	return func(host string) (string, string, error) {
		c := creds[host]
		return c.user, c.secret, nil
	}, nil
}

type credential struct{ user, secret string }

// ParseCredentials parses the auths of a Docker config.json, by registry
// host.
func ParseCredentials(b []byte) (map[string]credential, error) {
	var cfg struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			IdentityToken string `json:"identitytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("not a Docker config.json: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	out := map[string]credential{}
	for key, a := range cfg.Auths {
		host := credentialHost(key)
		if host == "" {
			return nil, fmt.Errorf("auths key %q names no registry: %w", key, errdefs.ErrInvalidArgument)
		}
		c := credential{user: a.Username, secret: a.Password}
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("auths %q: auth is not base64: %w", key, errdefs.ErrInvalidArgument)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return nil, fmt.Errorf("auths %q: auth is not user:password: %w", key, errdefs.ErrInvalidArgument)
			}
			c = credential{user: user, secret: pass}
		}
		if a.IdentityToken != "" {
			// containerd's authorizer sends an empty user's secret as
			// a refresh token.
			c = credential{secret: a.IdentityToken}
		}
		if c.user == "" && c.secret == "" {
			return nil, fmt.Errorf("auths %q: %w", key, errors.Join(errdefs.ErrInvalidArgument, errors.New("no auth, username or identitytoken")))
		}
		out[host] = c
	}
	return out, nil
}

// credentialHost reduces a config.json key to the host containerd asks
// credentials for.
func credentialHost(key string) string {
	k := strings.TrimPrefix(strings.TrimPrefix(key, "https://"), "http://")
	k, _, _ = strings.Cut(k, "/")
	switch k {
	case "index.docker.io", "docker.io", "registry-1.docker.io":
		return "registry-1.docker.io"
	}
	return k
}
