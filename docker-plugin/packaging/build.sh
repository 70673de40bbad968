#!/usr/bin/env bash
# Assembles a Docker managed-plugin directory (config.json + rootfs/) for stowage-docker from
# this machine's binaries, ready for `docker plugin create`:
#
#   docker-plugin/packaging/build.sh --out DIR [--kind volume|csi] [--binary PATH] [--with PROGRAM]...
#                                    [--rootfs DIR]
#   docker plugin create stowage DIR
#
# --kind volume (default): the volume plugin (managed/config.json), for `docker volume create`,
#   `docker run -v` and Swarm services with volume-driver=..., on any Docker.
# --kind csi: the CSI plugin for Swarm cluster volumes (csi/config.json), Docker >= 23 only.
#
# rootfs/ holds the stowage-docker binary, mount/umount/losetup (util-linux), busybox for a
# shell, and every shared library they load (found with ldd). Network backends need their
# mount helpers in the plugin too: add each with --with (e.g. --with mount.nfs,
# --with s3fs, --with rbd-fuse); ELF programs only, with their libraries.
#
# --rootfs DIR starts rootfs/ from a copy of DIR instead of an empty tree: use the Stowage
# image's package root filesystem (`images/build.sh --rootfs-only` prints it), which holds every
# backend's mount helpers and the Ceph and GlusterFS client libraries, so the plugin serves all
# five backends like the image does.
#
# --binary defaults to $CARGO_TARGET_DIR/release/stowage-docker (cargo build --release
# -p stowage-docker). The copy in rootfs/ is stripped of debug info.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=""
kind=volume
binary=${CARGO_TARGET_DIR:-$HOME/.cache/stowage/target}/release/stowage-docker
with=()
base=""
usage() {
  echo "usage: $0 --out DIR [--kind volume|csi] [--binary PATH] [--with PROGRAM]... [--rootfs DIR]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
  --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
  --kind) [ $# -ge 2 ] || usage; kind=$2; shift 2 ;;
  --binary) [ $# -ge 2 ] || usage; binary=$2; shift 2 ;;
  --with) [ $# -ge 2 ] || usage; with+=("$2"); shift 2 ;;
  --rootfs) [ $# -ge 2 ] || usage; base=$2; shift 2 ;;
  *) usage ;;
  esac
done
[ -n "$out" ] || usage
case "$kind" in
volume) config=$here/managed/config.json ;;
csi) config=$here/csi/config.json ;;
*) usage ;;
esac
[ -x "$binary" ] || { echo "$binary not found: cargo build --release -p stowage-docker, or pass --binary" >&2; exit 1; }

root=$out/rootfs
rm -rf "$root"
mkdir -p "$root"
if [ -n "$base" ]; then
  [ -d "$base/usr" ] || { echo "--rootfs $base: not a root filesystem (no usr/)" >&2; exit 1; }
  cp -a "$base/." "$root/"
fi
mkdir -p "$root"/{etc/stowage,var/lib/stowage/docker,var/lib/stowage/local,mnt/stowage,data/published,data/staged,run/docker/plugins,proc,sys,dev,tmp,bin}
cp "$config" "$out/config.json"

# Copies a file to the same path under rootfs/, keeping symlinked library names usable.
put() {
  local src=$1 dst
  dst=$root$src
  [ -e "$dst" ] && return 0
  mkdir -p "$(dirname "$dst")"
  cp -L "$src" "$dst"
}
# A program and every library the dynamic loader gives it.
put_prog() {
  local prog=$1 lib
  put "$prog"
  for lib in $(ldd "$prog" 2>/dev/null | grep -oE '/[^ ]+' || true); do
    put "$lib"
  done
}

if command -v strip >/dev/null; then
  strip --strip-debug -o "$root/stowage-docker" "$binary"
else
  cp "$binary" "$root/stowage-docker"
fi
for lib in $(ldd "$binary" | grep -oE '/[^ ]+'); do put "$lib"; done
for p in mount umount losetup; do
  path=$(command -v "$p") || { echo "$p not found (util-linux)" >&2; exit 1; }
  put_prog "$path"
done
for p in "${with[@]}"; do
  path=$(command -v "$p") || { echo "--with $p: not found" >&2; exit 1; }
  put_prog "$path"
done
# A base root filesystem has its own shell.
if [ -z "$base" ] && [ -x /bin/busybox ]; then
  cp /bin/busybox "$root/bin/busybox"
  ln -sf busybox "$root/bin/sh"
fi
echo "managed plugin directory ready: $out ($(du -sh "$root" | cut -f1) rootfs)"
echo "next: docker plugin create stowage $out"
