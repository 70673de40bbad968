#!/usr/bin/env bash
# selftest.sh - end-to-end check of tests/infra/node-vm.sh against a real NFS server.
#
# Starts nfs-ganesha (tests/infra/ganesha.sh) and then, RUNS times (default 3): boots the node
# VM with a TCP echo server as its command, checks the echo through the port forward, mounts the
# export with the kernel NFS client in the guest (NFSv3 and NFSv4.1), writes files, checks them
# in the export dir on the host, runs a loop device + ext4 round trip and a host-built Rust
# binary in the guest, stops the VM (with the NFS mounts still in place) and checks that no
# QEMU is left.
#
# By default it runs in a private network + mount namespace (own loopback, own rpcbind, own
# /run), so it neither sees nor disturbs other rpcbind/ganesha users on the machine.
# NODE_VM_SELFTEST_ISOLATE=0 runs it in the current namespaces instead.
# Env: RUNS (3), WORK (${TMPDIR:-/tmp}/nodevm-selftest), RUST_BIN (optional: a glibc binary to
# run in the guest with --help).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
N=$HERE/../node-vm.sh
G=$HERE/../ganesha.sh
RUNS=${RUNS:-3}
W=${WORK:-${TMPDIR:-/tmp}/nodevm-selftest}

if [ "${NODE_VM_SELFTEST_ISOLATE:-1}" = 1 ] && [ -z "${NODE_VM_SELFTEST_INNER:-}" ]; then
    export NODE_VM_SELFTEST_INNER=1
    exec unshare --net --mount --propagation private "$0" "$@"
fi
if [ -n "${NODE_VM_SELFTEST_INNER:-}" ]; then
    ip link set lo up
    # ganesha resolves Bind_addr 0.0.0.0 with AI_ADDRCONFIG: with only lo there is "no address"
    ip link add nvst0 type veth peer name nvst1
    ip addr add 10.231.0.1/24 dev nvst0
    ip link set nvst0 up
    ip link set nvst1 up
    mount -t tmpfs -o mode=755 nodevm-selftest-run /run # rpcbind's socket and lock live here
    mkdir -p /run/rpcbind
fi

rm -rf "$W"
mkdir -p "$W/mnt"
trap '"$N" stop --state "$W/vm" || true; "$G" stop --state "$W/ganesha" >/dev/null 2>&1 || true' EXIT
"$G" start --state "$W/ganesha" >/dev/null
# shellcheck disable=SC1091
. "$W/ganesha/env"
echo from-host >"$NFS_EXPORT_DIR/host.txt"
secs() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

pass=0 fail=0
for i in $(seq 1 "$RUNS"); do
    echo "=== run $i/$RUNS"
    ok=1
    t0=$EPOCHREALTIME
    "$N" start --state "$W/vm" --port 0 --share "$W/mnt" -- busybox nc -ll -p '{PORT}' -e /bin/cat >/dev/null
    ready=$(secs "$t0")
    # shellcheck disable=SC1091
    . "$W/vm/env"
    rss=$(awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$NODE_VM_PID/status")
    echo_back=$(echo "hello-$i" | timeout 5 busybox nc -w 2 127.0.0.1 "$NODE_VM_PORT" || true)
    [ "$echo_back" = "hello-$i" ] || { echo "FAIL: echo through the port forward gave '$echo_back'"; ok=0; }

    t1=$EPOCHREALTIME
    if ! "$N" exec --state "$W/vm" --timeout 60 -- bash -c "
        set -e; mkdir -p $W/mnt/v3 $W/mnt/v4
        mount -t nfs -o vers=3,proto=tcp,port=$NFS_PORT,mountport=$MNT_PORT,mountproto=tcp,nolock,retry=0 10.0.2.2:/export $W/mnt/v3
        mount -t nfs4 -o vers=4.1,port=$NFS_PORT,retry=0 10.0.2.2:/export $W/mnt/v4
        echo run$i-v3 >$W/mnt/v3/run$i-v3.txt; echo run$i-v4 >$W/mnt/v4/run$i-v4.txt; sync
        test \"\$(cat $W/mnt/v3/host.txt)\" = from-host; test \"\$(cat $W/mnt/v4/host.txt)\" = from-host"; then
        echo "FAIL: NFS in the guest"
        ok=0
    fi
    nfs=$(secs "$t1")
    if [ "$(cat "$NFS_EXPORT_DIR/run$i-v3.txt" 2>/dev/null)" != "run$i-v3" ] ||
        [ "$(cat "$NFS_EXPORT_DIR/run$i-v4.txt" 2>/dev/null)" != "run$i-v4" ]; then
        echo "FAIL: files written over NFS are not in $NFS_EXPORT_DIR"
        ok=0
    fi
    in_guest=$("$N" exec --state "$W/vm" -- sh -c "grep -c ' $W/mnt/v[34] nfs' /proc/mounts" || true)
    on_host=$(grep -c " $W/mnt/v[34] " /proc/mounts || true)
    [ "$in_guest" = 2 ] && [ "$on_host" = 0 ] || { echo "FAIL: mounts in guest=$in_guest (want 2), on host=$on_host (want 0)"; ok=0; }
    if ! "$N" exec --state "$W/vm" --timeout 60 -- bash -c "
        set -e; truncate -s 64M $W/mnt/disk.img; dev=\$(losetup --find --show $W/mnt/disk.img)
        mkfs.ext4 -q \$dev; mkdir -p /mnt/loop; mount \$dev /mnt/loop; echo ok >/mnt/loop/f
        umount /mnt/loop; losetup -d \$dev" >/dev/null; then
        echo "FAIL: loop + ext4 in the guest"
        ok=0
    fi
    rc=0
    "$N" exec --state "$W/vm" --timeout 3 -- sleep 30 2>/dev/null || rc=$?
    [ "$rc" = 124 ] || { echo "FAIL: exec timeout gave rc $rc (want 124)"; ok=0; }
    if [ -n "${RUST_BIN:-}" ]; then
        t2=$EPOCHREALTIME
        "$N" exec --state "$W/vm" -- "$RUST_BIN" --help >/dev/null 2>&1 || { echo "FAIL: $RUST_BIN in the guest"; ok=0; }
        echo "rust binary --help in the guest: $(secs "$t2") s"
    fi
    peak=$(awk '/VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$NODE_VM_PID/status")

    t3=$EPOCHREALTIME
    "$N" stop --state "$W/vm" 2>/dev/null # NFS mounts still in place: stop copes with them
    stop=$(secs "$t3")
    left=$( (pgrep -f "qemu-system-x86_64.*$W/vm" || true) | wc -l)
    [ "$left" = 0 ] || { echo "FAIL: $left QEMU process(es) left after stop"; ok=0; }
    echo "start->ready ${ready}s, RSS ${rss} MiB (peak ${peak} MiB), NFS v3+v4 mount+write ${nfs}s, stop ${stop}s"
    if [ "$ok" = 1 ]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
done
echo "node-vm selftest: $pass passed, $fail failed"
[ "$fail" = 0 ]
