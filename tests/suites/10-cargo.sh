#!/usr/bin/env bash
# Unit and integration tests of the workspace (cargo test): real binaries over their sockets,
# real mounts and loop devices on the local backend; NFS ones against ganesha (this suite
# starts its own). Test binaries that need another server are left to the suites that start it.
set -uo pipefail
root=${STOWAGE_ROOT:?}
state=$(mktemp -d /tmp/stowage-cargo-ganesha.XXXXXX)
trap '"$root/tests/infra/ganesha.sh" stop --state "$state" >/dev/null 2>&1; rm -rf "$state"' EXIT
"$root/tests/infra/ganesha.sh" start --state "$state" >/dev/null || { echo "ganesha did not start"; echo "0 passed, 1 failed"; exit 1; }
# shellcheck disable=SC1091
. "$state/env"
export STOWAGE_NFS_SERVER=$NFS_SERVER STOWAGE_NFS_EXPORT=$NFS_EXPORT STOWAGE_NFS_PORT=$NFS_PORT \
       STOWAGE_NFS_MOUNT_PORT=$MNT_PORT STOWAGE_NFS_EXPORT_DIR=$NFS_EXPORT_DIR STOWAGE_NFS_STATE=$state STOWAGE_REQUIRE_NFS=1
# Test binaries (and one test) that need a server this suite does not start: their own suites
# run them with the server. Run here they would only say "not configured" and count as passed.
server_bound=(nfs_node_vm s3_e2e s3_snapshots s3_faults s3_outage s3_secrets rbd rbd_outage
  rbd_krbd rbd_secrets gluster gluster_outage docker_engine docker_backends docker_cluster
  provisioner attach_resize snapshots cli)
server_bound_tests=(chaos_glusterfs chaos_s3 chaos_rbd)
for t in "${server_bound[@]}" "${server_bound_tests[@]}"; do
  grep -qw -- "$t" "$root"/tests/suites/[2-9]*.sh ||
    { echo "$t is left out here but no other suite runs it"; echo "0 passed, 1 failed"; exit 1; }
done
here=()
for t in $(awk '/^\[\[test\]\]/ {getline; if ($1 == "name") {gsub(/"/, "", $3); print $3}}' "$root/tests/Cargo.toml"); do
  [[ " ${server_bound[*]} " == *" $t "* ]] || here+=(--test "$t")
done
skips=()
for t in "${server_bound_tests[@]}"; do skips+=(--skip "$t"); done
out=$(mktemp)
{
  cargo test --workspace --exclude stowage-tests --locked --no-fail-fast 2>&1
  r1=$?
  cargo test -p stowage-tests --locked --no-fail-fast --lib --bins "${here[@]}" -- "${skips[@]}" 2>&1
  r2=$?
  [ "$r1" = 0 ] && [ "$r2" = 0 ]
} | tee "$out"
rc=${PIPESTATUS[0]}
passed=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
rm -f "$out"
[ "$rc" != 0 ] && [ "${failed:-0}" = 0 ] && failed=1
echo "${passed:-0} passed, ${failed:-0} failed"
exit "$rc"
