package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// process is a long-running child (containerd or coop node) whose stdout and
// stderr go to a log file.
type process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	logFile *os.File

	done    chan struct{}
	waitErr error
}

// startProcess starts bin with args, appending its output to logPath. The
// child gets its own process group (a Ctrl-C at the terminal reaches only the
// harness, which then tears down in order) and SIGKILL when the harness dies.
func startProcess(name, logPath string, env []string, bin string, args ...string) (*process, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(f, "=== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, logPath: logPath, cmd: cmd, logFile: f, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the process has exited, and how.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// signal sends sig to the process (not its group: containerd's shims must
// outlive a containerd restart, and coop has no children).
func (p *process) signal(sig syscall.Signal) {
	if ok, _ := p.exited(); ok {
		return
	}
	_ = p.cmd.Process.Signal(sig)
}

// stop sends SIGTERM, waits up to grace, then SIGKILL and waits.
func (p *process) stop(grace time.Duration) error {
	p.signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	return p.kill()
}

// kill sends SIGKILL and waits for the process to exit.
func (p *process) kill() error {
	p.signal(syscall.SIGKILL)
	select {
	case <-p.done:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// pid is the process id.
func (p *process) pid() int {
	return p.cmd.Process.Pid
}

// startupNoise are containerd log lines that say nothing about a failure
// (one per plugin at every start); tails leave them out.
var startupNoise = []string{`msg="loading plugin"`, `msg="skip loading plugin"`, `msg="starting cri plugin"`}

// tailFile returns the last n lines of the file at path, without containerd's
// plugin-loading lines.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		if !containsAny(l, startupNoise) {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// CommandError is returned when a client command (ctr, crictl) fails. Its
// message carries the command line, the exit status and the tail of stderr.
type CommandError struct {
	Args   []string
	Err    error
	Stderr string
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("%s: %v: %s", strings.Join(e.Args, " "), e.Err, lastLines(e.Stderr, 20))
}

func (e *CommandError) Unwrap() error { return e.Err }

// runCommand runs a client command to completion; stdout is written to
// stdout (or returned when stdout is nil). Known noise on stderr (the cgroup
// v1 deprecation warning every ctr prints here) is dropped.
func runCommand(ctx context.Context, env []string, stdout io.Writer, bin string, args ...string) (string, error) {
	return runCommandInput(ctx, env, nil, stdout, bin, args...)
}

// runCommandInput is runCommand with stdin (nil: none).
func runCommandInput(ctx context.Context, env []string, stdin io.Reader, stdout io.Writer, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	cmd.Stdin = stdin
	var out bytes.Buffer
	if stdout != nil {
		cmd.Stdout = stdout
	} else {
		cmd.Stdout = &out
	}
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return out.String(), &CommandError{Args: append([]string{bin}, args...), Err: err, Stderr: dropNoise(stderr.String())}
	}
	return out.String(), nil
}

func dropNoise(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, "cgroup v1") && strings.Contains(l, "deprecat") {
			continue
		}
		if strings.TrimSpace(l) != "" {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
