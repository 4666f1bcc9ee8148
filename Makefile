# coop — see README.md. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
export GOFLAGS ?= -mod=mod

CONTAINERD_VERSION := $(shell $(GO) list -m -f '{{.Version}}' github.com/containerd/containerd/v2)
CRICTL_VERSION := v1.37.0
CRANE_VERSION := v0.22.1
GOLANGCI_VERSION := v2.15.0
CONFORMANCE_VERSION := v0.0.0-20260831232431-97274622c111

.PHONY: help deps root build tools k8s-tools test test-unit test-integration test-k8s lint demo bench clean image

# Every fuzz target runs for FUZZTIME; override it: make fuzz FUZZTIME=1m.
FUZZTIME ?= 10s
.PHONY: fuzz

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

deps: ## install what the tests and the demo need from Debian (runc, busybox-static, iproute2, gcc), if missing (root)
	@./test/deps.sh

# root stops a target that runs containerd or network namespaces at once, in
# one line, when make does not run as root.
root:
	@test "$$(id -u)" = 0 || { echo "$(MAKECMDGOALS): needs root (it runs containerd and creates network namespaces); run: sudo make $(MAKECMDGOALS)" >&2; exit 1; }

build: ## build bin/coop
	@echo "build: bin/coop"
	$(GO) build -o $(BIN)/coop ./cmd/coop

# make image: coop's container image as an OCI layout in bin/image. The
# version defaults to git describe, the tag to the version, every timestamp to
# SOURCE_DATE_EPOCH (default: the commit's time). IMAGE_PUSH=registry/repo:tag
# also pushes it with crane (built here if bin/crane is missing).
IMAGE_VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null)
IMAGE_TAG ?= $(IMAGE_VERSION)
IMAGE_PLATFORMS ?= linux/amd64,linux/arm64

image: $(if $(IMAGE_PUSH),$(BIN)/crane) ## build coop's image (linux/amd64, linux/arm64; reproducible) as an OCI layout in bin/image; IMAGE_PUSH=registry/repo:tag pushes it
	$(GO) run ./contrib/image --go $(GO) --out $(BIN)/image --platforms $(IMAGE_PLATFORMS) --version '$(IMAGE_VERSION)' --tag '$(IMAGE_TAG)'
	$(if $(IMAGE_PUSH),$(BIN)/crane push $(BIN)/image $(IMAGE_PUSH))

$(BIN)/crane:
	@echo "tools: building crane $(CRANE_VERSION)"
	@GOBIN=$(BIN) GOFLAGS= $(GO) install github.com/google/go-containerregistry/cmd/crane@$(CRANE_VERSION)

tools: $(BIN)/crane ## build containerd, ctr, the runc shim (go.mod's version), crictl, crane, the OCI conformance suite into bin/
	@mkdir -p $(BIN)
	@test -x $(BIN)/containerd -a -x $(BIN)/ctr -a -x $(BIN)/containerd-shim-runc-v2 && \
	  $(BIN)/containerd --version | grep -q ' $(patsubst v%,%,$(CONTAINERD_VERSION))+' || { \
	  echo "tools: building containerd, ctr and the runc shim $(CONTAINERD_VERSION) from the Go module proxy into bin/ (the first time takes a few minutes; later runs reuse it)"; \
	  CGO_ENABLED=0 $(GO) build -o $(BIN)/ github.com/containerd/containerd/v2/cmd/containerd \
	    github.com/containerd/containerd/v2/cmd/ctr \
	    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2; }
	@test -x $(BIN)/crictl || echo "tools: building crictl $(CRICTL_VERSION)"
	@test -x $(BIN)/crictl || GOBIN=$(BIN) GOFLAGS= $(GO) install sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION)
	@test -x $(BIN)/conformance || echo "tools: building the OCI conformance suite"
	@test -x $(BIN)/conformance || GOBIN=$(BIN) GOFLAGS= $(GO) install github.com/opencontainers/distribution-spec/conformance@$(CONFORMANCE_VERSION)

k8s-tools: ## build Kubernetes v1.37.2 (apiserver, controller-manager, scheduler, kubelet, kubectl), etcd and helm into bin/k8s (the first time about 15 minutes)
	@GO=$(GO) ./test/k8s/tools.sh $(BIN)

test-unit: ## hermetic unit tests: no root, no network beyond loopback
	@echo "test-unit: go test -race ./... (the first run compiles containerd's packages with the race detector: a few minutes)"
	$(GO) test -race -count=1 ./...

test-integration: root deps build tools k8s-tools ## real containerd + coop node tests, the Helm chart on a real API server (needs root)
	COOP_BIN=$(BIN) $(GO) test -count=1 -timeout 20m -tags integration ./test/... -v

test-k8s: root deps build tools k8s-tools ## only the Kubernetes tests (test/k8s)
	COOP_BIN=$(BIN) $(GO) test -count=1 -timeout 20m -tags integration ./test/k8s -v

test: root deps test-unit test-integration ## everything: unit, then the real-containerd tests (root)

fuzz: ## bounded fuzzing: every Fuzz target of every package for FUZZTIME (10s) each; fails on any finding (saved under the package's testdata/fuzz)
	@# One instrumented test binary a package, run once a target from the
	@# package's directory, with go test's fuzz cache. Go 1.26's coordinator
	@# may fail a target with a bare "context deadline exceeded" as -fuzztime
	@# ends (go.dev/issue/75804, fixed in Go 1.27): that, with no failing
	@# input written and the target's corpus passing, is no finding.
	@start=$$(date +%s); n=0; tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	for pkg in $$(grep -rl --include='*_test.go' '^func Fuzz' . | xargs -n1 dirname | sort -u); do \
	  fzs=$$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$pkg/*_test.go); \
	  bin=$$tmp/$$(echo $$pkg | tr / _).test; \
	  $(GO) test -c -o $$bin -fuzz "^$$(echo $$fzs | cut -d' ' -f1)\$$" $$pkg || exit 1; \
	  cache=$$($(GO) env GOCACHE)/fuzz/$$($(GO) list $$pkg); \
	  for fz in $$fzs; do \
	    n=$$((n + 1)); \
	    printf 'fuzz: %-20s %-28s ' $$pkg $$fz; \
	    if (cd $$pkg && $$bin -test.run '^$$' -test.fuzz "^$$fz\$$" -test.fuzztime $(FUZZTIME) -test.fuzzcachedir $$cache -test.timeout 10m) >$$tmp/log 2>&1; then \
	      grep '^fuzz: elapsed' $$tmp/log | tail -n 1 | sed 's/^fuzz: //; s/ ([0-9]*\/sec)//'; \
	    elif grep -q 'context deadline exceeded' $$tmp/log && ! grep -q 'Failing input written' $$tmp/log && \
	        (cd $$pkg && $$bin -test.run "^$$fz\$$") >/dev/null 2>&1; then \
	      echo "no finding (Go 1.26's deadline race as it ended, go.dev/issue/75804; its corpus passes)"; \
	    else \
	      echo FAILED; cat $$tmp/log; exit 1; \
	    fi; \
	  done; \
	done; \
	echo "fuzz: $$n targets, no finding, $$(( $$(date +%s) - start ))s"

lint: ## golangci-lint v2 with .golangci.yml
	@test -x $(BIN)/golangci-lint || GOBIN=$(BIN) GOFLAGS= $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_VERSION)
	$(BIN)/golangci-lint run ./...

demo: root deps build tools ## the main job: a cooperative container migration in network namespaces (root)
	COOP_BIN=$(BIN) $(GO) run ./test/demo

bench: root deps build tools ## benchmarks: P1/P2 (shaped links), P3 (mirror miss), P4 (local pull+unpack), P5 (burst of 8 pulls; BENCH_FLAGS=--only P5), failures, index (every mode; ClusterKB at scale); writes bench-results/
	COOP_BIN=$(BIN) $(GO) run ./test/bench $(BENCH_FLAGS)

clean: ## remove build outputs
	rm -rf $(BIN)
