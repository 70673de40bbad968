#!/usr/bin/env bash
# csi-sanity against `stowage-docker csi`, the endpoint of the Swarm cluster-volume package
# (docker-plugin/packaging/csi): Identity, Controller and Node on ONE socket, as Docker >= 23
# uses it, on the local backend with real bind mounts and loop devices. Prints
# `N passed, N failed` from the JUnit report; allowed skips in docker-csi.skips.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${STOWAGE_BIN_DIR:?STOWAGE_BIN_DIR must point at the built binaries}
sanity=${CSI_SANITY:-csi-sanity}
work=$(mktemp -d /tmp/stowage-sanity-docker-csi.XXXXXX)
pid=""
cleanup() {
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  { grep -o " $work[^ ]*" /proc/self/mountinfo 2>/dev/null || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
printf 'backend: local\ninstances:\n  default:\n    baseDir: %s/base\n' "$work" > "$work/config.yaml"
printf 'onDelete: delete\n' > "$work/mutable.yaml"
"$bin/stowage-docker" csi --endpoint "unix://$work/csi.sock" --config "$work/config.yaml" \
  --node-id swarm-node --max-volumes 12 --volume-root "$work" > "$work/plugin.log" 2>&1 & pid=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done
# The node registers itself with the backend in the background; ControllerPublish needs it.
for _ in $(seq 100); do grep -q "node registered" "$work/plugin.log" && break; sleep 0.1; done
rc=0
timeout 900 "$sanity" \
  --csi.endpoint "unix://$work/csi.sock" \
  --csi.mountdir "$work/mnt" --csi.stagingdir "$work/staging" \
  --csi.testvolumesize 16777216 --csi.testvolumeexpandsize 33554432 \
  --csi.testvolumemutableparameters "$work/mutable.yaml" \
  --csi.testnodevolumeattachlimit \
  --ginkgo.junit-report "$work/junit.xml" > "$work/sanity.out" 2>&1 || rc=$?
if [ ! -f "$work/junit.xml" ]; then
  tail -50 "$work/sanity.out"; echo "0 passed, 1 failed"; exit 1
fi
[ "$rc" = 0 ] || { grep -E "FAIL|\[FAILED\]" -A8 "$work/sanity.out" | head -80 || true; tail -n 20 "$work/plugin.log"; }
echo "== csi-sanity, stowage-docker csi (one socket), local backend =="
python3 "$here/junit-summary.py" "$work/junit.xml" "$here/docker-csi.skips"
