#!/usr/bin/env bash
# Builds a current Docker engine (dockerd) and CLI from the Go module proxy, for the Swarm
# cluster-volume tests (Docker >= 23; Debian's docker.io is 20.10). Idempotent and cached
# outside the checkout; prints the directory holding `dockerd` and `docker`.
#
#   moby.sh [build]        build (or confirm built) and print the bin dir
#
# Recipe (../shared/notes/backends.md, "Docker engine and Swarm"): moby and docker/cli have no
# go.mod (their modules are `+incompatible`) but list their requirements in a root vendor.mod.
# A throwaway wrapper module requires the engine at its version plus every require/replace
# line of that vendor.mod, and builds cmd/dockerd (or cmd/docker) from it. No release pages,
# no registry: only the Go module proxy.
#
# Env knobs: DOCKER_VERSION (default 28.5.2), STOWAGE_CACHE (default ~/.cache/stowage).
# docker/cli 29.x needs module versions the proxy here refuses; 28.5.2 is what builds.
set -euo pipefail

VERSION=${DOCKER_VERSION:-28.5.2}
CACHE=${STOWAGE_CACHE:-$HOME/.cache/stowage}
OUT=$CACHE/docker-$VERSION
export GOPATH=${GOPATH:-$CACHE/go} GOCACHE=${GOCACHE:-$CACHE/go-build} GOFLAGS=${GOFLAGS:--modcacherw}
export GOTOOLCHAIN=local CGO_ENABLED=0 PATH=/usr/local/go/bin:$PATH

log() { echo "moby.sh: $*" >&2; }
die() { log "$*"; exit 1; }

[ "${1:-build}" = build ] || { echo "usage: $0 [build]" >&2; exit 2; }
[[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "DOCKER_VERSION must look like N.N.N (got $VERSION)"

# $1 module (github.com/docker/docker), $2 package to build, $3 output name, $4 version -X flag.
build_one() {
  local mod=$1 pkg=$2 name=$3 xflag=$4 w gomod gover
  [ -x "$OUT/$name" ] && [ -f "$OUT/.$name-ok" ] && return 0
  w=$OUT/wrap-$name
  rm -rf "$w"
  mkdir -p "$w"
  gomod=$(cd "$w" && printf 'module stowage.local/w\n\ngo 1.24.0\n' >go.mod &&
    go mod download -json "$mod@v$VERSION+incompatible" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -f "$gomod/vendor.mod" ] || die "no vendor.mod in $mod@v$VERSION+incompatible (from the Go proxy)"
  gover=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod/vendor.mod" | head -1)
  {
    printf 'module stowage.local/%s\n\ngo %s\n\nrequire %s v%s+incompatible\n\n' "$name" "${gover:-1.23.0}" "$mod" "$VERSION"
    # Every require and replace block/line of upstream's vendor.mod, minus its module line.
    sed -e '/^module /d' -e '/^go /d' -e '/^toolchain /d' "$gomod/vendor.mod"
  } >"$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" >"$w/tools.go"
  log "building $pkg $VERSION in $w"
  (
    cd "$w"
    go mod tidy >/dev/null 2>"$w/tidy.log" || { tail -n 20 "$w/tidy.log" >&2; exit 1; }
    go build -trimpath -tags "exclude_graphdriver_btrfs exclude_graphdriver_devicemapper" \
      -ldflags "-s -w -X $xflag=$VERSION" -o "$OUT/$name.tmp" "$pkg"
  ) || die "go build of $pkg failed"
  mv -f "$OUT/$name.tmp" "$OUT/$name"
  touch "$OUT/.$name-ok"
  rm -rf "$w"
}

mkdir -p "$OUT"
# Two CI jobs on one machine build once.
exec 9>"$OUT/.lock"
flock 9
t0=$(date +%s)
build_one github.com/docker/docker github.com/docker/docker/cmd/dockerd dockerd github.com/docker/docker/dockerversion.Version
build_one github.com/docker/cli github.com/docker/cli/cmd/docker docker github.com/docker/cli/cli/version.Version
v=$("$OUT/docker" --version 2>/dev/null || true)
case "$v" in *"$VERSION"*) ;; *) die "built CLI says '$v', not $VERSION" ;; esac
log "docker $VERSION ready in $OUT ($(($(date +%s) - t0)) s)"
echo "$OUT"
