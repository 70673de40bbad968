#!/usr/bin/env bash
# csi-sanity against the NFS backend: stowage-controller on the host talking NFSv3 from user
# space to a real nfs-ganesha; stowage-node inside the QEMU node VM (a stock Debian kernel, since
# this host has no kernel NFS client) doing real `mount -t nfs` there, reached over TCP.
# NFS_VERS=3 (default) or 4.1 picks the protocol the node mounts with. SANITY_MULTI=1: the
# controller serves local and NFS from one `backends:` configuration (a socket per driver) and
# csi-sanity talks to its NFS socket.
# Prints `N passed, N failed` from the JUnit report.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
infra=$(cd "$here/../infra" && pwd)
bin=${STOWAGE_BIN_DIR:?STOWAGE_BIN_DIR must point at the built binaries}
sanity=${CSI_SANITY:-csi-sanity}
vers=${NFS_VERS:-3}
work=$(mktemp -d /tmp/stowage-sanity-nfs.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$infra/node-vm.sh" stop --state "$work/vm" >/dev/null 2>&1 || true
  "$infra/ganesha.sh" stop --state "$work/ganesha" >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$infra/ganesha.sh" start --state "$work/ganesha" >/dev/null
# shellcheck disable=SC1091
. "$work/ganesha/env"
# The server address must work from the host (controller) and from the guest (node): QEMU's
# user network reaches the host's own addresses, not its 127.0.0.1 under that name.
server=$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{for (i=1;i<NF;i++) if ($i=="src") print $(i+1)}' | head -n1)
[ -n "$server" ] || server=$(hostname -I | awk '{print $1}')
if [ "$vers" = 3 ]; then
  opts="[vers=3, proto=tcp, port=$NFS_PORT, mountport=$MNT_PORT, mountproto=tcp, nolock]"
else
  opts="[vers=$vers, port=$NFS_PORT]"
fi
cat > "$work/config.yaml" <<YAML
backend: nfs
instances:
  main:
    server: $server
    export: $NFS_EXPORT
    baseDir: sanity
    nfsPort: $NFS_PORT
    mountPort: $MNT_PORT
    mountOptions: $opts
YAML
printf 'onDelete: delete\n' > "$work/mutable.yaml"
ctl_endpoint="unix://$work/controller.sock"
ctl_sock="$work/controller.sock"
cp "$work/config.yaml" "$work/controller.yaml"
if [ "${SANITY_MULTI:-0}" = 1 ]; then
  # The NFS document above becomes the second entry of a backends: list after a local one.
  { printf 'backends:\n  - backend: local\n    instances:\n      default: { baseDir: %s }\n' "$work/local"
    sed -e '1s/^/  - /' -e '2,$s/^/    /' "$work/config.yaml"; } > "$work/controller.yaml"
  ctl_endpoint="unix://$work/ctl/{driver}.sock"
  ctl_sock="$work/ctl/nfs.stowage.io.sock"
fi
"$bin/stowage-controller" --endpoint "$ctl_endpoint" --config "$work/controller.yaml" > "$work/controller.log" 2>&1 & pids+=($!)
mkdir -p "$work/mnt" "$work/staging"
eval "$("$infra/node-vm.sh" start --state "$work/vm" --port 0 --share "$work" --env RUST_LOG=info -- \
  "$bin/stowage-node" --endpoint 'tcp://0.0.0.0:{PORT}' --node-id vm-node --max-volumes 12 --kubelet-root "$work" --kubelet-registration=false --config "$work/config.yaml")"
echo "node VM ready in ${NODE_VM_READY_SECONDS}s at $NODE_VM_ENDPOINT; NFS server $server, vers=$vers"
for _ in $(seq 100); do [ -S "$ctl_sock" ] && break; sleep 0.1; done
rc=0
timeout 1500 "$sanity" \
  --csi.endpoint "127.0.0.1:$NODE_VM_PORT" \
  --csi.controllerendpoint "unix://$ctl_sock" \
  --csi.mountdir "$work/mnt/target" --csi.stagingdir "$work/staging/stage" \
  --csi.testvolumesize 16777216 --csi.testvolumeexpandsize 33554432 \
  --csi.testvolumemutableparameters "$work/mutable.yaml" \
  --csi.testnodevolumeattachlimit \
  --ginkgo.junit-report "$work/junit.xml" > "$work/sanity.out" 2>&1 || rc=$?
if [ ! -f "$work/junit.xml" ]; then
  tail -n 50 "$work/sanity.out"; tail -n 30 "$work/vm/guest.log" || true; echo "0 passed, 1 failed"; exit 1
fi
if [ "$rc" != 0 ]; then
  grep -E "\[FAILED\]" -A8 "$work/sanity.out" | head -80 || true
  tail -n 30 "$work/controller.log" "$work/vm/guest.log" || true
fi
multi=""
[ "${SANITY_MULTI:-0}" = 1 ] && multi=", controller serving local + nfs"
echo "== csi-sanity, NFS backend (NFSv$vers, node in the VM$multi) =="
python3 "$here/junit-summary.py" "$work/junit.xml" "$here/nfs.skips"
