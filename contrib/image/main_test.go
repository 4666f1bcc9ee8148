package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestParsePlatforms(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []ocispec.Platform
	}{
		{"linux/amd64,linux/arm64", []ocispec.Platform{linuxAMD64(), linuxARM64()}},
		{"linux/arm64/v8, linux/amd64", []ocispec.Platform{linuxARM64(), linuxAMD64()}},
		{"linux/amd64", []ocispec.Platform{linuxAMD64()}},
		{"", nil},
		{"linux", nil},
		{"windows/amd64", nil},
		{"linux/riscv64", nil},
		{"linux/arm64/v9", nil},
		{"linux/amd64/v3", nil},
		{"linux/amd64,linux/amd64", nil},
		{"linux/amd64/x/y", nil},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parsePlatforms(tc.in)
			if tc.want == nil {
				if !errdefs.IsInvalidArgument(err) {
					t.Errorf("parsePlatforms(%q) = %v, %v; want ErrInvalidArgument", tc.in, got, err)
				}
				return
			}
			if err != nil || !slices.EqualFunc(got, tc.want, platformEqual) {
				t.Errorf("parsePlatforms(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestParseFlags(t *testing.T) {
	got, err := parseFlags([]string{"--out", "x", "--version", "v1", "--tag", "t", "--platforms", "linux/arm64", "--go", "/go", "--package", "./p", "--source", "s"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	want := options{out: "x", version: "v1", tag: "t", goBin: "/go", pkg: "./p", source: "s"}
	if got.out != want.out || got.version != want.version || got.tag != want.tag || got.goBin != want.goBin ||
		got.pkg != want.pkg || got.source != want.source || len(got.platforms) != 1 || !platformEqual(got.platforms[0], linuxARM64()) {
		t.Errorf("parseFlags = %+v, want %+v with linux/arm64/v8", got, want)
	}
	for _, args := range [][]string{
		{},
		{"--out", "x", "extra"},
		{"--out", "x", "--platforms", "linux/s390x"},
		{"--nope"},
	} {
		if _, err := parseFlags(args, io.Discard); !errdefs.IsInvalidArgument(err) {
			t.Errorf("parseFlags(%q): %v, want ErrInvalidArgument", args, err)
		}
	}
}

func TestResolveDefaults(t *testing.T) {
	repo := func(ctx context.Context, args ...string) (string, error) {
		switch strings.Join(args, " ") {
		case "describe --tags --always --dirty":
			return "v1.2.0-1-gabc-dirty", nil
		case "rev-parse HEAD":
			return "abc123", nil
		case "log -1 --format=%ct":
			return "1700000000", nil
		}
		return "", fmt.Errorf("unexpected git %q", args)
	}
	noRepo := func(context.Context, ...string) (string, error) { return "", fmt.Errorf("not a git repository") }
	env := func(epoch string) func(string) string {
		return func(k string) string {
			if k == "SOURCE_DATE_EPOCH" {
				return epoch
			}
			return ""
		}
	}
	for _, tc := range []struct {
		name                   string
		flags                  options
		git                    gitFunc
		epoch                  string
		version, tag, revision string
		created                int64
		err                    func(error) bool
	}{
		{name: "from git", git: repo, version: "v1.2.0-1-gabc-dirty", tag: "v1.2.0-1-gabc-dirty", revision: "abc123", created: 1700000000},
		{name: "flags win", flags: options{version: "v9", tag: "latest"}, git: repo, version: "v9", tag: "latest", revision: "abc123", created: 1700000000},
		{name: "SOURCE_DATE_EPOCH wins", git: repo, epoch: "42", version: "v1.2.0-1-gabc-dirty", tag: "v1.2.0-1-gabc-dirty", revision: "abc123", created: 42},
		{name: "no git with a version", flags: options{version: "v9"}, git: noRepo, version: "v9", tag: "v9"},
		{name: "no git, no version", git: noRepo, err: errdefs.IsFailedPrecondition},
		{name: "a version with a space", flags: options{version: "v 9"}, git: repo, err: errdefs.IsInvalidArgument},
		{name: "a bad SOURCE_DATE_EPOCH", git: repo, epoch: "yesterday", err: errdefs.IsInvalidArgument},
		{name: "a negative SOURCE_DATE_EPOCH", git: repo, epoch: "-5", err: errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.flags
			err := resolveDefaults(context.Background(), &opts, env(tc.epoch), tc.git)
			if tc.err != nil {
				if !tc.err(err) {
					t.Errorf("resolveDefaults: %v, want an error of its class", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if opts.version != tc.version || opts.tag != tc.tag || opts.revision != tc.revision || !opts.created.Equal(time.Unix(tc.created, 0)) {
				t.Errorf("resolveDefaults = version %q tag %q revision %q created %v; want %q %q %q %v",
					opts.version, opts.tag, opts.revision, opts.created, tc.version, tc.tag, tc.revision, time.Unix(tc.created, 0))
			}
		})
	}
}
