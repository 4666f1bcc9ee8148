#!/usr/bin/env bash
# test/deps.sh: install what `make demo` and `make test` need from Debian, if
# it is missing: runc (containers), busybox-static (the test and demo
# images), iproute2 (network namespaces, tbf), gcc and libc6-dev (go test
# -race needs cgo), git, containernetworking-plugins (the Kubernetes tests'
# pod network). `make deps` runs it; so do `make demo`, `make test`
# and .ci/run.
set -euo pipefail

missing=()
command -v runc >/dev/null || missing+=(runc)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v ip >/dev/null || missing+=(iproute2)
command -v tc >/dev/null || missing+=(iproute2)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
command -v git >/dev/null || missing+=(git)
# The Kubernetes tests' pod network (bridge, host-local, loopback).
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
# iproute2 may be listed twice.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk 'NF && !seen[$0]++')

if ((${#missing[@]} == 0)); then
	echo "deps: runc, busybox-static, iproute2, gcc, git, CNI plugins present"
	exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
	echo "deps: missing ${missing[*]}; run as root (make needs root to install them with apt-get, and the tests and the demo need root to run containerd)" >&2
	exit 1
fi
echo "deps: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "deps: installed ${missing[*]}"
