#!/usr/bin/env bash
# GlusterFS backend against a real glusterd (tests/infra/gluster.sh): integration tests (quota
# enforced and expanded online, concurrent creates, snapshots/clones/recycle/onDelete, dead
# FUSE mounts healed, bad input), then glusterd outages (a separate test binary, since it stops
# the machine's one glusterd), the kill -9 campaign (chaos_glusterfs), then csi-sanity. Prints
# one line: N passed, N failed.
set -uo pipefail
# shellcheck source=tally.bash
. "$(dirname "$0")/tally.bash"
root=${STOWAGE_ROOT:?}
state=$(mktemp -d /tmp/stowage-gluster.XXXXXX)
# FUSE clients log to /var/log/glusterfs/<mount path>.log: drop those of this run's temp mounts.
trap '"$root/tests/infra/gluster.sh" stop --state "$state" >/dev/null 2>&1; rm -rf "$state"
      "$root/tests/infra/sshd.sh" stop --state "$state-sshd" >/dev/null 2>&1
      rm -f /var/log/glusterfs/tmp-.tmp*.log /var/log/glusterfs/tmp-stowage-sanity-gluster.*.log' EXIT
# Another suite or developer may hold the machine's one glusterd for a while: wait, bounded.
if ! GLUSTER_PORT_WAIT=300 "$root/tests/infra/gluster.sh" start --state "$state" >/dev/null; then
  echo "glusterd did not start"; echo "0 passed, 1 failed"; exit 1
fi
# A real sshd on 127.0.0.1 for the controller's SSH executor (the CLI run on a gluster server).
if ! "$root/tests/infra/sshd.sh" start --state "$state-sshd" >/dev/null; then
  echo "sshd did not start"; echo "0 passed, 1 failed"; exit 1
fi
set -a
# shellcheck disable=SC1091
. "$state/env"
# shellcheck disable=SC1091
. "$state-sshd/env"
set +a
export STOWAGE_REQUIRE_GLUSTER=1 STOWAGE_GLUSTER_STATE="$state"
passed=0; failed=0
out=$(mktemp)
for t in gluster gluster_outage; do
  cargo test -p stowage-tests --locked --test "$t" 2>&1 | tee "$out"
  tally_cargo "$out" "${PIPESTATUS[0]}"
done
# R2 on GlusterFS: controller and node SIGKILLed at random points (tests/it/chaos.rs; the
# suite 10-cargo leaves this one out, having no glusterd).
cargo test -p stowage-tests --locked --test chaos -- --nocapture chaos_glusterfs 2>&1 | tee "$out"
tally_cargo "$out" "${PIPESTATUS[0]}"
bash "$root/tests/sanity/run-gluster.sh" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1)
p=$(echo "${line:-0 passed, 1 failed}" | awk '{print $1}'); f=$(echo "${line:-0 passed, 1 failed}" | awk '{print $3}')
[ "$rc" != 0 ] && [ "$f" = 0 ] && f=1
passed=$((passed + p)); failed=$((failed + f))
rm -f "$out"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
