package harness

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BinEnv names the environment variable that points at the directory holding
// the binaries the harness runs (containerd, ctr, the runc shim, crictl, coop).
const BinEnv = "COOP_BIN"

// Tools are the absolute paths of the binaries the harness runs.
type Tools struct {
	// Dir is the directory they were found in; it is put first on the PATH of
	// containerd so that it finds the shim.
	Dir        string
	Containerd string
	Ctr        string
	Shim       string
	Crictl     string
	// Coop is empty when FindTools was asked not to require it.
	Coop string
	// Runc is the runc found on PATH (Debian's runc package); empty if none.
	Runc string
}

// FindTools locates the binaries in $COOP_BIN, or else in the repository's
// bin/ directory (found by walking up from the working directory to the
// go.mod of github.com/coopnet/coop). withCoop says whether bin/coop is
// required too. The error names every missing binary and how to build it.
func FindTools(withCoop bool) (*Tools, error) {
	dir := os.Getenv(BinEnv)
	if dir == "" {
		root, err := repoRoot()
		if err != nil {
			return nil, fmt.Errorf("%s is not set and %w", BinEnv, err)
		}
		dir = filepath.Join(root, "bin")
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	t := &Tools{
		Dir:        dir,
		Containerd: filepath.Join(dir, "containerd"),
		Ctr:        filepath.Join(dir, "ctr"),
		Shim:       filepath.Join(dir, "containerd-shim-runc-v2"),
		Crictl:     filepath.Join(dir, "crictl"),
	}
	var missing []string
	for _, p := range []string{t.Containerd, t.Ctr, t.Shim, t.Crictl} {
		if !isExecutable(p) {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing %s: run make tools", strings.Join(missing, ", "))
	}
	if withCoop {
		t.Coop = filepath.Join(dir, "coop")
		if !isExecutable(t.Coop) {
			return nil, fmt.Errorf("missing %s: run make build", t.Coop)
		}
	}
	if p, err := exec.LookPath("runc"); err == nil {
		t.Runc = p
	}
	return t, nil
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

// repoRoot walks up from the working directory to coop's go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/coopnet/coop\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no github.com/coopnet/coop go.mod above the working directory: set COOP_BIN or run from the repository")
		}
		dir = parent
	}
}
