#!/usr/bin/env bash
# The NFS node side with real kernel mounts: stowage-node inside the QEMU node VM (NFSv3 and
# NFSv4.1 against nfs-ganesha on the host), plus a hung server that must not poison later calls.
set -uo pipefail
root=${STOWAGE_ROOT:?}
infra=$root/tests/infra
work=$(mktemp -d /tmp/stowage-nfs-vm.XXXXXX)
cleanup() {
  "$infra/node-vm.sh" stop --state "$work/vm" >/dev/null 2>&1
  "$infra/ganesha.sh" stop --state "$work/ganesha" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "$1"; echo "0 passed, 1 failed"; exit 1; }
"$infra/ganesha.sh" start --state "$work/ganesha" >/dev/null || fail "ganesha did not start"
set -a; . "$work/ganesha/env"; set +a
# The guest reaches the host by the host's own address (QEMU user networking).
STOWAGE_NFS_GUEST_SERVER=$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i=1;i<NF;i++) if ($i=="src") print $(i+1)}' | head -n1)
[ -n "$STOWAGE_NFS_GUEST_SERVER" ] || STOWAGE_NFS_GUEST_SERVER=$(hostname -I | awk '{print $1}')
printf 'backend: nfs\ninstances:\n  main:\n    server: %s\n    export: /export\n' "$STOWAGE_NFS_GUEST_SERVER" > "$work/node.yaml"
mkdir -p "$work/share"
out=$("$infra/node-vm.sh" start --state "$work/vm" --port 0 --share "$work/share" --env RUST_LOG=info -- \
  "$STOWAGE_BIN_DIR/stowage-node" --endpoint 'tcp://0.0.0.0:{PORT}' --node-id vm-node \
  --mount-timeout-secs 8 --kubelet-root "$work/share" --kubelet-registration=false --config "$work/node.yaml") || { tail -n 30 "$work/vm/console.log" 2>/dev/null; fail "node VM did not start"; }
eval "$out"
export STOWAGE_NODE_VM_ENDPOINT=$NODE_VM_ENDPOINT STOWAGE_NODE_VM_STATE=$work/vm STOWAGE_NODE_VM_SHARE=$work/share
export STOWAGE_NFS_GUEST_SERVER STOWAGE_REQUIRE_NODE_VM=1
log=$(mktemp)
# One test at a time: they share the guest and its exec spool.
cargo test -p stowage-tests --test nfs_node_vm --locked -- --test-threads 1 --nocapture 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || tail -n 40 "$work/vm/guest.log"
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
rm -f "$log"
[ "$rc" != 0 ] && [ "$failed" = 0 ] && failed=1
echo "$passed passed, $failed failed"
exit "$rc"
