#!/usr/bin/env bash
# Unit and integration tests of the workspace (cargo test): real binaries over their sockets,
# real mounts and loop devices on the local backend; NFS ones against ganesha when the nfs
# suite's server is running (this suite starts its own).
set -uo pipefail
root=${STOWAGE_ROOT:?}
state=$(mktemp -d /tmp/stowage-cargo-ganesha.XXXXXX)
trap '"$root/tests/infra/ganesha.sh" stop --state "$state" >/dev/null 2>&1; rm -rf "$state"' EXIT
"$root/tests/infra/ganesha.sh" start --state "$state" >/dev/null || { echo "ganesha did not start"; echo "0 passed, 1 failed"; exit 1; }
# shellcheck disable=SC1091
. "$state/env"
export STOWAGE_NFS_SERVER=$NFS_SERVER STOWAGE_NFS_EXPORT=$NFS_EXPORT STOWAGE_NFS_PORT=$NFS_PORT \
       STOWAGE_NFS_MOUNT_PORT=$MNT_PORT STOWAGE_NFS_EXPORT_DIR=$NFS_EXPORT_DIR STOWAGE_NFS_STATE=$state STOWAGE_REQUIRE_NFS=1
out=$(mktemp)
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
passed=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
rm -f "$out"
[ "$rc" != 0 ] && [ "${failed:-0}" = 0 ] && failed=1
echo "${passed:-0} passed, ${failed:-0} failed"
exit "$rc"
