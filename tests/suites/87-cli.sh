#!/usr/bin/env bash
# The `stowage` admin CLI (tests/it/cli.rs) against a real control plane (tests/infra/kube.sh,
# KCM binding), the real stowage-controller on the local backend and stowage-provisioner:
# `stowage status` on bound, pending, released and attach-failed objects; `stowage doctor`
# on a healthy setup, a broken backend and a broken node. Prints one line: N passed, N failed.
set -uo pipefail
# shellcheck source=tally.bash
. "$(dirname "$0")/tally.bash"
root=${STOWAGE_ROOT:?}
kube="$root/tests/infra/kube.sh"
work=$(mktemp -d /tmp/stowage-cli-suite.XXXXXX)
cleanup() {
  "$kube" stop --state "$work/kube" >/dev/null 2>&1
  "$root/tests/infra/ganesha.sh" stop --state "$work/ganesha" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! "$kube" build >"$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log"; echo "kube.sh build failed"; echo "0 passed, 1 failed"; exit 1
fi
# Pin this build's binaries with hard links (another build into the same target dir may
# replace them while we run).
bin=${STOWAGE_BIN_DIR:-${CARGO_TARGET_DIR:?}/debug}
mkdir -p "$work/bin"
for b in stowage stowage-controller stowage-node stowage-provisioner; do
  ln "$bin/$b" "$work/bin/$b" 2>/dev/null || cp "$bin/$b" "$work/bin/$b" || {
    echo "$bin/$b missing: build the workspace first"; echo "0 passed, 1 failed"; exit 1; }
done
export STOWAGE_BIN_DIR="$work/bin" STOWAGE_REQUIRE_KUBE=1

passed=0; failed=0
out="$work/out"
# doctor's NFS checks run against a real nfs-ganesha.
if "$root/tests/infra/ganesha.sh" start --state "$work/ganesha" >"$work/ganesha.log" 2>&1; then
  export STOWAGE_CLI_GANESHA_ENV="$work/ganesha/env"
else
  tail -n 20 "$work/ganesha.log"; echo "nfs-ganesha did not start"; failed=$((failed + 1))
fi
if ! "$kube" start --state "$work/kube" >"$work/kube-start.log" 2>&1; then
  tail -n 20 "$work/kube-start.log"; echo "control plane did not start"
  echo "$passed passed, $((failed + 1)) failed"; exit 1
fi
(
  set -a
  # shellcheck disable=SC1091
  . "$work/kube/env"
  set +a
  cargo test -p stowage-tests --locked --test cli -- --test-threads=1 --nocapture 2>&1
) | tee "$out"
tally_cargo "$out" "${PIPESTATUS[0]}"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
