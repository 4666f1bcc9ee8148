// Command image builds coop's container image without a Docker daemon: a
// static coop per platform (go build), one layer each, and a multi-platform
// image index, written as an OCI image layout that `crane push` takes as is.
// The same commit gives the same digest: every timestamp is
// SOURCE_DATE_EPOCH (default: the commit's time) and every byte of the
// layout is fixed by its inputs.
//
//	go run ./contrib/image --out bin/image [--platforms linux/amd64,linux/arm64] [--version V] [--tag T]
//
// It prints the image index's digest on stdout and a summary on stderr.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// options are the command's flags after defaults.
type options struct {
	out       string
	platforms []ocispec.Platform
	version   string
	tag       string
	revision  string
	source    string
	created   time.Time
	goBin     string
	pkg       string
}

// arch is an architecture the image is built for.
type arch struct {
	// variant is the image platform's variant.
	variant string
	// goEnv pins go build's instruction set, so that a GOAMD64 in the
	// caller's environment cannot change the binary.
	goEnv string
}

// archOf returns the architecture named by GOARCH name.
func archOf(name string) (arch, bool) {
	switch name {
	case "amd64":
		return arch{variant: "", goEnv: "GOAMD64=v1"}, true
	case "arm64":
		return arch{variant: "v8", goEnv: "GOARM64=v8.0"}, true
	}
	return arch{}, false
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errdefs.IsInvalidArgument(err):
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	start := time.Now()
	opts, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if err := resolveDefaults(ctx, &opts, os.Getenv, git); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "coop-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	build := buildOptions{goBin: opts.goBin, pkg: opts.pkg, version: opts.version, dir: tmp, log: stderr}
	var bins []platformBinary
	for _, p := range opts.platforms {
		b, err := buildBinary(ctx, build, p)
		if err != nil {
			return err
		}
		bins = append(bins, b)
	}
	desc, err := writeLayout(ctx, opts.out, layoutOptions{
		Binaries: bins,
		Created:  opts.created,
		Version:  opts.version,
		Revision: opts.revision,
		Source:   opts.source,
		Tag:      opts.tag,
	})
	if err != nil {
		return err
	}
	names := make([]string, len(opts.platforms))
	for i, p := range opts.platforms {
		names[i] = platformString(p)
	}
	fmt.Fprintf(stderr, "image: %s: coop %s (tag %s, created %s) for %s in %s\n",
		opts.out, opts.version, opts.tag, opts.created.UTC().Format(time.RFC3339),
		strings.Join(names, ", "), time.Since(start).Round(100*time.Millisecond))
	_, err = fmt.Fprintln(stdout, desc.Digest)
	return err
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "directory to write the OCI image layout to (replaced as a whole; required)")
	platforms := fs.String("platforms", "linux/amd64,linux/arm64", "comma-separated platforms to build")
	version := fs.String("version", "", "coop's version (main.Version and the version label); default: git describe --tags --always --dirty")
	tag := fs.String("tag", "", "index.json's ref.name; default: the version")
	source := fs.String("source", "https://github.com/coopnet/coop", "the org.opencontainers.image.source label")
	goBin := fs.String("go", "go", "the go command")
	pkg := fs.String("package", "./cmd/coop", "the package to build")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return options{}, err
		}
		return options{}, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments %q: %w", fs.Args(), errdefs.ErrInvalidArgument)
	}
	if *out == "" {
		return options{}, fmt.Errorf("--out is required: %w", errdefs.ErrInvalidArgument)
	}
	ps, err := parsePlatforms(*platforms)
	if err != nil {
		return options{}, err
	}
	return options{out: *out, platforms: ps, version: *version, tag: *tag, source: *source, goBin: *goBin, pkg: *pkg}, nil
}

// parsePlatforms parses "linux/amd64,linux/arm64" (a variant, if given, must
// be the one the image uses: linux/arm64/v8).
func parsePlatforms(s string) ([]ocispec.Platform, error) {
	var ps []ocispec.Platform
	seen := map[string]bool{}
	for _, field := range strings.Split(s, ",") {
		parts := strings.Split(strings.TrimSpace(field), "/")
		if len(parts) < 2 || len(parts) > 3 || parts[0] != "linux" {
			return nil, fmt.Errorf("platform %q: want linux/ARCH: %w", field, errdefs.ErrInvalidArgument)
		}
		a, ok := archOf(parts[1])
		if !ok {
			return nil, fmt.Errorf("platform %q: architecture %q is not one of amd64, arm64: %w", field, parts[1], errdefs.ErrInvalidArgument)
		}
		if len(parts) == 3 && parts[2] != a.variant {
			return nil, fmt.Errorf("platform %q: variant %q: the image's %s is %q: %w", field, parts[2], parts[1], a.variant, errdefs.ErrInvalidArgument)
		}
		if seen[parts[1]] {
			return nil, fmt.Errorf("platform %q given twice: %w", field, errdefs.ErrInvalidArgument)
		}
		seen[parts[1]] = true
		ps = append(ps, ocispec.Platform{OS: parts[0], Architecture: parts[1], Variant: a.variant})
	}
	return ps, nil
}

// gitFunc runs git with args and returns its trimmed stdout.
type gitFunc func(ctx context.Context, args ...string) (string, error)

func git(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "git", args...).Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w", strings.Join(args, " "), err)
	}
	return strings.TrimSpace(string(out)), nil
}

// resolveDefaults fills what the flags left out from the environment and git:
// the version (git describe), the tag (the version), the revision (HEAD, left
// out without git) and the creation time (SOURCE_DATE_EPOCH, else the
// commit's time, else 1970).
func resolveDefaults(ctx context.Context, opts *options, getenv func(string) string, git gitFunc) error {
	if opts.version == "" {
		v, err := git(ctx, "describe", "--tags", "--always", "--dirty")
		if err != nil {
			return fmt.Errorf("no --version and %w: %w", err, errdefs.ErrFailedPrecondition)
		}
		opts.version = v
	}
	if opts.version == "" || strings.ContainsAny(opts.version, " \t\n\"'") {
		return fmt.Errorf("version %q: want no spaces or quotes: %w", opts.version, errdefs.ErrInvalidArgument)
	}
	if opts.tag == "" {
		opts.tag = opts.version
	}
	if rev, err := git(ctx, "rev-parse", "HEAD"); err == nil {
		opts.revision = rev
	}
	epoch := getenv("SOURCE_DATE_EPOCH")
	if epoch == "" {
		epoch, _ = git(ctx, "log", "-1", "--format=%ct")
	}
	if epoch == "" {
		epoch = "0"
	}
	sec, err := strconv.ParseInt(epoch, 10, 64)
	if err != nil || sec < 0 {
		return fmt.Errorf("SOURCE_DATE_EPOCH %q: want seconds since 1970: %w", epoch, errdefs.ErrInvalidArgument)
	}
	opts.created = time.Unix(sec, 0).UTC()
	return nil
}

// buildOptions are what every platform's go build shares.
type buildOptions struct {
	goBin, pkg, version string
	// dir receives the binaries.
	dir string
	// log receives go build's output.
	log io.Writer
}

// buildBinary builds a static, reproducible coop for p: no cgo, no paths, no
// VCS stamp, no symbols, the instruction set pinned.
func buildBinary(ctx context.Context, opts buildOptions, p ocispec.Platform) (platformBinary, error) {
	a, ok := archOf(p.Architecture)
	if !ok {
		return platformBinary{}, fmt.Errorf("architecture %q: %w", p.Architecture, errdefs.ErrInvalidArgument)
	}
	out := filepath.Join(opts.dir, "coop-"+p.OS+"-"+p.Architecture)
	fmt.Fprintf(opts.log, "image: go build %s for %s\n", opts.pkg, platformString(p))
	cmd := exec.CommandContext(ctx, opts.goBin, "build", "-trimpath", "-buildvcs=false",
		"-ldflags", "-s -w -X main.Version="+opts.version, "-o", out, opts.pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+p.OS, "GOARCH="+p.Architecture, a.goEnv)
	cmd.Stdout, cmd.Stderr = opts.log, opts.log
	if err := cmd.Run(); err != nil {
		return platformBinary{}, fmt.Errorf("go build for %s: %w", platformString(p), err)
	}
	return platformBinary{Platform: p, Path: out}, nil
}
