package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// unmountUnder lazily unmounts every mount point at or below dir, deepest
// first (containerd's overlay snapshots and container rootfs mounts).
func unmountUnder(dir string) error {
	mps, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range mps {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	return mps, nil
}

// unescapeMountinfo undoes the octal escapes (\040 for space...) of
// /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cleanupRunc force-deletes every container runc knows under root (one
// runc root per containerd namespace below it).
func cleanupRunc(root string) {
	runc, err := exec.LookPath("runc")
	if err != nil {
		return
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		nsRoot := filepath.Join(root, e.Name())
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := exec.CommandContext(ctx, runc, "--root", nsRoot, "list", "-q").Output()
		if err == nil {
			for _, id := range strings.Fields(string(out)) {
				_ = exec.CommandContext(ctx, runc, "--root", nsRoot, "delete", "--force", id).Run()
			}
		}
		cancel()
	}
}

// killReferencing SIGKILLs the processes whose command line mentions dir (a
// node's unique run directory): the shims containerd started for that node,
// which outlive it by design. Our own process and the pids in keep are never
// touched.
func killReferencing(dir string, keep ...int) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	self := os.Getpid()
	needle := []byte(dir + "/")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || slices.Contains(keep, pid) {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, needle) {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// sweepStale removes what a crashed harness left under RunRoot: for each
// node run directory whose owner process is gone, it kills the processes
// still referencing it, unmounts and removes it and its data directory.
func sweepStale(logf func(string, ...any)) {
	entries, err := os.ReadDir(RunRoot)
	if err != nil {
		return
	}
	for _, e := range entries {
		runDir := filepath.Join(RunRoot, e.Name())
		b, err := os.ReadFile(filepath.Join(runDir, "owner"))
		if err != nil {
			continue // being created, or not ours
		}
		var pid int
		var dataDir string
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "pid="); ok {
				pid, _ = strconv.Atoi(v)
			}
			if v, ok := strings.CutPrefix(l, "dir="); ok {
				dataDir = v
			}
		}
		if pid <= 0 {
			continue
		}
		if processAlive(pid) {
			continue
		}
		logf("sweeping %s (left by pid %d)", runDir, pid)
		cleanupRunc(filepath.Join(runDir, "runc"))
		killReferencing(runDir)
		if dataDir != "" && strings.HasPrefix(filepath.Base(dataDir), "coop-node-") {
			_ = unmountUnder(dataDir)
			_ = os.RemoveAll(dataDir)
		}
		_ = unmountUnder(runDir)
		_ = os.RemoveAll(runDir)
	}
}

// processAlive reports whether pid exists and is not a zombie (a killed
// harness whose parent has not reaped it yet is dead for our purpose).
func processAlive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	// pid (comm) state ...: comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return true
	}
	return b[i+2] != 'Z'
}
