#!/usr/bin/env bash
# csi-sanity against the local backend: stowage-controller and stowage-node on unix sockets,
# real bind mounts and loop devices. Prints `N passed, N failed` from the JUnit report.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${STOWAGE_BIN_DIR:?STOWAGE_BIN_DIR must point at the built binaries}
sanity=${CSI_SANITY:-csi-sanity}
work=$(mktemp -d /tmp/stowage-sanity-local.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Anything csi-sanity left mounted under the work dir goes before the dir does.
  { grep -o " $work[^ ]*" /proc/self/mountinfo 2>/dev/null || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
printf 'backend: local\ninstances:\n  default:\n    baseDir: %s/base\n' "$work" > "$work/config.yaml"
printf 'onDelete: delete\n' > "$work/mutable.yaml"
"$bin/stowage-controller" --endpoint "unix://$work/controller.sock" --config "$work/config.yaml" > "$work/controller.log" 2>&1 & pids+=($!)
"$bin/stowage-node" --endpoint "unix://$work/node.sock" --config "$work/config.yaml" --node-id sanity-node --max-volumes 12 --kubelet-root "$work" > "$work/node.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -S "$work/controller.sock" ] && [ -S "$work/node.sock" ] && break; sleep 0.1; done
rc=0
timeout 900 "$sanity" \
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
echo "== csi-sanity, local backend =="
python3 "$here/junit-summary.py" "$work/junit.xml" "$here/local.skips"
