package mirror

// The token that guards the mirror's write endpoints (SourcesPath): the
// node creates it in a file only its user reads (LoadOrCreateToken) and
// gives it to the mirror (Options.APIToken); coop migrate, run by the same
// user, reads it (ReadToken) into Client.Token.

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/errdefs"
)

// TokenFile is the name of the token file in the node's root directory
// (coop node --root): <root>/mirror.token.
const TokenFile = "mirror.token"

// MinTokenLen is the shortest API token the mirror accepts; LoadOrCreateToken
// makes tokens of 64 hex digits (32 random bytes).
const MinTokenLen = 32

// maxTokenFile bounds what ReadToken reads.
const maxTokenFile = 4096

// LoadOrCreateToken returns the token in the file at path, creating the
// file (mode 0600, 32 random bytes in hex) when it does not exist; the
// directory must exist. An existing file is read by ReadToken, with its
// checks and errors.
func LoadOrCreateToken(path string) (string, error) {
	tok, err := ReadToken(path)
	if !errdefs.IsNotFound(err) {
		return tok, err
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("mirror token: %w", err)
	}
	tok = hex.EncodeToString(b[:])
	// Written whole under another name, then linked into place: a reader
	// never sees half a token, and of two creators the first one wins.
	tmp, err := os.CreateTemp(filepath.Dir(path), ".mirror-token-*")
	if err != nil {
		return "", fmt.Errorf("mirror token: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return "", fmt.Errorf("mirror token: %w", err)
	}
	if _, err := io.WriteString(tmp, tok+"\n"); err != nil {
		tmp.Close()
		return "", fmt.Errorf("mirror token: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return "", fmt.Errorf("mirror token: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("mirror token: %w", err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return ReadToken(path)
		}
		return "", fmt.Errorf("mirror token: %w", err)
	}
	return tok, nil
}

// ReadToken returns the token in the file at path (surrounding white space
// removed). A missing file is errdefs.ErrNotFound; a file of another user,
// one its group or others may read or write, a symbolic link or anything
// but a regular file is errdefs.ErrPermissionDenied; a token shorter than MinTokenLen or with
// white space inside is errdefs.ErrInvalidArgument.
func ReadToken(path string) (string, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("mirror token %s: %w", path, errdefs.ErrNotFound)
	case errors.Is(err, syscall.ELOOP):
		return "", fmt.Errorf("mirror token %s is a symbolic link: %w", path, errdefs.ErrPermissionDenied)
	case err != nil:
		return "", fmt.Errorf("mirror token: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("mirror token: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("mirror token %s is not a regular file: %w", path, errdefs.ErrPermissionDenied)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return "", fmt.Errorf("mirror token %s belongs to uid %d, not to this user (%d): %w", path, st.Uid, os.Geteuid(), errdefs.ErrPermissionDenied)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("mirror token %s has mode %04o: group and others may use it (want 0600): %w", path, perm, errdefs.ErrPermissionDenied)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxTokenFile))
	if err != nil {
		return "", fmt.Errorf("mirror token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if err := validToken(tok); err != nil {
		return "", fmt.Errorf("mirror token %s: %w", path, err)
	}
	return tok, nil
}

// validToken accepts a token of at least MinTokenLen printable characters
// other than white space.
func validToken(tok string) error {
	if len(tok) < MinTokenLen {
		return fmt.Errorf("token of %d characters, want at least %d: %w", len(tok), MinTokenLen, errdefs.ErrInvalidArgument)
	}
	for _, c := range tok {
		if c <= ' ' || c > '~' {
			return fmt.Errorf("token with a character %q: %w", c, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}
