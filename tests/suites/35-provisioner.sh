#!/usr/bin/env bash
# stowage-provisioner against a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler built by tests/infra/kube.sh), the real
# stowage-controller on the local backend, in both binder modes: a cluster whose KCM binds
# (--binder=kcm) and one started with --no-pv-binder (--binder=builtin); in each, once on the
# local backend and once on NFS against nfs-ganesha (tests/infra/ganesha.sh), then the attach and
# resize duties on the local backend and on RBD against a throw-away Ceph (tests/infra/ceph.sh;
# tests/it/attach_resize.rs), then the snapshot duty on the local backend
# (tests/it/snapshots.rs, with the CRDs of provisioner/deploy/crds). The provisioner
# runs with the ServiceAccount of provisioner/deploy/rbac.yaml. Prints one line: N passed,
# N failed.
#
# Cold: building the Kubernetes binaries takes 15-30 min once (cached in ~/.cache/stowage/kube);
# warm: about 3 min for both modes and both backends.
set -uo pipefail
# shellcheck source=tally.bash
. "$(dirname "$0")/tally.bash"
root=${STOWAGE_ROOT:?}
kube="$root/tests/infra/kube.sh"
work=$(mktemp -d /tmp/stowage-provisioner-suite.XXXXXX)
cleanup() {
  for m in kcm builtin; do "$kube" stop --state "$work/$m" >/dev/null 2>&1; done
  "$root/tests/infra/ganesha.sh" stop --state "$work/ganesha" >/dev/null 2>&1
  "$root/tests/infra/ceph.sh" stop --state "$work/ceph" --purge >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! "$kube" build >"$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log"; echo "kube.sh build failed"; echo "0 passed, 1 failed"; exit 1
fi

# The test binaries start stowage-controller and stowage-provisioner from STOWAGE_BIN_DIR. Pin
# this build's binaries with hard links: another build into the same target dir (another
# checkout) replaces the files in target/debug while we run, the links keep ours.
bin=${STOWAGE_BIN_DIR:-${CARGO_TARGET_DIR:?}/debug}
mkdir -p "$work/bin"
for b in stowage-controller stowage-node stowage-provisioner; do
  ln "$bin/$b" "$work/bin/$b" 2>/dev/null || cp "$bin/$b" "$work/bin/$b" || {
    echo "$bin/$b missing: build the workspace first"; echo "0 passed, 1 failed"; exit 1; }
done
export STOWAGE_BIN_DIR="$work/bin" STOWAGE_REQUIRE_KUBE=1

if ! "$root/tests/infra/ganesha.sh" start --state "$work/ganesha" >"$work/ganesha.log" 2>&1; then
  tail -n 20 "$work/ganesha.log"; echo "nfs-ganesha did not start"; echo "0 passed, 1 failed"; exit 1
fi

passed=0; failed=0
out="$work/out"

# RBD, the driver that needs attaching (ControllerPublish fences an image to one node): a
# throw-away Ceph (tests/infra/ceph.sh) for the attach and resize tests. If it does not start,
# that counts as a failure and the RBD test says it did not run.
if "$root/tests/infra/ceph.sh" start --state "$work/ceph" >"$work/ceph.log" 2>&1; then
  export STOWAGE_CEPH_ENV="$work/ceph/env" STOWAGE_REQUIRE_RBD=1
else
  tail -n 20 "$work/ceph.log"; echo "ceph did not start: the RBD attach test cannot run"
  failed=$((failed + 1))
fi
for mode in kcm builtin; do
  args=(start --state "$work/$mode")
  [ "$mode" = builtin ] && args+=(--no-pv-binder)
  echo "== provisioner, --binder=$mode =="
  if ! "$kube" "${args[@]}" >"$work/$mode-start.log" 2>&1; then
    tail -n 20 "$work/$mode-start.log"; echo "control plane ($mode) did not start"
    failed=$((failed + 1)); continue
  fi
  for backend in local nfs; do
    echo "-- backend $backend"
    (
      set -a
      # shellcheck disable=SC1091
      . "$work/$mode/env"
      if [ "$backend" = nfs ]; then
        # shellcheck disable=SC1091
        . "$work/ganesha/env"
        STOWAGE_PROVISIONER_BACKEND=nfs
      fi
      set +a
      # One test at a time: they share the cluster and the driver name.
      cargo test -p stowage-tests --locked --test provisioner -- --test-threads=1 2>&1
    ) | tee "$out"
    tally_cargo "$out" "${PIPESTATUS[0]}"
  done
  # Attach and resize duties (tests/it/attach_resize.rs), on the local backend (it advertises
  # PUBLISH_UNPUBLISH_VOLUME and EXPAND_VOLUME; the tests restart its controller with a size
  # limit and register node IDs through stowage-node) and on RBD against the Ceph above.
  echo "-- attach and resize, backends local and rbd"
  (
    set -a
    # shellcheck disable=SC1091
    . "$work/$mode/env"
    set +a
    cargo test -p stowage-tests --locked --test attach_resize -- --test-threads=1 2>&1
  ) | tee "$out"
  tally_cargo "$out" "${PIPESTATUS[0]}"
  # The snapshot duty (tests/it/snapshots.rs) on the local backend: snapshot, restore read
  # back through stowage-node, Delete and Retain checked on the backend, bad classes.
  echo "-- snapshots, backend local"
  (
    set -a
    # shellcheck disable=SC1091
    . "$work/$mode/env"
    set +a
    cargo test -p stowage-tests --locked --test snapshots -- --test-threads=1 2>&1
  ) | tee "$out"
  tally_cargo "$out" "${PIPESTATUS[0]}"
  "$kube" stop --state "$work/$mode" >/dev/null 2>&1
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
