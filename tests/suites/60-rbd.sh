#!/usr/bin/env bash
# Ceph RBD backend against a real single-node Ceph (tests/infra/ceph.sh: mon + mgr + bluestore
# OSD on a sparse file). On the host: the integration tests (rbd-fuse + loop attachments, OSD
# outage), the kill -9 campaign (chaos_rbd) and csi-sanity for filesystem and for block
# volumes. In the QEMU node VM (stock kernel with the rbd module): the krbd path, with Ceph on
# an address of a private network namespace that the guest reaches through QEMU's NAT (the
# kernel client refuses loopback). About 4-5 minutes.
set -uo pipefail
root=${STOWAGE_ROOT:?}
infra=$root/tests/infra

# The krbd part, run in a private network namespace (see below): a second cluster on a
# non-loopback address of a dummy interface, the node VM, and the krbd test.
if [ "${1:-}" = --krbd-vm ]; then
  work=$2
  addr=10.231.60.1
  vm_cleanup() {
    "$infra/node-vm.sh" stop --state "$work/vm" >/dev/null 2>&1
    "$infra/ceph.sh" stop --state "$work/ceph-vm" --purge >/dev/null 2>&1
  }
  trap vm_cleanup EXIT
  ip link set lo up && ip link add stwrbd0 type veth peer name stwrbd1 && ip addr add "$addr/24" dev stwrbd0 &&
    ip link set stwrbd0 up && ip link set stwrbd1 up || { echo "network namespace setup failed"; echo "0 passed, 1 failed"; exit 1; }
  "$infra/ceph.sh" start --state "$work/ceph-vm" --public-addr "$addr" >/dev/null ||
    { echo "ceph on $addr did not start"; echo "0 passed, 1 failed"; exit 1; }
  set -a; . "$work/ceph-vm/env"; set +a
  printf 'backend: rbd\ninstances:\n  default:\n    monitors: "%s"\n    pool: rbd\n    attach: krbd\n    keyringFile: %s\n' \
    "$CEPH_MON_HOST" "$CEPH_KEYRING" > "$work/vm-node.yaml"
  mkdir -p "$work/share"
  out=$("$infra/node-vm.sh" start --state "$work/vm" --port 0 --share "$work/share" --env RUST_LOG=info -- \
    "$STOWAGE_BIN_DIR/stowage-node" --endpoint 'tcp://0.0.0.0:{PORT}' --node-id vm-node \
    --kubelet-root "$work/share" --kubelet-registration=false --config "$work/vm-node.yaml") || { tail -n 30 "$work/vm/console.log" 2>/dev/null; echo "node VM did not start"; echo "0 passed, 1 failed"; exit 1; }
  eval "$out"
  export STOWAGE_NODE_VM_ENDPOINT=$NODE_VM_ENDPOINT STOWAGE_NODE_VM_STATE=$work/vm \
    STOWAGE_NODE_VM_SHARE=$work/share STOWAGE_NODE_VM_SH=$infra/node-vm.sh STOWAGE_REQUIRE_NODE_VM=1 \
    STOWAGE_CEPH_ENV=$work/ceph-vm/env STOWAGE_REQUIRE_RBD=1
  cargo test -p stowage-tests --locked --test rbd_krbd -- --test-threads 1
  rc=$?
  [ "$rc" = 0 ] || tail -n 40 "$work/vm/guest.log"
  exit "$rc"
fi
work=$(mktemp -d /tmp/stowage-rbd.XXXXXX)
cleanup() {
  "$infra/ceph.sh" stop --state "$work/ceph" --purge >/dev/null 2>&1
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
pass=0 fail=0
count() { # log file: adds cargo's or the sanity summary's counts
  local p f
  p=$(grep -E '^test result:' "$1" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
  f=$(grep -E '^test result:' "$1" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
  if [ "$p$f" = 00 ]; then
    p=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n1 | awk '{print $1}')
    f=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n1 | awk '{print $3}')
  fi
  [ "$2" != 0 ] && [ "${f:-0}" = 0 ] && f=1
  pass=$((pass + ${p:-0})); fail=$((fail + ${f:-0}))
}

if ! "$infra/ceph.sh" start --state "$work/ceph" >/dev/null; then
  echo "ceph did not start"; echo "0 passed, 1 failed"; exit 1
fi
export STOWAGE_CEPH_ENV=$work/ceph/env STOWAGE_REQUIRE_RBD=1 STOWAGE_CEPH_SH=$infra/ceph.sh

log=$work/cargo.log
# One test at a time: the outage test stops the only OSD.
cargo test -p stowage-tests --locked --test rbd --test rbd_outage --test rbd_secrets -- --test-threads 1 2>&1 | tee "$log"
count "$log" "${PIPESTATUS[0]}"

# R2 on RBD: controller and node SIGKILLed at random points (tests/it/chaos.rs; the suite
# 10-cargo leaves this one out, having no cluster).
log=$work/chaos.log
cargo test -p stowage-tests --locked --test chaos -- --nocapture chaos_rbd 2>&1 | tee "$log"
count "$log" "${PIPESTATUS[0]}"

for mode in "" --block; do
  log=$work/sanity$mode.log
  "$root/tests/sanity/run-rbd.sh" $mode 2>&1 | tee "$log"
  count "$log" "${PIPESTATUS[0]}"
done

# krbd in the node VM. The kernel client refuses a monitor on loopback ("wrong peer"), so that
# cluster advertises an address of a veth interface in a private network namespace, which the
# guest reaches through QEMU's user-mode NAT; nothing of it is visible outside the namespace.
log=$work/krbd.log
"$infra/node-vm.sh" build >/dev/null 2>&1 || true # needs apt the first time: outside the namespace
mkdir -p "$work/krbd"
unshare --net bash "$0" --krbd-vm "$work/krbd" 2>&1 | tee "$log"
count "$log" "${PIPESTATUS[0]}"

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
