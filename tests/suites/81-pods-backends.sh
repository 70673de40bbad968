#!/usr/bin/env bash
# Pods on the network backends with a REAL kubelet (the node of tests/suites/80-pods.sh, the
# helpers of tests/pods/lib.bash): GlusterFS (tests/infra/gluster.sh), S3 and RBD through
# rbd-fuse (one Ceph with radosgw, tests/infra/ceph.sh --rgw), resize in a running pod, and
# MariaDB and PostgreSQL StatefulSets on RBD and GlusterFS killed with SIGKILL mid-insert. Per backend one stowage-controller, one
# stowage-node (registering itself with kubelet) and one stowage-provisioner (provision, attach,
# resize duties) on the host; the CSIDriver objects are the chart's (provisioner/deploy/csidriver).
# stowage-node SIGKILLed under a pod writing on each FUSE volume (GlusterFS, S3, rbd-fuse), and
# with the volume's FUSE helper (as a restart of its container does): the mount healed.
# A second kubelet node (own containerd and network) runs the GlusterFS and RBD node plugins:
# ReadWriteMany across nodes, and an RBD ReadWriteOnce volume moving from one node to the other.
# Each scenario prints PASS/FAIL with its figures; the last line is `N passed, N failed`.
#
# Measured here (2 cores shared with four other engineers), before the 5 node-kill scenarios: 10 scenarios in 8.5-10.5 min at a
# load average of 13; an earlier run took 5.3 min (with MariaDB on local then, ~1
# min quicker than on GlusterFS). Pod apply to first write on a bound claim: GlusterFS 2.7-4.4
# s, S3 2.1-3.2 s; RBD attached 0.4-0.7 s after the attach duty resumed, first write 3.8-7.6 s
# after; MariaDB ready 16 s (RBD) / 56-71 s (GlusterFS: install-db on FUSE) after apply, back
# 3.7-5.6 s after kill -9 with every acknowledged row (e.g. 920 on RBD, 659 on GlusterFS).
#
# Not here: NFS and krbd (kernel modules only the QEMU guest has; see 31-nfs-node-vm, 60-rbd).
set -uo pipefail
suite=81-pods
# shellcheck source=../pods/lib.bash
. "${STOWAGE_ROOT:-$(dirname "$0")/../..}/tests/pods/lib.bash"
gluster="$root/tests/infra/gluster.sh"
ceph="$root/tests/infra/ceph.sh"
pods_cleanup_hook() {
  "$kubelet" stop --state "$work/node2" >/dev/null 2>&1
  "$gluster" stop --state "$work/gluster" >/dev/null 2>&1
  "$ceph" stop --state "$work/ceph" --purge >/dev/null 2>&1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Servers start while the control plane and node come up. glusterd is one per machine: wait,
# bounded, for another suite's to go.
( GLUSTER_PORT_WAIT=300 "$gluster" start --state "$work/gluster" >"$work/gluster-start.log" 2>&1; echo $? > "$work/gluster-start.rc" ) &
( "$ceph" start --state "$work/ceph" --rgw >"$work/ceph-start.log" 2>&1; echo $? > "$work/ceph-start.rc" ) &
servers_t=$SECONDS
pods_setup
pods_bins
# A second node (its own kubelet, containerd and network) for ReadWriteMany across nodes and an
# RBD volume moving between nodes.
node2_n=""
for n in 1 2 3 4 5 6 7 8 9; do ip link show "stowk${n}a" >/dev/null 2>&1 || { node2_n=$n; break; }; done
[ -n "$node2_n" ] || bail "no free kubelet node number for the second node"
( "$kubelet" start --state "$work/node2" --kube-state "$work/kube" --node "$node2_n" >"$work/kubelet2-start.log" 2>&1; echo $? > "$work/kubelet2-start.rc" ) &
wait
[ "$(cat "$work/kubelet2-start.rc")" = 0 ] || { tail -n 20 "$work/kubelet2-start.log"; bail "second kubelet node did not become Ready"; }
node2=$(. "$work/node2/env"; echo "$KUBELET_NODE_NAME"); node2_root=$(. "$work/node2/env"; echo "$KUBELET_ROOT")
node2_state=$(. "$work/node2/env"; echo "$KUBELET_STATE")
# The MariaDB image (~100 MB) goes into node 1's containerd while the first scenarios run.
"$images" import "$CONTAINERD_SOCK" mariadb >"$work/mariadb-image.log" 2>&1 &
mariadb_import=$!; pids+=("$mariadb_import")
# Every pod goes to the first node unless a scenario says otherwise (nodeSelector: the
# scheduler still applies its volume checks).
pod_node=$KUBELET_NODE_NAME
[ "$(cat "$work/gluster-start.rc")" = 0 ] || { tail -n 10 "$work/gluster-start.log"; bail "glusterd did not start"; }
[ "$(cat "$work/ceph-start.rc")" = 0 ] || { tail -n 10 "$work/ceph-start.log"; bail "ceph with radosgw did not start"; }
say "glusterd and ceph+rgw ready $((SECONDS - servers_t))s after start (beside the control plane)"
# shellcheck disable=SC1091
. "$work/gluster/env"
# shellcheck disable=SC1091
. "$work/ceph/env"

# --- one driver per backend ---------------------------------------------------------------
# start_driver NAME DRIVER CONFIG: controller, node (self-registering), provisioner, CSIDriver.
# start_node_plugin NAME DRIVER CONFIG KUBELET_ROOT NODE: a stowage-node for that kubelet.
start_node_plugin() {
  local sock="$4/plugins/$2/csi.sock" tag=$1-node${6:-}
  mkdir -p "$4/plugins/$2" "$4/plugins_registry"
  setsid "$work/bin/stowage-node" --endpoint "unix://$sock" --config "$3" --node-id "$5" \
    --kubelet-root "$4" --kubelet-registration-path "$sock" </dev/null >>"$work/$tag.log" 2>&1 &
  echo $! > "$work/$tag.pid"
  disown $!   # the SIGKILL scenarios kill it: no "Killed" job report from bash
  until_ok 30 sock_up "$sock" || { tail -n 20 "$work/$tag.log"; bail "stowage-node ($tag) socket did not come up"; }
}
# start_driver NAME DRIVER CONFIG: controller, node (self-registering), provisioner, CSIDriver.
start_driver() {
  start_controller "$1" "$3"
  start_node_plugin "$1" "$2" "$3" "$KUBELET_ROOT" "$KUBELET_NODE_NAME"
  start_provisioner "$1"
  k apply -f "$root/provisioner/deploy/csidriver/$1.yaml" >/dev/null || bail "CSIDriver $2 did not apply"
}
registered() { [ "$(reg_count "$1")" -gt 0 ]; }

id=${ns##*-}
cat > "$work/glusterfs.yaml" <<EOF
backend: glusterfs
instances:
  default:
    servers: [$GLUSTER_HOST]
    volume: $GLUSTER_VOLUME
    baseDir: pods-$id
    glusterd:
      socket: $GLUSTER_SOCK
    stateDir: $work/gluster-ctl
    cliTimeoutSecs: 60
    dirMode: "0777"
EOF
cat > "$work/s3.yaml" <<EOF
backend: s3
nodeStateDir: $work/s3-node
instances:
  default:
    endpoint: $S3_ENDPOINT
    region: ${S3_REGION:-us-east-1}
    pathStyle: true
    mode: bucket
    bucketPrefix: pods-$id-
    mounter: s3fs
EOF
cat > "$work/rbd.yaml" <<EOF
backend: rbd
instances:
  default:
    monitors: "$CEPH_MON_HOST"
    pool: $CEPH_RBD_POOL
    attach: rbd-fuse
    keyringFile: $CEPH_KEYRING
    runDir: $work/rbd-run
    imagePrefix: pods-$id-
EOF
mkdir -p "$work/local"
cat > "$work/local.yaml" <<EOF
backend: local
instances:
  default:
    baseDir: $work/local
    dirMode: "0777"
    capacity: image
EOF
# The second node runs the GlusterFS and RBD plugins (its own rbd-fuse run directory).
sed "s|runDir: $work/rbd-run|runDir: $work/rbd-run-2|" "$work/rbd.yaml" > "$work/rbd-2.yaml"
t=$SECONDS
for b in glusterfs s3 rbd local; do start_driver "$b" "$b.stowage.io" "$work/$b.yaml"; done
start_node_plugin glusterfs glusterfs.stowage.io "$work/glusterfs.yaml" "$node2_root" "$node2" 2
start_node_plugin rbd rbd.stowage.io "$work/rbd-2.yaml" "$node2_root" "$node2" 2
for b in glusterfs s3 rbd local; do
  until_ok 40 registered "$b.stowage.io" ||
    bail "kubelet did not register $b.stowage.io within 40 s: $(grep -o 'RegisterPlugin error.*' "$KUBELET_STATE/logs/kubelet.log" | tail -n 1 | cut -c1-300)"
done
registered2() { [ "$(grep -c "Register new plugin with name: $1" "$node2_state/logs/kubelet.log" 2>/dev/null)" -gt 0 ]; }
for b in glusterfs rbd; do
  until_ok 40 registered2 "$b.stowage.io" || bail "the second kubelet did not register $b.stowage.io within 40 s"
done
say "4 drivers on $KUBELET_NODE_NAME and 2 on $node2 registered with their kubelets $((SECONDS - t))s after their start"

# Credentials for S3 and RBD: a Secret the StorageClasses name for every CSI call that takes one.
k -n "$ns" create secret generic s3-creds --from-literal=accessKeyID="$S3_ACCESS_KEY" \
  --from-literal=secretAccessKey="$S3_SECRET_KEY" >/dev/null || bail "s3 secret"
k -n "$ns" create secret generic ceph-creds --from-literal=userID="$CEPH_USER" \
  --from-literal=userKey="$CEPH_ADMIN_KEY" >/dev/null || bail "ceph secret"
secret_params() { # secret name: StorageClass parameters naming it for each kind
  local kind
  for kind in provisioner controller-publish node-stage controller-expand; do
    printf '  csi.storage.k8s.io/%s-secret-name: %s\n  csi.storage.k8s.io/%s-secret-namespace: %s\n' "$kind" "$1" "$kind" "$ns"
  done
}
storage_class() { # name driver [extra parameter lines]
  cat <<EOF | k apply -f - >/dev/null || bail "StorageClass $1 did not apply"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: $1}
provisioner: $2
reclaimPolicy: Delete
volumeBindingMode: Immediate
allowVolumeExpansion: true
parameters:
${3:-}
EOF
}
storage_class "pods-gluster-$id" glusterfs.stowage.io
storage_class "pods-s3-$id" s3.stowage.io "$(secret_params s3-creds)"
storage_class "pods-rbd-$id" rbd.stowage.io "$(secret_params ceph-creds)"
storage_class "pods-rbd-xfs-$id" rbd.stowage.io "$(secret_params ceph-creds)
  csi.storage.k8s.io/fstype: xfs"
storage_class "pods-local-$id" local.stowage.io

# --- helpers of the scenarios ---------------------------------------------------------------
pv_of() { k -n "$ns" get pvc "$1" -o 'jsonpath={.spec.volumeName}'; }
handle_of() { k get pv "$(pv_of "$1")" -o 'jsonpath={.spec.csi.volumeHandle}'; }
# roundtrip CLAIM: a pod writes 1 MiB of random bytes, is deleted; a second pod reads them back.
# Sets sum (the sha256) and first_write (pod apply to the write logged, claim bound beforehand).
roundtrip() {
  local c=$1 t0 got
  pod "$c-w" "$c" 'head -c 1048576 /dev/urandom > /data/blob && sync && echo "WROTE $(sha256sum /data/blob | cut -d" " -f1)"'
  t0=$(now)
  until_ok 120 logs_have "$c-w" WROTE || { wait_phase "$c-w" Succeeded 1; why="writer never wrote: ${why:-$(phase "$c-w")}"; return 1; }
  first_write=$(secs "$t0" "$(now)")
  sum=$(k -n "$ns" logs "$c-w" | sed -n 's/^WROTE //p')
  wait_phase "$c-w" Succeeded 30 || return 1
  delete_pod "$c-w" || return 1
  pod "$c-r" "$c" 'echo "READ $(sha256sum /data/blob | cut -d" " -f1)"'
  wait_phase "$c-r" Succeeded 90 || return 1
  got=$(k -n "$ns" logs "$c-r" | sed -n 's/^READ //p')
  [ -n "$sum" ] && [ "$sum" = "$got" ] || { why="wrote sha256 ${sum:-nothing}, a new pod read ${got:-nothing}"; return 1; }
  delete_pod "$c-r"
}
s3_get() { # bucket key: the object's bytes from the gateway (SigV4)
  curl -fsS --max-time 30 --aws-sigv4 "aws:amz:${S3_REGION:-us-east-1}:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$S3_ENDPOINT/$1/$2"
}
rbd_() { timeout 60 rbd -c "$CEPH_CONF" -k "$CEPH_KEYRING" --id "$CEPH_USER" "$@"; }
va_of() { # pv: name and attached flag of its VolumeAttachment ("" when none)
  k get volumeattachment -o "jsonpath={range .items[?(@.spec.source.persistentVolumeName==\"$1\")]}{.metadata.name} {.status.attached}{end}"
}

# --- scenarios ----------------------------------------------------------------------------
s_gluster_persist() {
  local c=gl-data handle on_brick
  sc="pods-gluster-$id"
  claim "$c" 64Mi
  until_ok 60 bound "$c" || { why="claim $c not Bound in 60 s: $(k -n "$ns" describe pvc "$c" | tail -n 3)"; return 1; }
  roundtrip "$c" || return 1
  handle=$(handle_of "$c")
  on_brick=$(sha256sum "$GLUSTER_BRICK/pods-$id/${handle#*/}/blob" 2>&1 | cut -d' ' -f1)
  [ "$on_brick" = "$sum" ] || { why="brick file $GLUSTER_BRICK/pods-$id/${handle#*/}/blob has sha256 $on_brick, the pod wrote $sum"; return 1; }
  until_ok 60 no_csi_mounts || { why="CSI mounts left 60 s after the last pod: $(csi_mounts | tr '\n' ' ')"; return 1; }
  detail="pod apply to first write ${first_write}s, 1 MiB read back by a new pod and on the brick, unmounted"
}

s_gluster_rwx() {
  local c=gl-shared a b
  sc="pods-gluster-$id"
  claim "$c" 64Mi ReadWriteMany
  until_ok 60 bound "$c" || { why="RWX claim not Bound in 60 s"; return 1; }
  # Each pod writes its own file, then waits (bounded) for the other's: both end only when
  # each saw the other's write while both were running on the one claim.
  for a in a b; do
    b=$([ "$a" = a ] && echo b || echo a)
    pod "rwx-$a" "$c" "echo from-$a-\$(hostname) > /data/$a; i=0; until [ -s /data/$b ] || [ \$i -ge 600 ]; do i=\$((i+1)); sleep 0.1; done; echo \"SAW \$(cat /data/$b)\""
  done
  wait_phase rwx-a Succeeded 120 && wait_phase rwx-b Succeeded 60 || return 1
  a=$(k -n "$ns" logs rwx-a | sed -n 's/^SAW //p'); b=$(k -n "$ns" logs rwx-b | sed -n 's/^SAW //p')
  [ "$a" = "from-b-rwx-b" ] && [ "$b" = "from-a-rwx-a" ] || { why="pod a saw '${a}', pod b saw '${b}'"; return 1; }
  delete_pod rwx-a && delete_pod rwx-b || return 1
  detail="each of two running pods read the other's write"
}

s_s3() {
  local c=s3-data handle bucket got
  sc="pods-s3-$id"
  claim "$c" 64Mi ReadWriteMany
  until_ok 60 bound "$c" || { why="claim $c not Bound in 60 s: $(k -n "$ns" describe pvc "$c" | tail -n 3)"; return 1; }
  roundtrip "$c" || return 1
  handle=$(handle_of "$c"); bucket=${handle#*/}
  got=$(s3_get "$bucket" blob | sha256sum | cut -d' ' -f1)
  [ "$got" = "$sum" ] || { why="object $bucket/blob on the gateway has sha256 $got, the pod wrote $sum"; return 1; }
  until_ok 60 no_csi_mounts || { why="CSI mounts left 60 s after the last pod: $(csi_mounts | tr '\n' ' ')"; return 1; }
  [ -z "$(helpers_of_run)" ] || { why="mounter processes left after the last pod: $(helpers_of_run | tr '\n' ' ')"; return 1; }
  detail="pod apply to first write ${first_write}s, 1 MiB read back by a new pod and by an S3 GET of $bucket/blob, s3fs gone"
}

s_rbd_attach() {
  local c=rbd-data pv va att ph t0 t_att t_run image watchers prov
  sc="pods-rbd-$id"
  claim "$c" 64Mi
  until_ok 60 bound "$c" || { why="claim $c not Bound in 60 s: $(k -n "$ns" describe pvc "$c" | tail -n 3)"; return 1; }
  pv=$(pv_of "$c")
  # The attach duty is held (the rbd provisioner SIGSTOPped) while the pod is made: KCM makes
  # the VolumeAttachment, nobody attaches it, and the pod must stay Pending. Then the duty
  # resumes, attaches, and only then the pod runs.
  prov=$(cat "$work/rbd-provisioner.pid")
  kill -STOP "$prov"
  t0=$(now)
  pod rbd-w "$c" 'head -c 1048576 /dev/urandom > /data/blob && sync && echo "WROTE $(sha256sum /data/blob | cut -d" " -f1)"; sleep 3600'
  until_ok 60 bash -c "[ -n \"\$($KUBECTL get volumeattachment -o 'jsonpath={.items[?(@.spec.source.persistentVolumeName==\"$pv\")].metadata.name}')\" ]" ||
    { kill -CONT "$prov"; why="KCM made no VolumeAttachment for $pv within 60 s of the pod"; return 1; }
  sleep 5
  read -r va att <<<"$(va_of "$pv")"
  ph=$(phase rbd-w)
  kill -CONT "$prov"
  [ "${att:-}" != true ] || { why="VolumeAttachment $va attached while the attach duty was stopped"; return 1; }
  [ "$ph" = Pending ] || { why="pod $ph while its VolumeAttachment $va was not attached (attached=${att:-unset})"; return 1; }
  t0=$(now)
  until_ok 90 bash -c "[ \"\$($KUBECTL get volumeattachment $va -o 'jsonpath={.status.attached}')\" = true ]" ||
    { why="VolumeAttachment $va not attached within 90 s of the duty resuming: $(k get volumeattachment "$va" -o 'jsonpath={.status.attachError.message}' 2>/dev/null)"; return 1; }
  t_att=$(secs "$t0" "$(now)")
  wait_phase rbd-w Running 120 || return 1
  t_run=$(secs "$t0" "$(now)")
  until_ok 120 logs_have rbd-w WROTE || { wait_phase rbd-w Running 1; why="writer never wrote: ${why:-$(phase rbd-w)}"; return 1; }
  first_write=$(secs "$t0" "$(now)")
  sum=$(k -n "$ns" logs rbd-w | sed -n 's/^WROTE //p')
  # The handle is <instance>/<pool>/<image>.
  image=$(k get pv "$pv" -o 'jsonpath={.spec.csi.volumeHandle}'); image=${image#*/}
  watchers=$(rbd_ status "$image" 2>&1 | grep -c 'watcher=')
  [ "$watchers" -ge 1 ] || { why="image $image has no watcher while the pod uses it: $(rbd_ status "$image" 2>&1 | tr '\n' ' ')"; return 1; }
  delete_pod rbd-w || return 1
  pod rbd-r "$c" 'echo "READ $(sha256sum /data/blob | cut -d" " -f1)"'
  wait_phase rbd-r Succeeded 120 || return 1
  [ "$(k -n "$ns" logs rbd-r | sed -n 's/^READ //p')" = "$sum" ] || { why="wrote sha256 $sum, a new pod read $(k -n "$ns" logs rbd-r)"; return 1; }
  delete_pod rbd-r || return 1
  t0=$(now)
  until_ok 180 bash -c "[ -z \"\$($KUBECTL get volumeattachment -o 'jsonpath={.items[?(@.spec.source.persistentVolumeName==\"$pv\")].metadata.name}')\" ]" ||
    { why="VolumeAttachment $va of $pv still there 180 s after the last pod: $(k get volumeattachment "$va" -o 'jsonpath={.status.detachError.message}' 2>/dev/null)"; return 1; }
  local t_det; t_det=$(secs "$t0" "$(now)")
  until_ok 60 bash -c "[ \$(rbd -c '$CEPH_CONF' -k '$CEPH_KEYRING' --id '$CEPH_USER' status '$image' 2>&1 | grep -c watcher=) = 0 ]" ||
    { why="image $image still watched after detach: $(rbd_ status "$image" 2>&1 | tr '\n' ' ')"; return 1; }
  until_ok 60 no_csi_mounts || { why="CSI mounts left after the last pod: $(csi_mounts | tr '\n' ' ')"; return 1; }
  detail="pod Pending 5 s with its VolumeAttachment unattached (attach duty stopped); resumed: attached ${t_att}s, pod Running ${t_run}s, first write ${first_write}s after, 1 MiB read back, VolumeAttachment gone ${t_det}s after the last pod, no watcher, unmounted"
}

# Resize while a pod writes. df_k POD: the size in KiB of /data as the pod sees it.
df_k() { k -n "$ns" exec "$1" -- df -k /data 2>/dev/null | awk 'NR == 2 {print $2}'; }
log_lines() { k -n "$ns" exec "$1" -- sh -c 'wc -l < /data/log' 2>/dev/null | tr -dc 0-9; }
pvc_cap() { k -n "$ns" get pvc "$1" -o 'jsonpath={.status.capacity.storage}'; }
pvc_conds() { k -n "$ns" get pvc "$1" -o 'jsonpath={range .status.conditions[*]}{.type} {end}'; }
writer_pod() { pod "$1" "$2" 'while :; do date >> /data/log; sleep 0.2; done'; }
# grow_while_writing CLAIM POD NEW_SIZE NEW_MIN_KIB [NODE_LOG]: the claim grows while POD appends
# to a log; sets grown_t (request to df in the pod showing >= NEW_MIN_KIB) or leaves it empty
# when the filesystem did not grow online within 60 s (or NODE_LOG says it cannot); the pod must
# keep writing either way.
grow_while_writing() {
  local c=$1 p=$2 n1 n2 t0 sz
  grown_t=""
  k -n "$ns" patch pvc "$c" --type merge -p "{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"$3\"}}}}" >/dev/null ||
    { why="PVC $c patch to $3 refused"; return 1; }
  t0=$(now)
  until_ok 60 bash -c "[ \"\$($KUBECTL get pv $(pv_of "$c") -o 'jsonpath={.spec.capacity.storage}')\" = $3 ]" ||
    { why="PV capacity did not become $3 within 60 s (PVC conditions: $(pvc_conds "$c"); provisioner: $(grep -i 'expand\|resiz' "$work"/*-provisioner.log | tail -n 1 | cut -c1-300))"; return 1; }
  pv_t=$(secs "$t0" "$(now)")
  for _ in $(seq 1 60); do
    sz=$(df_k "$p")
    [ -n "$sz" ] && [ "$sz" -ge "$4" ] && { grown_t=$(secs "$t0" "$(now)"); break; }
    # The node plugin said it cannot grow this one online: no use waiting.
    [ -n "${5:-}" ] && grep -q 'needs CAP_SYS_RESOURCE' "$5" && break
    sleep 1
  done
  n1=$(log_lines "$p"); sleep 2; n2=$(log_lines "$p")
  [ -n "$n1" ] && [ -n "$n2" ] && [ "$n2" -gt "$n1" ] || { why="pod stopped writing during the resize ($n1 -> $n2 lines)"; return 1; }
  df_now=$sz
}

s_resize_local() {
  local c=lc-grow cond
  sc="pods-local-$id"
  claim "$c" 64Mi
  until_ok 60 bound "$c" || { why="claim $c not Bound in 60 s"; return 1; }
  writer_pod grow-1 "$c"
  wait_phase grow-1 Running 90 || return 1
  local before; before=$(df_k grow-1)
  # 64Mi -> 160Mi: the filesystem must gain at least 80 MiB (ext4 keeps some for itself).
  grow_while_writing "$c" grow-1 160Mi $((before + 81920)) "$work/local-node.log" || return 1
  if [ -n "$grown_t" ]; then
    until_ok 60 bash -c "[ \"\$($KUBECTL -n $ns get pvc $c -o 'jsonpath={.status.capacity.storage}')\" = 160Mi ]" ||
      { why="df grew but PVC status capacity is $(pvc_cap "$c")"; return 1; }
    detail="df in the running pod ${before} KiB -> $df_now KiB ${grown_t}s after the request (PV ${pv_t}s), PVC capacity 160Mi, writes went on"
    delete_pod grow-1; return 0
  fi
  # ext4 grows online only with CAP_SYS_RESOURCE (the node plugin here runs without it): the
  # claim then waits in FileSystemResizePending and the filesystem grows at the next stage.
  cond=$(pvc_conds "$c")
  grep -q FileSystemResizePending <<<"$cond" || { why="df still $df_now KiB 60 s after the request and the PVC shows no FileSystemResizePending (conditions: $cond, capacity $(pvc_cap "$c"))"; return 1; }
  [ "$(pvc_cap "$c")" = 64Mi ] || { why="PVC capacity $(pvc_cap "$c") while the pod's filesystem is still $df_now KiB"; return 1; }
  grep -q 'needs CAP_SYS_RESOURCE' "$work/local-node.log" || { why="no online grow and no CAP_SYS_RESOURCE refusal in the node log"; return 1; }
  delete_pod grow-1 || return 1
  # Only a fresh stage grows it: a pod started while the old staging mount is still there
  # (kubelet unstages a moment after the pod object goes) would reuse it, ungrown.
  # NodeUnstage detaches the image's loop device last.
  local img; img="$work/local/$(handle_of "$c" | cut -d/ -f2-)/"
  until_ok 60 bash -c "! losetup -a | grep -qF '$img'" || { why="$img still on a loop device 60 s after its pod"; return 1; }
  writer_pod grow-2 "$c"
  wait_phase grow-2 Running 90 || return 1
  local after; after=$(df_k grow-2)
  [ -n "$after" ] && [ "$after" -ge $((before + 81920)) ] || { why="new pod's df shows ${after:-nothing} KiB (was $before) after the grow to 160Mi"; return 1; }
  until_ok 60 bash -c "[ \"\$($KUBECTL -n $ns get pvc $c -o 'jsonpath={.status.capacity.storage}')\" = 160Mi ]" ||
    { why="PVC status capacity $(pvc_cap "$c") after the restage (conditions $(pvc_conds "$c"))"; return 1; }
  # The old log is still there and the new pod appends to it.
  delete_pod grow-2 || return 1
  detail="PV 160Mi ${pv_t}s after the request, writes went on, online grow refused (no CAP_SYS_RESOURCE here: FileSystemResizePending, capacity stayed 64Mi); next pod df ${before} -> $after KiB, PVC capacity 160Mi"
}

s_resize_rbd() {
  local c=rbd-grow before
  sc="pods-rbd-xfs-$id"
  # XFS (grows online without CAP_SYS_RESOURCE) refuses filesystems under 300 MB; RBD images
  # are thin, so 320Mi costs nothing.
  claim "$c" 320Mi
  until_ok 60 bound "$c" || { why="claim $c not Bound in 60 s"; return 1; }
  writer_pod rgrow "$c"
  wait_phase rgrow Running 120 || return 1
  before=$(df_k rgrow)
  # 320Mi -> 512Mi: at least 128 MiB more (df shows the size less xfs's internal log, 64 MiB
  # here: 256 MiB before, 448 MiB after).
  grow_while_writing "$c" rgrow 512Mi $((before + 131072)) || return 1
  [ -n "$grown_t" ] || { why="df in the pod still $df_now KiB 60 s after the request (PVC conditions: $(pvc_conds "$c"); node: $(grep -i 'expand\|grow' "$work/rbd-node.log" | tail -n 1 | cut -c1-300))"; return 1; }
  until_ok 60 bash -c "[ \"\$($KUBECTL -n $ns get pvc $c -o 'jsonpath={.status.capacity.storage}')\" = 512Mi ]" ||
    { why="df grew but PVC status capacity is $(pvc_cap "$c") (conditions $(pvc_conds "$c"))"; return 1; }
  delete_pod rgrow || return 1
  detail="xfs: df in the running pod $before -> $df_now KiB ${grown_t}s after the request (PV ${pv_t}s), PVC capacity 512Mi, writes went on"
}

# PostgreSQL on the network backends: 80-pods' kill -9 scenario (tests/pods/lib.bash
# s_postgres), then the StatefulSet and its claim go.
s_postgres_on() { # set class
  s_postgres "$1" "$2" || return 1
  k -n "$ns" delete statefulset "$1" --wait=false >/dev/null
  until_ok 90 gone pod "$1-0" || { why="$1-0 not deleted"; return 1; }
  k -n "$ns" delete pvc "data-$1-0" --wait=false >/dev/null
}

# ReadWriteMany across the two nodes: one pod on each, each reads the other's write.
s_gluster_rwx_nodes() {
  local c=gl-shared a b n1 n2
  sc="pods-gluster-$id"
  bound "$c" || { claim "$c" 64Mi ReadWriteMany; until_ok 60 bound "$c" || { why="RWX claim not Bound in 60 s"; return 1; }; }
  for a in c d; do
    b=$([ "$a" = c ] && echo d || echo c)
    pod_node=$([ "$a" = c ] && echo "$KUBELET_NODE_NAME" || echo "$node2")
    pod "rwx-$a" "$c" "echo from-$a-\$(hostname) > /data/$a; i=0; until [ -s /data/$b ] || [ \$i -ge 600 ]; do i=\$((i+1)); sleep 0.1; done; echo \"SAW \$(cat /data/$b)\""
  done
  pod_node=$KUBELET_NODE_NAME
  wait_phase rwx-c Succeeded 120 && wait_phase rwx-d Succeeded 60 || return 1
  n1=$(k -n "$ns" get pod rwx-c -o 'jsonpath={.spec.nodeName}'); n2=$(k -n "$ns" get pod rwx-d -o 'jsonpath={.spec.nodeName}')
  [ "$n1" = "$KUBELET_NODE_NAME" ] && [ "$n2" = "$node2" ] || { why="pods ran on $n1 and $n2, not one on each node"; return 1; }
  a=$(k -n "$ns" logs rwx-c | sed -n 's/^SAW //p'); b=$(k -n "$ns" logs rwx-d | sed -n 's/^SAW //p')
  [ "$a" = "from-d-rwx-d" ] && [ "$b" = "from-c-rwx-c" ] || { why="pod on $n1 saw '${a}', pod on $n2 saw '${b}'"; return 1; }
  delete_pod rwx-c && delete_pod rwx-d || return 1
  until_ok 60 no_csi_mounts "$node2_root" || { why="CSI mounts left on $node2: $(csi_mounts "$node2_root" | tr '\n' ' ')"; return 1; }
  detail="pods on $n1 and $n2 each read the other's write, unmounted on both"
}

# An RBD ReadWriteOnce volume in use on node 1: a pod on node 2 waits (KCM refuses a second
# attachment); once the first pod is gone the volume is detached from node 1, attached to
# node 2, and the pod there reads what node 1 wrote.
s_rbd_move() {
  local c=rbd-move pv sum got t0 t_move ev nodes
  sc="pods-rbd-$id"
  claim "$c" 64Mi
  until_ok 60 bound "$c" || { why="claim $c not Bound in 60 s"; return 1; }
  pv=$(pv_of "$c")
  pod mv-1 "$c" 'head -c 1048576 /dev/urandom > /data/blob && sync && echo "WROTE $(sha256sum /data/blob | cut -d" " -f1)"; sleep 3600'
  wait_phase mv-1 Running 120 || return 1
  until_ok 60 logs_have mv-1 WROTE || { why="first pod did not write"; return 1; }
  sum=$(k -n "$ns" logs mv-1 | sed -n 's/^WROTE //p')
  pod_node=$node2
  pod mv-2 "$c" 'echo "READ $(sha256sum /data/blob | cut -d" " -f1)"'
  pod_node=$KUBELET_NODE_NAME
  sleep 6
  [ "$(phase mv-2)" = Pending ] || { why="pod on $node2 is $(phase mv-2) while the RWO volume is attached to $KUBELET_NODE_NAME"; return 1; }
  nodes=$(k get volumeattachment -o "jsonpath={range .items[?(@.spec.source.persistentVolumeName==\"$pv\")]}{.spec.nodeName} {end}")
  [ "$nodes" = "$KUBELET_NODE_NAME " ] || { why="VolumeAttachments of $pv are on '${nodes}', not on $KUBELET_NODE_NAME alone"; return 1; }
  ev=$(k -n "$ns" get events --field-selector involvedObject.name=mv-2 -o 'jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}' | grep -m1 -i 'multi-attach' | cut -c1-160)
  t0=$(now)
  delete_pod mv-1 || return 1
  wait_phase mv-2 Succeeded 240 || return 1
  t_move=$(secs "$t0" "$(now)")
  got=$(k -n "$ns" logs mv-2 | sed -n 's/^READ //p')
  [ -n "$sum" ] && [ "$got" = "$sum" ] || { why="node 1 wrote sha256 $sum, the pod on $node2 read ${got:-nothing}"; return 1; }
  delete_pod mv-2 || return 1
  until_ok 180 bash -c "[ -z \"\$($KUBECTL get volumeattachment -o 'jsonpath={.items[?(@.spec.source.persistentVolumeName==\"$pv\")].metadata.name}')\" ]" ||
    { why="VolumeAttachment of $pv still there after the last pod"; return 1; }
  until_ok 60 no_csi_mounts "$node2_root" || { why="CSI mounts left on $node2: $(csi_mounts "$node2_root" | tr '\n' ' ')"; return 1; }
  detail="pod on $node2 Pending while attached to $KUBELET_NODE_NAME (${ev:-no Multi-Attach event}); moved and read back ${t_move}s after the first pod's delete"
}

# --- the node plugin killed under a pod writing on a FUSE volume -----------------------------
# counter_pod NAME CLAIM RESTART: appends 1, 2, 3, ... to /data/log five times a second, each
# append fsynced by dd (a shell's `>>` ignores close errors, which is where FUSE mounters such
# as s3fs report a failed upload), going on after the last number there (a restarted container
# resumes); a failed append ends the container (with RESTART=Always kubelet starts it again).
# So the file must read 1..N: a gap is an acknowledged append lost.
counter_pod() {
  pod_restart=$3 pod "$1" "$2" 'i=$(tail -n 1 /data/log 2>/dev/null); i=${i:-0}; while :; do i=$((i+1)); echo $i | dd of=/data/log oflag=append conv=notrunc,fsync 2>/dev/null || exit 1; sleep 0.2; done'
}
last_n() { k -n "$ns" exec "$1" -- tail -n 1 /data/log 2>/dev/null | tr -dc 0-9; }
restarts() { k -n "$ns" get pod "$1" -o 'jsonpath={.status.containerStatuses[0].restartCount}' 2>/dev/null; }
grew_past() { local n; n=$(last_n "$1"); [ -n "$n" ] && [ "$n" -gt "$2" ]; }
# staging_of POD: the staging mount (globalmount) of the pod's one CSI volume on node 1: the
# mount with the same device as the pod's publish target.
staging_of() {
  local uid dev
  uid=$(k -n "$ns" get pod "$1" -o 'jsonpath={.metadata.uid}')
  dev=$(awk -v p="$KUBELET_ROOT/pods/$uid/volumes/kubernetes.io~csi/" 'index($5, p) == 1 {print $3; exit}' /proc/self/mountinfo)
  [ -n "$dev" ] && awk -v d="$dev" '$3 == d && $5 ~ /\/globalmount$/ {print $5; exit}' /proc/self/mountinfo
}
# helper_pids NAME PATTERN: mount helpers NAME (glusterfs, s3fs, rbd-fuse) whose command line
# has PATTERN.
helper_pids() {
  local p
  for p in $(pgrep -x "$1" 2>/dev/null); do
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$2" && echo "$p"
  done
}
# counter_start CLAIM POD RESTART: a claim of class $sc, a counter pod writing on it; sets
# staging (the volume's staging mount on node 1).
counter_start() {
  claim "$1" 64Mi
  until_ok 60 bound "$1" || { why="claim $1 not Bound in 60 s"; return 1; }
  counter_pod "$2" "$1" "$3"
  wait_phase "$2" Running 120 || return 1
  until_ok 60 grew_past "$2" 5 || { why="pod never wrote 5 lines"; return 1; }
  staging=$(staging_of "$2")
  [ -n "$staging" ] || { why="no staging mount found for $2"; return 1; }
}
# contiguous TEXT: the lines are 1, 2, ..., N (nothing lost in the middle, nothing twice).
contiguous() { awk 'BEGIN {ok = 1} $0 != NR {ok = 0; exit} END {exit !(ok && NR > 0)}' <<<"$1"; }

# stowage-node SIGKILLed (alone, as a crash of the plugin process) while a pod appends to a FUSE
# volume: the FUSE helper is not its child and lives on, so the pod's writes never stop; the
# restarted plugin registers again and, when the pod goes, unmounts what the killed one mounted
# and stops its helper.
# s_node_kill_fuse BACKEND CLASS HELPER
s_node_kill_fuse() {
  local b=$1 helper=$3 c p pid staging hpids n0 n1 n2 t0 rec before log
  sc=$2; c=nk-$b; p=nk-$b-w
  counter_start "$c" "$p" Never || return 1
  case $b in rbd) hpids=$(helper_pids rbd-fuse "$(handle_of "$c" | awk -F/ '{print $NF}')") ;; *) hpids=$(helper_pids "$helper" "$staging") ;; esac
  [ -n "$hpids" ] || { why="no $helper process found for $staging"; return 1; }
  before=$(reg_count "$b.stowage.io")
  pid=$(cat "$work/$b-node.pid")
  n0=$(last_n "$p")
  kill -KILL "$pid"; until_ok 10 bash -c "! kill -0 $pid" || { why="stowage-node $pid survived SIGKILL"; return 1; }
  sleep 3
  n1=$(last_n "$p")
  [ -n "$n1" ] && [ "$n1" -gt "$n0" ] || { why="the pod stopped writing when stowage-node died ($n0 -> ${n1:-nothing})"; return 1; }
  t0=$(now)
  start_node_plugin "$b" "$b.stowage.io" "$work/$b.yaml" "$KUBELET_ROOT" "$KUBELET_NODE_NAME"
  until_ok 60 bash -c "[ \$(grep -c 'Register new plugin with name: $b.stowage.io' '$KUBELET_STATE/logs/kubelet.log') -gt $before ]" ||
    { why="kubelet did not register $b.stowage.io again within 60 s of the restart"; return 1; }
  rec=$(secs "$t0" "$(now)")
  sleep 2
  n2=$(last_n "$p")
  [ -n "$n2" ] && [ "$n2" -gt "$n1" ] || { why="the pod stopped writing after the restart ($n1 -> ${n2:-nothing})"; return 1; }
  [ "$(restarts "$p")" = 0 ] || { why="the pod's container restarted $(restarts "$p") times: its writes failed"; return 1; }
  for pid in $hpids; do kill -0 "$pid" 2>/dev/null || { why="$helper $pid of $staging died with the plugin"; return 1; }; done
  log=$(k -n "$ns" exec "$p" -- cat /data/log)
  contiguous "$log" || { why="the log has a gap or a repeat: $(awk '$0 != NR {print "line " NR ": " $0; exit}' <<<"$log")"; return 1; }
  delete_pod "$p" || return 1
  until_ok 60 bash -c "! grep -qF ' $staging ' /proc/self/mountinfo" || { why="staging mount $staging left 60 s after the pod (the restarted plugin did not unstage it)"; return 1; }
  for pid in $hpids; do until_ok 30 bash -c "! kill -0 $pid 2>/dev/null" || { why="$helper $pid still running after the unstage"; return 1; }; done
  detail="$(wc -l <<<"$log") lines with no gap; $((n1 - n0)) written while the plugin was dead, no container restart; re-registered ${rec}s after the restart; $helper of the killed plugin stopped and unmounted by the new one"
  [ "$b" = rbd ] || return 0
  local pv; pv=$(pv_of "$c")
  until_ok 180 bash -c "[ -z \"\$($KUBECTL get volumeattachment -o 'jsonpath={.items[?(@.spec.source.persistentVolumeName==\"$pv\")].metadata.name}')\" ]" ||
    { why="VolumeAttachment of $pv still there 180 s after the pod"; return 1; }
  detail="$detail, detached"
}

# stowage-node and the volume's FUSE helper both SIGKILLed, as when the node plugin's container
# is killed (its helpers die with it): the pod's mount answers ENOTCONN. The restarted plugin
# heals: S3 at start, GlusterFS at the next call that touches the volume (kubelet's periodic
# NodeGetVolumeStats); it remounts the staging path and binds the pod's target again. A
# running container keeps its copy of the dead mount (its mount namespace is private), so its
# next write fails and kubelet restarts it; the new container gets the healed mount and goes on.
# s_helper_kill_fuse BACKEND CLASS HELPER
s_helper_kill_fuse() {
  local b=$1 helper=$3 c p pid staging hpids n0 t0 healed log handle nres
  sc=$2; c=hk-$b; p=hk-$b-w
  counter_start "$c" "$p" Always || return 1
  hpids=$(helper_pids "$helper" "$staging")
  [ -n "$hpids" ] || { why="no $helper process found for $staging"; return 1; }
  pid=$(cat "$work/$b-node.pid")
  n0=$(last_n "$p")
  kill -KILL "$pid" $hpids
  until_ok 10 bash -c "! kill -0 $pid 2>/dev/null" || { why="stowage-node $pid survived SIGKILL"; return 1; }
  until_ok 10 bash -c "! stat '$staging' >/dev/null 2>&1" || { why="$staging still answers after its $helper was killed"; return 1; }
  t0=$(now)
  start_node_plugin "$b" "$b.stowage.io" "$work/$b.yaml" "$KUBELET_ROOT" "$KUBELET_NODE_NAME"
  until_ok 150 stat "$staging" >/dev/null 2>&1 || { why="$staging not healed within 150 s of the restart; the plugin's log: $(tail -n 6 "$work/$b-node.log" | cut -c1-400)"; return 1; }
  healed=$(secs "$t0" "$(now)")
  until_ok 180 grew_past "$p" "$n0" || { why="the pod did not write again within 180 s of the heal ($(pod_story "$p" 2>/dev/null | head -c 400))"; return 1; }
  log=$(k -n "$ns" exec "$p" -- cat /data/log)
  contiguous "$log" || { why="the log has a gap or a repeat: $(awk '$0 != NR {print "line " NR ": " $0; exit}' <<<"$log")"; return 1; }
  handle=$(handle_of "$c")
  # kubelet reports a restart a moment after the new container runs.
  sleep 3; nres=$(restarts "$p")
  delete_pod "$p" || return 1
  until_ok 60 bash -c "! grep -qF ' $staging ' /proc/self/mountinfo" || { why="staging mount $staging left 60 s after the pod"; return 1; }
  [ -z "$(helper_pids "$helper" "$staging")" ] || { why="$helper still running for $staging after the unstage"; return 1; }
  # The backend has what the pod wrote (S3: the object; GlusterFS: the brick file).
  local back
  case $b in
    s3) back=$(s3_get "${handle#*/}" log) ;;
    glusterfs) back=$(cat "$GLUSTER_BRICK/pods-$id/${handle#*/}/log" 2>&1) ;;
  esac
  # The pod went on writing after it was read: the backend has at least that, with no gap.
  contiguous "$back" && [ "$(wc -l <<<"$back")" -ge "$(wc -l <<<"$log")" ] ||
    { why="the backend's log ($(wc -l <<<"$back") lines, first wrong: $(awk '$0 != NR {print "line " NR ": " $0; exit}' <<<"$back")) is not 1..N past the pod's $(wc -l <<<"$log") lines"; return 1; }
  detail="mount dead, healed ${healed}s after the plugin's restart, the pod wrote again (container restarts: ${nres}): $(wc -l <<<"$back") lines 1..N on the backend, unmounted after"
}

run "GlusterFS: write, delete pod, new pod reads the bytes (and the brick has them)" s_gluster_persist
run "GlusterFS ReadWriteMany: two running pods see each other's writes" s_gluster_rwx
run "GlusterFS ReadWriteMany across two nodes" s_gluster_rwx_nodes
run "S3 (RGW, s3fs): write, second pod reads back, object bytes on the gateway" s_s3
run "RBD (rbd-fuse): pod starts only after attach, write/read, detached after the last pod" s_rbd_attach
run "RBD ReadWriteOnce moves from node 1 to node 2 once the first pod is gone" s_rbd_move
run "GlusterFS: stowage-node SIGKILLed while a pod writes: writes go on, the new plugin unmounts" s_node_kill_fuse glusterfs "pods-gluster-$id" glusterfs
run "S3 (s3fs): stowage-node SIGKILLed while a pod writes: writes go on, the new plugin unmounts" s_node_kill_fuse s3 "pods-s3-$id" s3fs
run "RBD (rbd-fuse): stowage-node SIGKILLed while a pod writes: writes go on, the new plugin detaches" s_node_kill_fuse rbd "pods-rbd-$id" rbd-fuse
run "GlusterFS: plugin and FUSE client SIGKILLed: mount healed, the pod's container restarts and goes on" s_helper_kill_fuse glusterfs "pods-gluster-$id" glusterfs
run "S3 (s3fs): plugin and s3fs SIGKILLed: mount healed at start, the pod's container restarts and goes on" s_helper_kill_fuse s3 "pods-s3-$id" s3fs
run "resize local (capacity: image) while a pod writes" s_resize_local
run "resize RBD (xfs) while a pod writes: df in the pod shows the new size" s_resize_rbd
run "MariaDB StatefulSet on RBD: kill -9 mid-insert, every acknowledged row present" s_mariadb my-rbd "pods-rbd-$id"
run "MariaDB StatefulSet on GlusterFS: kill -9 mid-insert, every acknowledged row present" s_mariadb my-gluster "pods-gluster-$id"
run "PostgreSQL StatefulSet on RBD: kill -9 mid-insert, every acknowledged row present" s_postgres_on pg-rbd "pods-rbd-$id"
run "PostgreSQL StatefulSet on GlusterFS: kill -9 mid-insert, every acknowledged row present" s_postgres_on pg-gluster "pods-gluster-$id"

until_ok 60 no_csi_mounts || fail "no CSI mounts left at the end" "$(csi_mounts | tr '\n' ' ')"
until_ok 60 no_csi_mounts "$node2_root" || fail "no CSI mounts left on $node2 at the end" "$(csi_mounts "$node2_root" | tr '\n' ' ')"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
