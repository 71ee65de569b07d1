#!/usr/bin/env bash
# Builds the pinned Kubernetes control-plane binaries, etcd and helm from Go
# modules into a cache folder outside the clone, and reuses them when present.
# Usage: devcluster/build.sh   (prints the bin folder on its last line)
set -euo pipefail

K8S_VERSION="${KILN_K8S_VERSION:-v1.33.13}"
ETCD_VERSION="${KILN_ETCD_VERSION:-v3.5.21}"
HELM_VERSION="${KILN_HELM_VERSION:-v3.19.0}"
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
BIN="$CACHE/k8s/$K8S_VERSION/bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
mkdir -p "$BIN"

build_kube() {
  local want=(kube-apiserver kube-controller-manager kube-scheduler)
  local missing=0
  for b in "${want[@]}"; do [ -x "$BIN/$b" ] || missing=1; done
  [ "$missing" = 0 ] && { log "kubernetes $K8S_VERSION: cached"; return; }
  local src="$CACHE/k8s/$K8S_VERSION/src"
  mkdir -p "$src" && cd "$src"
  log "kubernetes $K8S_VERSION: preparing wrapper module (staging replaced by published v0 modules)"
  local minor="v0.${K8S_VERSION#v1.}"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module kilnk8s"
    echo "go 1.24"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$gomod" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m $minor"; done
  } > go.mod
  printf 'package tools\n\nimport (\n\t_ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n\t_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"\n\t_ "k8s.io/kubernetes/cmd/kube-scheduler/app"\n)\n' > tools.go
  log "kubernetes $K8S_VERSION: resolving modules"
  go mod tidy >/dev/null 2>&1 || go mod tidy
  for b in "${want[@]}"; do
    log "kubernetes $K8S_VERSION: building $b (minutes on first build)"
    go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)" -o "$BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b"
    mv "$BIN/$b.tmp" "$BIN/$b"
  done
}

build_etcd() {
  [ -x "$BIN/etcd" ] && { log "etcd $ETCD_VERSION: cached"; return; }
  local src="$CACHE/k8s/$K8S_VERSION/etcd-src"
  mkdir -p "$src" && cd "$src"
  log "etcd $ETCD_VERSION: building"
  printf 'module kilnetcd\n\ngo 1.24\n' > go.mod
  printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' > main.go
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null 2>&1 || go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" . && mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_helm() {
  [ -x "$BIN/helm" ] && { log "helm $HELM_VERSION: cached"; return; }
  log "helm $HELM_VERSION: building"
  GOBIN="$BIN/.helm-tmp" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$BIN/.helm-tmp/helm" "$BIN/helm" && rmdir "$BIN/.helm-tmp"
}

case "${1:-all}" in
  all) build_etcd; build_kube; build_helm ;;
  etcd) build_etcd ;; kube) build_kube ;; helm) build_helm ;;
  *) echo "usage: $0 [all|etcd|kube|helm]" >&2; exit 2 ;;
esac
echo "$BIN"
