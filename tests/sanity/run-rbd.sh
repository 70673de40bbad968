#!/usr/bin/env bash
# csi-sanity against the RBD backend: stowage-controller and stowage-node on this host, images
# attached with rbd-fuse + loop (these machines have no rbd/nbd kernel modules), cephx secrets
# passed as CSI secrets. Prints `N passed, N failed` from the JUnit report.
#
#   run-rbd.sh [--block]     filesystem volumes (ext4) by default, raw block with --block
#
# Uses the cluster named by STOWAGE_CEPH_ENV (tests/infra/ceph.sh's env file); without it,
# starts a cluster of its own and stops it at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${STOWAGE_BIN_DIR:?STOWAGE_BIN_DIR must point at the built binaries}
sanity=${CSI_SANITY:-csi-sanity}
mode=mount
[ "${1:-}" = --block ] && mode=block
own_cluster=""
if [ -z "${STOWAGE_CEPH_ENV:-}" ]; then
  own_cluster=$(mktemp -d /tmp/stowage-sanity-ceph.XXXXXX)
  "$here/../infra/ceph.sh" start --state "$own_cluster" >/dev/null
  STOWAGE_CEPH_ENV=$own_cluster/env
fi
# shellcheck disable=SC1090
. "$STOWAGE_CEPH_ENV"
work=$(mktemp -d "$CEPH_MNT_ROOT/sanity-$mode.XXXXXX")
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Leftovers in an order that cannot hang: filesystems, loop devices, then rbd-fuse mounts.
  grep -o " $work[^ ]*" /proc/self/mountinfo 2>/dev/null | sort -r | while read -r m; do
    case "$(awk -v m="$m" '$5 == m {print $9}' /proc/self/mountinfo | tail -1)" in fuse*) ;; *) umount -l "$m" 2>/dev/null || true ;; esac
  done
  for bf in /sys/block/loop*/loop/backing_file; do
    case "$(cat "$bf" 2>/dev/null)" in "$work"/*) losetup -d "/dev/$(basename "$(dirname "$(dirname "$bf")")")" 2>/dev/null || true ;; esac
  done
  grep -o " $work[^ ]*" /proc/self/mountinfo 2>/dev/null | sort -r | while read -r m; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
  [ -n "$own_cluster" ] && { "$here/../infra/ceph.sh" stop --state "$own_cluster" --purge >/dev/null 2>&1 || true; }
}
trap cleanup EXIT
cat > "$work/config.yaml" <<YAML
backend: rbd
instances:
  default:
    monitors: "$CEPH_MON_HOST"
    pool: $CEPH_RBD_POOL
    attach: rbd-fuse
    keyringFile: $CEPH_KEYRING
    runDir: $work/run
YAML
secret=$(printf '  userID: %s\n  userKey: %s\n' "$CEPH_USER" "$CEPH_ADMIN_KEY")
: > "$work/secrets.yaml"
for k in CreateVolumeSecret DeleteVolumeSecret ControllerPublishVolumeSecret ControllerUnpublishVolumeSecret \
         ControllerValidateVolumeCapabilitiesSecret NodeStageVolumeSecret NodePublishVolumeSecret \
         CreateSnapshotSecret DeleteSnapshotSecret ControllerExpandVolumeSecret ListSnapshotsSecret \
         GetSnapshotSecret; do
  printf '%s:\n%s\n' "$k" "$secret" >> "$work/secrets.yaml"
done
chmod 600 "$work/secrets.yaml"
printf 'qosIopsLimit: "1000"\n' > "$work/mutable.yaml"
"$bin/stowage-controller" --endpoint "unix://$work/controller.sock" --config "$work/config.yaml" > "$work/controller.log" 2>&1 & pids+=($!)
"$bin/stowage-node" --endpoint "unix://$work/node.sock" --config "$work/config.yaml" --node-id sanity-node \
  --max-volumes 3 --kubelet-root "$work" > "$work/node.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -S "$work/controller.sock" ] && [ -S "$work/node.sock" ] && break; sleep 0.1; done
# The node registers itself with the cluster (ID and attach limit) in the background.
for _ in $(seq 300); do grep -q "node registered with the backend" "$work/node.log" && break; sleep 0.1; done
rc=0
timeout 1500 "$sanity" \
  --csi.endpoint "unix://$work/node.sock" \
  --csi.controllerendpoint "unix://$work/controller.sock" \
  --csi.mountdir "$work/mnt" --csi.stagingdir "$work/staging" \
  --csi.secrets "$work/secrets.yaml" \
  --csi.testvolumeaccesstype "$mode" \
  --csi.testvolumemutableparameters "$work/mutable.yaml" \
  --csi.testnodevolumeattachlimit \
  --csi.testvolumesize 16777216 --csi.testvolumeexpandsize 33554432 \
  --ginkgo.junit-report "$work/junit.xml" > "$work/sanity.out" 2>&1 || rc=$?
if [ ! -f "$work/junit.xml" ]; then
  tail -50 "$work/sanity.out"; echo "0 passed, 1 failed"; exit 1
fi
[ "$rc" = 0 ] || { grep -E "FAIL|\[FAILED\]" -A8 "$work/sanity.out" | head -80 || true; tail -n 20 "$work/controller.log" "$work/node.log"; }
echo "== csi-sanity, rbd backend ($mode volumes) =="
python3 "$here/junit-summary.py" "$work/junit.xml" "$here/rbd.skips"
