#!/usr/bin/env bash
# Container images for the test kubelet, built offline (nothing is ever pulled) as OCI image
# tarballs, cached outside the checkout, and imported into a containerd instance.
#
# Usage: tests/infra/images.sh build [NAME...]          # prints the image dir; default: all
#        tests/infra/images.sh import SOCKET [NAME...]  # build if needed, then ctr import
#        tests/infra/images.sh ref NAME                 # the image reference pods must use
#
# Images (pods use imagePullPolicy: Never):
#   pause     localhost/stowage/pause:3.10     static pause (kubelet/pause.c, gcc -static);
#                                              containerd's sandbox_image
#   busybox   localhost/stowage/busybox:1.35   Debian's busybox-static, applets as symlinks
#   postgres  localhost/stowage/postgres:15    Debian bookworm minbase + postgresql-15
#                                              (mmdebstrap; ~1-2 min once, then cached)
#   mariadb   localhost/stowage/mariadb:10.11  Debian bookworm minbase + mariadb-server
#                                              (10.11) and its client; no database made
#                                              (tests/pods/mariadb-entrypoint.sh does it)
# Cache: $STOWAGE_CACHE/images/<name>.tar, rebuilt when its inputs change (.stamp next to it).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
CACHE_ROOT="${STOWAGE_CACHE:-$HOME/.cache/stowage}"
IMG_DIR="$CACHE_ROOT/images"
ALL=(pause busybox postgres mariadb)

log() { printf '[images.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[images.sh] ERROR: %s\n' "$*" >&2; exit 1; }

ref() {
  case "$1" in
    pause) echo localhost/stowage/pause:3.10 ;;
    busybox) echo localhost/stowage/busybox:1.35 ;;
    postgres) echo localhost/stowage/postgres:15 ;;
    mariadb) echo localhost/stowage/mariadb:10.11 ;;
    *) die "unknown image $1 (known: ${ALL[*]})" ;;
  esac
}

# What the image is made from; a change rebuilds it.
inputs() {
  case "$1" in
    pause) sha256sum "$SCRIPT_DIR/kubelet/pause.c" "${BASH_SOURCE[0]}" | awk '{print $1}' | tr '\n' ' ' ;;
    busybox) dpkg-query -W -f '${Version}' busybox-static; sha256sum "${BASH_SOURCE[0]}" | cut -c1-16 ;;
    postgres) echo "bookworm postgresql-15 v1"; sha256sum "${BASH_SOURCE[0]}" | cut -c1-16 ;;
    mariadb) echo "bookworm mariadb-server"; declare -f fill_mariadb | sha256sum | cut -c1-16 ;;
  esac
}

need() { command -v "$1" >/dev/null || die "$1 not found (tests/infra/deps.sh installs it)"; }

# umoci layout TAG ROOTFS-FILLER...: a fresh OCI layout in $w/layout with one layer.
oci_from_dir() { # name tag fill-function config-args...
  local name="$1" tag="$2" fill="$3"; shift 3
  local w="$IMG_DIR/.work-$name"
  rm -rf "$w"; mkdir -p "$w"
  umoci init --layout "$w/layout"
  umoci new --image "$w/layout:$tag"
  umoci unpack --image "$w/layout:$tag" "$w/bundle" >/dev/null
  "$fill" "$w/bundle/rootfs" "$w"
  umoci repack --image "$w/layout:$tag" "$w/bundle"
  umoci config --image "$w/layout:$tag" --os linux --architecture amd64 "$@"
  umoci gc --layout "$w/layout"
  (cd "$w/layout" && tar cf "$IMG_DIR/$name.tar.tmp" .)
  mv -f "$IMG_DIR/$name.tar.tmp" "$IMG_DIR/$name.tar"
  rm -rf "$w"
}

fill_pause() {
  gcc -static -O2 -o "$1/pause" "$SCRIPT_DIR/kubelet/pause.c"
  strip "$1/pause" 2>/dev/null || true
}

fill_busybox() {
  local r="$1" a
  mkdir -p "$r/bin" "$r/tmp" "$r/etc" "$r/root"
  chmod 1777 "$r/tmp"
  cp /bin/busybox "$r/bin/busybox"
  for a in $(/bin/busybox --list); do [[ "$a" == busybox ]] || ln -sf busybox "$r/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$r/etc/passwd"
  echo 'root:x:0:' > "$r/etc/group"
}

fill_postgres() {
  local r="$1" w="$2"
  need mmdebstrap
  # Debian's postgresql-15 in a minimal bookworm, plus busybox for a shell toolbox.
  mmdebstrap --variant=minbase --include=postgresql-15,busybox-static,procps \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$w/rootfs.tar" >&2
  tar -xpf "$w/rootfs.tar" -C "$r" --numeric-owner
  rm -f "$w/rootfs.tar"
  # The cluster is made by the pod's entrypoint script (tests/pods/postgres-entrypoint.sh,
  # passed in a ConfigMap), so nothing is initialised here.
  rm -rf "$r/var/lib/postgresql/15/main" "$r/etc/postgresql/15/main"
}

fill_mariadb() {
  local r="$1" w="$2"
  need mmdebstrap
  # Debian's mariadb-server (10.11, with the mariadb client) in a minimal bookworm, plus
  # busybox for a shell toolbox. Its postinst cannot make a database in the chroot (no
  # running server), and none is wanted: the pod's entrypoint makes it on the claim.
  mmdebstrap --variant=minbase --include=mariadb-server,mariadb-client,busybox-static,procps \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$w/rootfs.tar" >&2
  tar -xpf "$w/rootfs.tar" -C "$r" --numeric-owner
  rm -f "$w/rootfs.tar"
  rm -rf "$r/var/lib/mysql"/*
}

build_one() {
  local name="$1" want
  want="$(inputs "$name")"
  if [[ -f "$IMG_DIR/$name.tar" && "$(cat "$IMG_DIR/$name.stamp" 2>/dev/null)" == "$want" ]]; then
    return 0
  fi
  need umoci
  log "building image $name ($(ref "$name"))"
  local t0=$SECONDS
  case "$name" in
    pause) need gcc; oci_from_dir pause 3.10 fill_pause --config.entrypoint /pause ;;
    busybox) oci_from_dir busybox 1.35 fill_busybox --config.cmd /bin/sh --config.env PATH=/bin ;;
    postgres) oci_from_dir postgres 15 fill_postgres --config.cmd /bin/sh \
                --config.env PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ;;
    mariadb) oci_from_dir mariadb 10.11 fill_mariadb --config.cmd /bin/sh \
               --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ;;
  esac
  echo "$want" > "$IMG_DIR/$name.stamp"
  log "image $name built in $((SECONDS - t0))s"
}

cmd_build() {
  mkdir -p "$IMG_DIR"
  exec 8>"$IMG_DIR/.lock"
  flock -w 1800 8 || die "timed out waiting for $IMG_DIR/.lock"
  local n
  (($#)) || set -- pause busybox
  for n in "$@"; do ref "$n" >/dev/null; build_one "$n"; done
  echo "$IMG_DIR"
}

cmd_import() {
  local sock="${1:?usage: images.sh import SOCKET [NAME...]}"; shift
  (($#)) || set -- pause busybox
  cmd_build "$@" >/dev/null
  local n r
  # (No `ctr ... | grep -q`: with pipefail, grep's early exit makes ctr's SIGPIPE a failure.)
  present() { [[ -n "$(timeout 30 ctr -a "$sock" -n k8s.io images ls -q "name==$1" 2>/dev/null)" ]]; }
  for n in "$@"; do
    r="$(ref "$n")"
    if present "$r"; then continue; fi
    timeout 300 ctr -a "$sock" -n k8s.io images import --base-name "${r%:*}" "$IMG_DIR/$n.tar" >/dev/null \
      || die "ctr import of $n failed"
    present "$r" || die "$r not present after import"
    log "imported $r"
  done
}

main() {
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    build) cmd_build "$@" ;;
    import) cmd_import "$@" ;;
    ref) ref "${1:?usage: images.sh ref NAME}" ;;
    *) die "usage: $0 {build [NAME...]|import SOCKET [NAME...]|ref NAME}" ;;
  esac
}
main "$@"; exit
