#!/usr/bin/env bash
# csi-sanity against the S3 backend: stowage-controller and stowage-node on this machine, a real
# Ceph RADOS Gateway (tests/infra/ceph.sh --rgw; its env file is read from $STOWAGE_CEPH_STATE/env),
# real s3fs mounts. Bucket mode with a bucket prefix unique to the run, so nothing else on the
# gateway is touched. Prints `N passed, N failed`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${STOWAGE_BIN_DIR:?STOWAGE_BIN_DIR must point at the built binaries}
sanity=${CSI_SANITY:-csi-sanity}
state=${STOWAGE_CEPH_STATE:?STOWAGE_CEPH_STATE must name a running tests/infra/ceph.sh --rgw state dir}
# shellcheck disable=SC1091
. "$state/env"
: "${S3_ENDPOINT:?the ceph.sh state has no RGW (start it with --rgw)}"
work=$(mktemp -d /tmp/stowage-sanity-s3.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # (|| true: with pipefail a grep that finds nothing would end the trap before rm -rf)
  { grep -o " $work[^ ]*" /proc/self/mountinfo 2>/dev/null || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  # Mounters are not children of the plugin (by design): stop the ones of this run by name.
  for p in $(pgrep -x s3fs 2>/dev/null || true); do
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF "$work/" && kill "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
prefix=san$(basename "$work" | tr -dc 'a-zA-Z0-9' | tr 'A-Z' 'a-z' | tail -c 7)-
cat > "$work/config.yaml" <<EOC
backend: s3
nodeStateDir: $work/node-state
instances:
  rgw:
    endpoint: $S3_ENDPOINT
    region: ${S3_REGION:-us-east-1}
    pathStyle: true
    bucketPrefix: $prefix
EOC
secret="{accessKeyID: $S3_ACCESS_KEY, secretAccessKey: $S3_SECRET_KEY}"
{
  for k in CreateVolumeSecret DeleteVolumeSecret ControllerValidateVolumeCapabilitiesSecret \
           NodeStageVolumeSecret NodePublishVolumeSecret ControllerExpandVolumeSecret \
           ControllerModifyVolumeSecret; do
    echo "$k: $secret"
  done
} > "$work/secrets.yaml"
chmod 600 "$work/secrets.yaml"
printf 'onDelete: delete\n' > "$work/mutable.yaml"
"$bin/stowage-controller" --endpoint "unix://$work/controller.sock" --config "$work/config.yaml" > "$work/controller.log" 2>&1 & pids+=($!)
"$bin/stowage-node" --endpoint "unix://$work/node.sock" --config "$work/config.yaml" --node-id sanity-node --max-volumes 12 --kubelet-root "$work" > "$work/node.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -S "$work/controller.sock" ] && [ -S "$work/node.sock" ] && break; sleep 0.1; done
rc=0
timeout 1200 "$sanity" \
  --csi.endpoint "unix://$work/node.sock" \
  --csi.controllerendpoint "unix://$work/controller.sock" \
  --csi.mountdir "$work/mnt" --csi.stagingdir "$work/staging" \
  --csi.secrets "$work/secrets.yaml" \
  --csi.testvolumesize 16777216 --csi.testvolumeexpandsize 33554432 \
  --csi.testvolumemutableparameters "$work/mutable.yaml" \
  --csi.testnodevolumeattachlimit \
  --ginkgo.junit-report "$work/junit.xml" > "$work/sanity.out" 2>&1 || rc=$?
if [ ! -f "$work/junit.xml" ]; then
  tail -50 "$work/sanity.out"; echo "0 passed, 1 failed"; exit 1
fi
[ "$rc" = 0 ] || { grep -E "FAIL|\[FAILED\]" -A8 "$work/sanity.out" | head -80 || true; tail -n 20 "$work/controller.log" "$work/node.log"; }
# No secret may reach a log.
leak=0
grep -qF "$S3_SECRET_KEY" "$work/controller.log" "$work/node.log" "$work/sanity.out" && leak=1
# Nothing of the run may be left on the gateway: every volume was deleted.
left=$(AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY \
  curl -fsS --aws-sigv4 "aws:amz:${S3_REGION:-us-east-1}:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$S3_ENDPOINT/" 2>/dev/null \
  | grep -o "<Name>$prefix[^<]*</Name>" | head -5 || true)
echo "== csi-sanity, S3 backend (Ceph RGW, s3fs) =="
status=0
python3 "$here/junit-summary.py" "$work/junit.xml" "$here/s3.skips" || status=$?
if [ "$leak" = 1 ]; then echo "a secret reached a log"; echo "0 passed, 1 failed"; exit 1; fi
if [ -n "$left" ]; then echo "buckets left after the run: $left"; echo "0 passed, 1 failed"; exit 1; fi
exit $status
