#!/usr/bin/env bash
# test/k8s/tools.sh BIN_DIR: build what the Kubernetes tests run, from the Go
# module proxy at pinned versions, into BIN_DIR/k8s: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kubectl (Kubernetes
# $KUBE_VERSION), etcd ($ETCD_VERSION) and helm ($HELM_VERSION). Each is
# built only when missing or of another version (a stamp file beside it), so
# a machine pays the first build once (about 15 minutes on 2 cores) and
# later runs take seconds. Kubernetes cannot be `go install`ed: a throwaway
# module requires k8s.io/kubernetes and replaces its staging modules, read
# from its own go.mod.
set -euo pipefail

BIN=${1:?usage: tools.sh BIN_DIR}
KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.7.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
GO=${GO:-go}
OUT=$BIN/k8s
mkdir -p "$OUT"
export GOFLAGS=-mod=mod CGO_ENABLED=0

# quiet runs a go command, dropping its progress lines (downloads, added
# and upgraded modules) but keeping anything else it says.
quiet() {
	"$@" 2>&1 | { grep -Ev '^go: (downloading|added|upgraded|finding) ' || true; }
	return "${PIPESTATUS[0]}"
}

fresh() { # fresh NAME VERSION: the binary exists at that version
	[[ -x $OUT/$1 && -f $OUT/$1.version && $(cat "$OUT/$1.version") == "$2" ]]
}
stamp() { echo "$2" >"$OUT/$1.version"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

kube=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
need=()
for b in "${kube[@]}"; do fresh "$b" "$KUBE_VERSION" || need+=("$b"); done
if ((${#need[@]} > 0)); then
	echo "k8s-tools: building ${need[*]} $KUBE_VERSION from the Go module proxy (the first time takes about 15 minutes on 2 cores)"
	gomod=$($GO mod download -json "k8s.io/kubernetes@$KUBE_VERSION" 2>/dev/null | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
	staging=${KUBE_VERSION/v1./v0.}
	mkdir -p "$work/kube"
	{
		echo "module coop.test/k8stools"
		echo "go 1.26"
		echo "require k8s.io/kubernetes $KUBE_VERSION"
		echo "replace ("
		# Every staging module k8s.io/kubernetes replaces with ./staging/...
		awk '/^replace \(/{r=1;next} r&&/^\)/{r=0} r&&/=> \.\/staging/{print "\t" $1 " => " $1 " '"$staging"'"}' "$gomod"
		echo ")"
	} >"$work/kube/go.mod"
	printf 'package tools\n' >"$work/kube/tools.go"
	(
		cd "$work/kube"
		$GO mod tidy >/dev/null 2>&1 || true
		for b in "${need[@]}"; do quiet $GO get "k8s.io/kubernetes/cmd/$b@$KUBE_VERSION"; done
		ver=${KUBE_VERSION#v}
		ld="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=${ver%%.*} -X k8s.io/component-base/version.gitMinor=$(echo "$ver" | cut -d. -f2)"
		for b in "${need[@]}"; do
			quiet $GO build -trimpath -ldflags="$ld" -o "$OUT/$b" "k8s.io/kubernetes/cmd/$b"
		done
	)
	for b in "${need[@]}"; do stamp "$b" "$KUBE_VERSION"; done
fi

if ! fresh etcd "$ETCD_VERSION"; then
	echo "k8s-tools: building etcd $ETCD_VERSION"
	mkdir -p "$work/etcd"
	cat >"$work/etcd/main.go" <<'GO'
// Command etcd runs etcd's server (the tests' Kubernetes store).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
	(
		cd "$work/etcd"
		printf 'module coop.test/etcd\ngo 1.26\n' >go.mod
		quiet $GO get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
		quiet $GO mod tidy
		quiet $GO build -trimpath -ldflags="-s -w" -o "$OUT/etcd" .
	)
	stamp etcd "$ETCD_VERSION"
fi

if ! fresh helm "$HELM_VERSION"; then
	echo "k8s-tools: building helm $HELM_VERSION"
	GOBIN=$OUT GOFLAGS= quiet $GO install -trimpath -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
	stamp helm "$HELM_VERSION"
fi
echo "k8s-tools: $(cd "$OUT" && ls | grep -v '\.version$' | tr '\n' ' ')in $OUT"
