#!/usr/bin/env bash
# Installs what the tests need on Debian 12: packages (apt-get) and Go tools (go install), each
# only when missing. Idempotent; caches outside the checkout (~/.cache/stowage).
set -euo pipefail
cache=${STOWAGE_CACHE:-$HOME/.cache/stowage}
mkdir -p "$cache/bin"
pkgs=(nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils nfs-common fuse3 busybox-static xfsprogs
      e2fsprogs iproute2 util-linux cpio qemu-system-x86 python3 openssl procps psmisc kmod
      glusterfs-server glusterfs-client openssh-server openssh-client
      ceph-mon ceph-osd ceph-mgr ceph-common radosgw python3-rados uuid-runtime curl s3fs rbd-fuse rbd-nbd
      xz-utils zstd
      docker.io containerd runc iptables
      containernetworking-plugins umoci mmdebstrap gcc libc6-dev postgresql-client-15)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# The node VM downloads a Debian kernel package: apt's lists must know bookworm's kernels.
if ! apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | grep -q .; then
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
fi
command -v go >/dev/null || { echo "go is required (Go 1.26 is preinstalled on these machines)"; exit 1; }
if [ ! -x "$cache/bin/csi-sanity" ]; then
  echo "go install csi-sanity v5.5.0"
  GOBIN="$cache/bin" go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.5.0
fi
# The S3 backend's second mounter (no Debian package): ~4 min to build once, then cached.
if [ ! -x "$cache/bin/rclone" ]; then
  echo "go install rclone v1.76.0"
  GOBIN="$cache/bin" go install github.com/rclone/rclone@v1.76.0
fi
command -v cargo >/dev/null || { echo "cargo is required (Rust 1.95 is preinstalled)"; exit 1; }
echo "dependencies ready"
