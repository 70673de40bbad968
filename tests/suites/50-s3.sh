#!/usr/bin/env bash
# S3 backend against a real Ceph RADOS Gateway (tests/infra/ceph.sh --rgw): integration tests
# (bucket and prefix mode end to end with bytes checked through the S3 API, rclone mounts,
# templates/retain/archive/recycle, versioned buckets, over-size condition, killed mounters and
# plugin restarts healed, wrong credentials, gateway cut off mid-create, refused batch deletes,
# bad input), then a real radosgw kill and restart (separate binary: it takes the gateway away),
# the kill -9 campaign (chaos_s3), then csi-sanity. Prints one line: N passed, N failed.
set -uo pipefail
# shellcheck source=tally.bash
. "$(dirname "$0")/tally.bash"
root=${STOWAGE_ROOT:?}
state=$(mktemp -d /tmp/stowage-s3-ceph.XXXXXX)
trap '"$root/tests/infra/ceph.sh" stop --state "$state" --purge >/dev/null 2>&1; rm -rf "$state"' EXIT
if ! "$root/tests/infra/ceph.sh" start --state "$state" --rgw >/dev/null; then
  echo "ceph (with radosgw) did not start"; echo "0 passed, 1 failed"; exit 1
fi
set -a
# shellcheck disable=SC1091
. "$state/env"
set +a
export STOWAGE_S3_ENDPOINT=$S3_ENDPOINT STOWAGE_S3_ACCESS_KEY=$S3_ACCESS_KEY STOWAGE_S3_SECRET_KEY=$S3_SECRET_KEY \
       STOWAGE_REQUIRE_S3=1 STOWAGE_CEPH_STATE="$state" STOWAGE_CEPH_SH="$root/tests/infra/ceph.sh"
# rclone is the second mounter (tests/infra/deps.sh builds it into the cache).
export PATH=${STOWAGE_CACHE:-$HOME/.cache/stowage}/bin:$PATH
passed=0; failed=0
out=$(mktemp)
for t in s3_e2e s3_faults s3_outage s3_secrets s3_snapshots; do
  cargo test -p stowage-tests --locked --test "$t" 2>&1 | tee "$out"
  tally_cargo "$out" "${PIPESTATUS[0]}"
done
# R2 on S3: controller and node SIGKILLed at random points (tests/it/chaos.rs; the suite
# 10-cargo leaves this one out, having no gateway).
cargo test -p stowage-tests --locked --test chaos -- --nocapture chaos_s3 2>&1 | tee "$out"
tally_cargo "$out" "${PIPESTATUS[0]}"
bash "$root/tests/sanity/run-s3.sh" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1)
p=$(echo "${line:-0 passed, 1 failed}" | awk '{print $1}'); f=$(echo "${line:-0 passed, 1 failed}" | awk '{print $3}')
[ "$rc" != 0 ] && [ "$f" = 0 ] && f=1
passed=$((passed + p)); failed=$((failed + f))
rm -f "$out"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
