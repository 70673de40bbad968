#!/usr/bin/env bash
# Builds the Stowage container image offline (no registry is ever contacted): a release build of
# the Stowage binaries (stripped), a root filesystem made from the Debian bookworm packages in
# images/packages.txt with mmdebstrap, and the two as layers of one image written with umoci.
# The tarball holds an OCI layout (index.json, for `ctr images import`) and a docker-archive
# manifest (manifest.json, for `docker load`), both naming stowage:<workspace version>.
#
# Usage: images/build.sh [--bin-dir DIR] [--out FILE] [--print-path]
#        images/build.sh --rootfs-only
#   --bin-dir DIR  take stowage-all (the multicall executable of crate multicall/) from DIR
#                  instead of building it (a release build is what ships)
#   --out FILE     also copy the tarball there
#   --rootfs-only  build (or reuse) only the package root filesystem and print its directory:
#                  the Docker plugin packages (docker-plugin/packaging/build.sh --rootfs) start
#                  from it, so the plugins carry the same mount tools as the image
# Prints the image reference, the tarball path and the uncompressed size.
#
# Caches (keyed by their inputs, under $STOWAGE_CACHE/images, default ~/.cache/stowage/images):
#   debs/                          every downloaded .deb (apt reuses them; only lists are fetched)
#   stowage-rootfs-<key>/          the package root filesystem (key: the package list + recipe)
#   stowage-<version>.tar + .stamp the image (key: rootfs key + the binaries' checksums)
# Release build: CARGO_TARGET_DIR, default $STOWAGE_CACHE/target-release.
# Measured here: rootfs cold ~9 min (downloads), warm ~1-2 min; image assembly ~30 s.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd "$HERE/.." && pwd -P)"
CACHE_ROOT="${STOWAGE_CACHE:-$HOME/.cache/stowage}"
IMG_DIR="$CACHE_ROOT/images"
# One executable holds every binary (they share most of their code: one copy instead of five
# saves tens of MB); the image links each binary's name to it.
BINS=(stowage-all)
PKGS=(stowage-multicall)
LINKS=(stowage-controller stowage-node stowage-provisioner stowage-docker stowage)
SUITE=bookworm

log() { printf '[images/build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[images/build.sh] ERROR: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 not found (apt-get install $2; tests/infra/deps.sh installs it)"; }

bin_dir="" out="" rootfs_only=0
while (($#)); do
  case "$1" in
    --rootfs-only) rootfs_only=1; shift ;;
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --out) out="${2:?--out needs a file}"; shift 2 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")"
[[ -n "$version" ]] || die "no version in [workspace.package] of $ROOT/Cargo.toml"
ref="stowage:$version"

# The package list: installs and purges (see the header of packages.txt).
mapfile -t install < <("$HERE/packages.sh" install)
mapfile -t purge < <("$HERE/packages.sh" purge)
((${#install[@]})) || die "no packages in $HERE/packages.txt"

# --- binaries ---------------------------------------------------------------------------------
if ((rootfs_only)); then
  :
elif [[ -z "$bin_dir" ]]; then
  need cargo "(rustup)"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE_ROOT/target-release}"
  export CARGO_PROFILE_RELEASE_STRIP=true CARGO_PROFILE_RELEASE_DEBUG=false CARGO_INCREMENTAL=0
  args=()
  for p in "${PKGS[@]}"; do args+=(-p "$p"); done
  log "cargo build --release (${PKGS[*]}) in $CARGO_TARGET_DIR"
  t0=$SECONDS
  (cd "$ROOT" && cargo build --release --locked "${args[@]}" --bins) >&2 || die "release build failed"
  log "release build done in $((SECONDS - t0))s"
  bin_dir="$CARGO_TARGET_DIR/release"
fi
((rootfs_only)) || for b in "${BINS[@]}"; do [[ -x "$bin_dir/$b" ]] || die "$bin_dir/$b missing"; done

mkdir -p "$IMG_DIR/debs"
exec 8>"$IMG_DIR/.stowage-image.lock"
flock -w 1800 8 || die "timed out waiting for $IMG_DIR/.stowage-image.lock"

# Bump when the mmdebstrap recipe below changes (the key of the cached root filesystem).
ROOTFS_RECIPE=3
rootfs_key="$( (cat "$HERE/packages.txt" "$HERE/packages.sh"; echo "$SUITE $ROOTFS_RECIPE") | sha256sum | cut -c1-16)"
rootfs="$IMG_DIR/stowage-rootfs-$rootfs_key"
((rootfs_only)) || image_key="$rootfs_key $version $(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16) $(cd "$bin_dir" && sha256sum "${BINS[@]}" | sha256sum | cut -c1-16)"
tarball="$IMG_DIR/stowage-$version.tar"

size_of() { # uncompressed size of the image: the sum of its layers' diff sizes
  python3 - "$1" <<'PY'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    names = set(t.getnames())
    def read(n):
        return t.extractfile(n if n in names else "./" + n).read()
    man = json.loads(read("manifest.json"))[0]
    total = 0
    import gzip, io
    for layer in man["Layers"]:
        data = read(layer)
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        total += len(data)
    print(total)
PY
}

report() {
  local bytes; bytes="$(size_of "$tarball")"
  [[ -n "$out" ]] && cp -f "$tarball" "$out"
  log "image $ref: $tarball"
  printf 'image: %s\ntarball: %s\nuncompressed size: %s bytes (%s MB)\n' \
    "$ref" "$tarball" "$bytes" "$((bytes / 1000000))"
}

if ((!rootfs_only)) && [[ -f "$tarball" && "$(cat "$tarball.stamp" 2>/dev/null)" == "$image_key" ]]; then
  log "cached: $tarball"
  report; exit 0
fi

# --- root filesystem from Debian packages -------------------------------------------------------
# Files of Essential packages no command Stowage runs needs, removed after the install (the
# image has no apt, and dpkg refuses to purge Essential packages): perl-base (dpkg's maintainer
# scripts are its only user; mount.glusterfs is sh, the mounters are C, C++ and Go; with it
# debconf's perl modules), glibc's iconv modules (gconv: charset conversions none of the tools
# asks for; UTF-8 is built in) and shell completions (no interactive shell in the image).
# images/Dockerfile removes the same (TRIM_PATHS is read from here by 85-helm's check).
TRIM_PATHS="usr/bin/perl usr/bin/perl5.36.0 usr/lib/x86_64-linux-gnu/perl-base usr/share/perl5 usr/lib/x86_64-linux-gnu/gconv usr/share/bash-completion"
TRIM_CMD='for p in '"$TRIM_PATHS"'; do rm -rf "$1/$p"; done'
build_rootfs() {
  need mmdebstrap mmdebstrap
  local list purge_cmd p t0=$SECONDS
  list="$(IFS=,; echo "${install[*]}")"
  # Purges as one dpkg call; patterns expand against what is installed.
  # One dpkg --purge of the installed packages the patterns match (set -f: no file globbing).
  purge_cmd='set -ef; pk=""; for p in '"${purge[*]}"'; do
    pk="$pk $(chroot "$1" dpkg-query -W -f "\${db:Status-Abbrev} \${Package}\n" "$p" 2>/dev/null | awk "/^ii/ {print \$2}")"; done
    [ -z "$(echo $pk)" ] || chroot "$1" dpkg --purge --force-depends $pk >/dev/null 2>&1'
  log "mmdebstrap $SUITE: ${#install[@]} packages (downloads cached in $IMG_DIR/debs)"
  # essential variant: no apt in the image. Downloaded debs are copied into the cache before
  # mmdebstrap's cleanup removes them; cached ones are offered to apt up front.
  rm -rf "$rootfs.tmp"
  # (An output path without .tar: mmdebstrap writes a directory.)
  mmdebstrap --variant=essential --include="$list" \
    --skip=essential/unlink \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
    --setup-hook="find '$IMG_DIR/debs' -name '*.deb' -exec cp -t \"\$1/var/cache/apt/archives/\" {} +" \
    --customize-hook="find \"\$1/var/cache/apt/archives\" -name '*.deb' -exec cp -n -t '$IMG_DIR/debs/' {} +" \
    --customize-hook="$purge_cmd" \
    --customize-hook='rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/usr/share/doc/*/changelog*' \
    --customize-hook="$TRIM_CMD" \
    --customize-hook='mkdir -p "$1/var/lib/stowage" "$1/run/stowage" "$1/etc/stowage"' \
    "$SUITE" "$rootfs.tmp" >"$IMG_DIR/mmdebstrap.log" 2>&1 ||
    { tail -n 20 "$IMG_DIR/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $IMG_DIR/mmdebstrap.log)"; }
  mv -f "$rootfs.tmp" "$rootfs"
  # Older root filesystems of other keys are dead weight.
  for p in "$IMG_DIR"/stowage-rootfs-*; do [[ "$p" == "$rootfs" ]] || rm -rf "$p"; done
  log "root filesystem built in $((SECONDS - t0))s: $rootfs"
}
[[ -d "$rootfs/usr" ]] || build_rootfs
if ((rootfs_only)); then
  echo "$rootfs"
  exit 0
fi

# --- the image: layer 1 the packages, layer 2 the binaries ---------------------------------------
need umoci umoci
need python3 python3
t0=$SECONDS
w="$IMG_DIR/.work-stowage"
rm -rf "$w"; mkdir -p "$w"
trap 'rm -rf "$w"' EXIT
umoci init --layout "$w/layout"
umoci new --image "$w/layout:$version"
umoci unpack --image "$w/layout:$version" "$w/bundle" >/dev/null
cp -a "$rootfs/." "$w/bundle/rootfs/"
umoci repack --image "$w/layout:$version" "$w/bundle"
for b in "${BINS[@]}"; do install -m 0755 "$bin_dir/$b" "$w/bundle/rootfs/usr/local/bin/$b"; done
for l in "${LINKS[@]}"; do ln -sf stowage-all "$w/bundle/rootfs/usr/local/bin/$l"; done
umoci repack --image "$w/layout:$version" "$w/bundle"
umoci config --image "$w/layout:$version" --os linux --architecture amd64 \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.cmd stowage-node --config.workingdir / \
  --config.label "org.opencontainers.image.title=stowage" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.source=https://github.com/stowage-io/stowage" \
  --manifest.annotation "org.opencontainers.image.ref.name=$version" \
  --manifest.annotation "io.containerd.image.name=docker.io/library/$ref"
umoci gc --layout "$w/layout"
# docker load reads manifest.json (docker-archive); the blobs are shared with the OCI layout.
python3 - "$w/layout" "$ref" <<'PY'
import json, os, sys
layout, ref = sys.argv[1], sys.argv[2]
def blob(d):
    return os.path.join("blobs", *d.split(":", 1))
index = json.load(open(os.path.join(layout, "index.json")))
desc = index["manifests"][0]
desc.setdefault("annotations", {})["io.containerd.image.name"] = "docker.io/library/" + ref
json.dump(index, open(os.path.join(layout, "index.json"), "w"))
man = json.load(open(os.path.join(layout, blob(desc["digest"]))))
json.dump([{"Config": blob(man["config"]["digest"]), "RepoTags": [ref],
            "Layers": [blob(l["digest"]) for l in man["layers"]]}],
          open(os.path.join(layout, "manifest.json"), "w"))
name, tag = ref.split(":", 1)
json.dump({name: {tag: man["layers"][-1]["digest"].split(":", 1)[1]}},
          open(os.path.join(layout, "repositories"), "w"))
PY
(cd "$w/layout" && tar cf "$tarball.tmp" --owner=0 --group=0 --numeric-owner oci-layout index.json manifest.json repositories blobs)
mv -f "$tarball.tmp" "$tarball"
echo "$image_key" > "$tarball.stamp"
log "image assembled in $((SECONDS - t0))s"
report
