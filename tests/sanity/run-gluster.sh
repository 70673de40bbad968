#!/usr/bin/env bash
# csi-sanity against the GlusterFS backend: stowage-controller and stowage-node on this
# machine, a real glusterd (tests/infra/gluster.sh; its env file is read from
# $STOWAGE_GLUSTER_STATE/env), real FUSE mounts and quota. Prints `N passed, N failed`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${STOWAGE_BIN_DIR:?STOWAGE_BIN_DIR must point at the built binaries}
sanity=${CSI_SANITY:-csi-sanity}
state=${STOWAGE_GLUSTER_STATE:?STOWAGE_GLUSTER_STATE must name a running tests/infra/gluster.sh state dir}
# shellcheck disable=SC1091
. "$state/env"
work=$(mktemp -d /tmp/stowage-sanity-gluster.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  { grep -o " $work[^ ]*" /proc/self/mountinfo 2>/dev/null || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
base=sanity-$(basename "$work" | tr -dc 'a-zA-Z0-9' | tr 'A-Z' 'a-z')
cat > "$work/config.yaml" <<EOC
backend: glusterfs
instances:
  default:
    servers: [$GLUSTER_HOST]
    volume: $GLUSTER_VOLUME
    baseDir: $base
    glusterd:
      socket: $GLUSTER_SOCK
    stateDir: $work/state
    cliTimeoutSecs: 60
EOC
printf 'onDelete: delete\n' > "$work/mutable.yaml"
"$bin/stowage-controller" --endpoint "unix://$work/controller.sock" --config "$work/config.yaml" > "$work/controller.log" 2>&1 & pids+=($!)
"$bin/stowage-node" --endpoint "unix://$work/node.sock" --config "$work/config.yaml" --node-id sanity-node --max-volumes 12 --kubelet-root "$work" > "$work/node.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -S "$work/controller.sock" ] && [ -S "$work/node.sock" ] && break; sleep 0.1; done
rc=0
timeout 1200 "$sanity" \
  --csi.endpoint "unix://$work/node.sock" \
  --csi.controllerendpoint "unix://$work/controller.sock" \
  --csi.mountdir "$work/mnt" --csi.stagingdir "$work/staging" \
  --csi.testvolumesize 16777216 --csi.testvolumeexpandsize 33554432 \
  --csi.testvolumemutableparameters "$work/mutable.yaml" \
  --csi.testnodevolumeattachlimit \
  --ginkgo.junit-report "$work/junit.xml" > "$work/sanity.out" 2>&1 || rc=$?
if [ ! -f "$work/junit.xml" ]; then
  tail -50 "$work/sanity.out"; echo "0 passed, 1 failed"; exit 1
fi
[ "$rc" = 0 ] || { grep -E "FAIL|\[FAILED\]" -A8 "$work/sanity.out" | head -80 || true; tail -n 20 "$work/controller.log" "$work/node.log"; }
# Nothing of the run may be left on the volume: every volume and snapshot was deleted.
left=$(find "$GLUSTER_BRICK/$base" -mindepth 1 -maxdepth 1 ! -name .stowage 2>/dev/null | head -5 || true)
echo "== csi-sanity, GlusterFS backend =="
python3 "$here/junit-summary.py" "$work/junit.xml" "$here/glusterfs.skips"
if [ -n "$left" ]; then echo "left on the volume after the run: $left"; echo "0 passed, 1 failed"; exit 1; fi
