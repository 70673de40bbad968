# Shared by the pod suites (tests/suites/80-pods.sh, 81-pods-backends.sh): a control plane
# (tests/infra/kube.sh) and one kubelet node with its own containerd (tests/infra/kubelet.sh),
# a test namespace, stowage processes on the host, kubectl helpers, and the scenario runner that
# prints PASS/FAIL per scenario and `N passed, N failed` at the end.
#
# The suite sets before sourcing: suite (name in log lines). Then it calls pods_setup; it may
# define pods_cleanup_hook (run after the namespace and our processes are gone, before the node
# and control plane stop) to stop servers of its own.
# shellcheck shell=bash disable=SC2154
root=${STOWAGE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
kube="$root/tests/infra/kube.sh"
kubelet="$root/tests/infra/kubelet.sh"
images="$root/tests/infra/images.sh"
export STOWAGE_CACHE=${STOWAGE_CACHE:-$HOME/.cache/stowage}
work=$(mktemp -d "/tmp/stowage-${suite:?}.XXXXXX")
passed=0; failed=0
pids=()

say() { printf '[%s %s] %s\n' "$suite" "$(date +%H:%M:%S)" "$*"; }
pass() { passed=$((passed + 1)); echo "PASS: $1${2:+ ($2)}"; }
fail() { failed=$((failed + 1)); echo "FAIL: $1: $2"; }

# Mount helpers (s3fs, rclone, rbd-fuse) are not children of stowage-node (by design): the ones
# of this run are those whose command line names a path below this run's work dir.
helpers_of_run() {
  local p
  for p in $(pgrep -x 's3fs|rclone|rbd-fuse' 2>/dev/null); do
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF "$work/" && echo "$p"
  done
}

cleanup() {
  set +e
  [ -n "${ns:-}" ] && k delete namespace "$ns" --wait=true --timeout=60s >/dev/null 2>&1
  local p
  for p in "${pids[@]}" $(cat "$work"/*.pid 2>/dev/null); do kill -TERM "$p" 2>/dev/null; done
  sleep 1
  for p in "${pids[@]}" $(cat "$work"/*.pid 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  "$kubelet" stop --state "$work/node" >/dev/null 2>&1
  # Filesystems on loop devices first, then the loop devices, then FUSE mounts and their
  # helpers (an rbd-fuse killed under a mounted loop device hangs I/O).
  awk -v p="$work/" 'index($5, p) == 1 && $9 !~ /^fuse/ {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  losetup -a 2>/dev/null | grep -F "$work/" | cut -d: -f1 | xargs -r -n1 losetup -d 2>/dev/null
  awk -v p="$work/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  for p in $(helpers_of_run); do kill -TERM "$p" 2>/dev/null; done
  declare -F pods_cleanup_hook >/dev/null && pods_cleanup_hook
  "$kube" stop --state "$work/kube" >/dev/null 2>&1
  if [ -n "$(awk -v p="$work/" 'index($5, p) == 1' /proc/self/mountinfo)" ]; then
    echo "mounts left under $work; not removing it"
  else
    rm -rf "$work"
  fi
}

bail() { echo "$1"; echo "$passed passed, $((failed + 1)) failed"; exit 1; }

k() { timeout 60 "$KUBECTL" --request-timeout=20s "$@"; }

# Control plane, one kubelet node (its number chosen free), the namespace $ns.
pods_setup() {
  local t=$SECONDS n node_n=""
  "$kube" build >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log"; bail "kube.sh build failed"; }
  say "kube binaries ready in $((SECONDS - t))s"
  "$kube" start --state "$work/kube" >"$work/kube-start.log" 2>&1 ||
    { tail -n 20 "$work/kube-start.log"; bail "control plane did not start"; }
  # shellcheck disable=SC1091
  . "$work/kube/env"
  # A node number whose network nobody else on this machine uses right now.
  for n in 1 2 3 4 5 6 7 8 9; do
    ip link show "stowk${n}a" >/dev/null 2>&1 || { node_n=$n; break; }
  done
  [ -n "$node_n" ] || bail "no free kubelet node number (stowk1a..stowk9a all exist)"
  t=$SECONDS
  "$kubelet" start --state "$work/node" --kube-state "$work/kube" --node "$node_n" >"$work/kubelet-start.log" 2>&1 ||
    { tail -n 30 "$work/kubelet-start.log"; tail -n 30 "$work/node/logs/kubelet.log" 2>/dev/null; bail "kubelet node did not become Ready"; }
  # shellcheck disable=SC1091
  . "$work/node/env"
  say "node $KUBELET_NODE_NAME Ready in $((SECONDS - t))s"
  busybox=$("$images" ref busybox)
  ns="stowage-pods-$(tr -dc a-z0-9 </dev/urandom | head -c 6)"
  k create namespace "$ns" >/dev/null || bail "cannot create namespace $ns"
  # The ServiceAccount admission needs default/default in the namespace before pods are created.
  for _ in $(seq 1 40); do k -n "$ns" get serviceaccount default >/dev/null 2>&1 && break; sleep 0.5; done
}

# --- kubectl helpers ----------------------------------------------------------------------
# until_ok SECONDS command...: retry every 0.5 s until it succeeds or time runs out.
until_ok() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS >= end)) && return 1; sleep 0.5; done
}
phase() { k -n "$ns" get pod "$1" -o 'jsonpath={.status.phase}' 2>/dev/null; }
# wait_phase POD PHASE SECONDS: fails early when the pod reached Failed (or Succeeded, if that
# is not what we wait for).
wait_phase() {
  local end=$((SECONDS + $3)) p
  while :; do
    p=$(phase "$1")
    [ "$p" = "$2" ] && return 0
    case "$p" in Failed|Succeeded) [ "$p" != "$2" ] && { why="pod $1 is $p: $(k -n "$ns" logs "$1" 2>&1 | tail -n 3)"; return 1; } ;; esac
    if ((SECONDS >= end)); then
      why="pod $1 not $2 after $3 s (phase ${p:-none}); $(k -n "$ns" get events --field-selector "involvedObject.name=$1" -o 'jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}' 2>/dev/null | tail -n 3)"
      return 1
    fi
    sleep 0.5
  done
}
gone() { ! k -n "$ns" get "$1" "$2" >/dev/null 2>&1; }
delete_pod() { # name: graceful delete, bounded wait for the object to go (volumes unmounted)
  k -n "$ns" delete pod "$1" --wait=false >/dev/null 2>&1
  until_ok 90 gone pod "$1" || { why="pod $1 still there 90 s after delete"; return 1; }
}
# (Never `cmd | grep -q` here: with pipefail, grep's early exit turns cmd's SIGPIPE into a failure.)
logs_have() { local l; l=$(k -n "$ns" logs "$1" 2>/dev/null); grep -q -- "$2" <<<"$l"; }
# CSI mounts (publish targets, staging globalmounts, block device maps) under kubelet's root
# (or the root given).
csi_mounts() { awk -v p="${1:-$KUBELET_ROOT}/" 'index($5, p) == 1 && $5 ~ /kubernetes.io[~\/]csi/ {print $5}' /proc/self/mountinfo; }
no_csi_mounts() { [ -z "$(csi_mounts "$@")" ]; }
# How often kubelet registered a driver (its csi plugin logs each registration).
reg_count() { local n; n=$(grep -c "Register new plugin with name: ${1:-$drv}" "$KUBELET_STATE/logs/kubelet.log" 2>/dev/null); echo "${n:-0}"; }
claim() { # name size [accessMode] [volumeMode]  (StorageClass $sc)
  cat <<EOF | k -n "$ns" apply -f - >/dev/null
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: $sc
  accessModes: [${3:-ReadWriteOnce}]
  volumeMode: ${4:-Filesystem}
  resources: {requests: {storage: $2}}
EOF
}
node_selector() { [ -z "${pod_node:-}" ] || printf '%snodeSelector: {kubernetes.io/hostname: "%s"}\n' "$1" "$pod_node"; }
bound() { [ "$(k -n "$ns" get pvc "$1" -o 'jsonpath={.status.phase}')" = Bound ]; }
json_str() { printf '%s' "$1" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'; }
# pod NAME CLAIM SCRIPT [readOnly] : a busybox pod with the claim at /data (on node $pod_node
# when that is set: the scheduler still checks the pod's volumes); restartPolicy Never, or
# $pod_restart when set.
pod() {
  cat <<EOF | k -n "$ns" apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  restartPolicy: ${pod_restart:-Never}
  terminationGracePeriodSeconds: 0
$(node_selector "  ")
  containers:
  - name: c
    image: $busybox
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", $(json_str "$3")]
    volumeMounts: [{name: d, mountPath: /data}]
  volumes:
  - name: d
    persistentVolumeClaim: {claimName: $2, readOnly: ${4:-false}}
EOF
}
# db_statefulset NAME IMAGE CONFIGMAP ENV_NAME=VALUE PROBE STORAGECLASS: a one-replica
# StatefulSet of a database whose container runs /entry/entrypoint.sh from CONFIGMAP with its
# data on a 512Mi claim at /data; PROBE is the readiness command as a JSON array.
db_statefulset() {
  cat <<EOF | k -n "$ns" apply -f - >/dev/null
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: $1}
spec:
  serviceName: $1
  replicas: 1
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1}}
    spec:
      terminationGracePeriodSeconds: 1
$(node_selector "      ")
      containers:
      - name: db
        image: $2
        imagePullPolicy: Never
        command: ["/bin/sh", "/entry/entrypoint.sh"]
        env: [{name: ${4%%=*}, value: ${4#*=}}]
        readinessProbe:
          exec: {command: $5}
          periodSeconds: 1
          failureThreshold: 2
        volumeMounts: [{name: data, mountPath: /data}, {name: entry, mountPath: /entry}]
      volumes: [{name: entry, configMap: {name: $3}}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      storageClassName: $6
      # ReadWriteOncePod: with ReadWriteOnce a force-deleted pg-0 and its replacement ran two
      # postmasters on one data directory for a few seconds (same node; postmaster.pid cannot
      # see across PID namespaces) and 298 of 3044 acknowledged commits were lost (one run).
      # With RWOP no run lost a row; stowage-node logged no RWOP NodePublish refusal, so the
      # replacement was only published after the old pod's unpublish (80-pods' detail line
      # counts refusals). Two mysqld on one data directory would corrupt it the same way.
      accessModes: [ReadWriteOncePod]
      resources: {requests: {storage: 512Mi}}
EOF
}
# PostgreSQL StatefulSet $1 (default pg; image localhost/stowage/postgres, entrypoint
# tests/pods/postgres-entrypoint.sh) on class $2 (default $sc): a load generator on the host
# (tests/pods/pg-load.py) records each row once its commit was acknowledged; the container is
# SIGKILLed mid-insert; after the restart every acknowledged row must be there and pg_amcheck
# clean. Leaves the StatefulSet running (80-pods force-deletes its pod next); sets pg_ip,
# pg_next (the next row ID) and detail.
psql_() { timeout 20 psql -X -q -At -h "$pg_ip" -U postgres -d postgres "$@"; }
pg_ready() { [ "$(k -n "$ns" get pod "${pg_set:-pg}-0" -o 'jsonpath={.status.containerStatuses[0].ready}' 2>/dev/null)" = true ]; }
s_postgres() {
  local set=${1:-pg} class=${2:-$sc} t0 cid out acked found missing lpid kill_t rec
  pg_set=$set
  t0=$SECONDS
  "$images" import "$CONTAINERD_SOCK" postgres >"$work/pg-image.log" 2>&1 ||
    { why="postgres image: $(tail -n 3 "$work/pg-image.log")"; return 1; }
  say "postgres image ready in containerd in $((SECONDS - t0))s"
  k -n "$ns" get configmap pg-entry >/dev/null 2>&1 ||
    k -n "$ns" create configmap pg-entry --from-file=entrypoint.sh="$root/tests/pods/postgres-entrypoint.sh" >/dev/null ||
    { why="configmap"; return 1; }
  db_statefulset "$set" "$("$images" ref postgres)" pg-entry PGDATA=/data/pg '["pg_isready", "-h", "/tmp", "-U", "postgres"]' "$class" ||
    { why="StatefulSet $set did not apply"; return 1; }
  t0=$(now)
  until_ok 180 pg_ready || { why="$set-0 not ready in 180 s: $(pod_story "$set-0")"; return 1; }
  pg_ip=$(k -n "$ns" get pod "$set-0" -o 'jsonpath={.status.podIP}')
  say "postgres $set ready at $pg_ip $(secs "$t0" "$(now)")s after apply on $class (initdb included)"
  psql_ -c 'CREATE TABLE t (id bigint PRIMARY KEY, pad text)' || { why="CREATE TABLE failed on $pg_ip"; return 1; }
  : > "$work/$set-acked"
  python3 "$root/tests/pods/pg-load.py" "$pg_ip" "$work/$set-acked" >"$work/$set-load.out" 2>&1 &
  lpid=$!
  sleep 4
  cid=$(k -n "$ns" get pod "$set-0" -o 'jsonpath={.status.containerStatuses[0].containerID}'); cid=${cid#containerd://}
  [ -n "$cid" ] || { kill "$lpid"; why="no container ID for $set-0"; return 1; }
  kill_t=$(now)
  timeout 20 ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks kill -s SIGKILL "$cid" || { kill "$lpid"; why="ctr tasks kill failed"; return 1; }
  until_ok 30 bash -c "! kill -0 $lpid" || kill "$lpid"
  wait "$lpid"
  until_ok 120 psql_ -c 'SELECT 1' || { why="postgres not back within 120 s of kill -9: $(k -n "$ns" logs "$set-0" 2>&1 | tail -n 3)"; return 1; }
  rec=$(secs "$kill_t" "$(now)")
  until_ok 30 pg_ready
  psql_ -c 'SELECT id FROM t ORDER BY id' > "$work/$set-found" || { why="SELECT after restart failed"; return 1; }
  acked=$(wc -l < "$work/$set-acked"); found=$(wc -l < "$work/$set-found")
  missing=$(comm -23 <(sort "$work/$set-acked") <(sort "$work/$set-found") | wc -l)
  say "postgres $set kill -9 on $class: $(cat "$work/$set-load.out"); rows acked $acked, found $found, missing $missing; recovery ${rec}s; restarts $(k -n "$ns" get pod "$set-0" -o 'jsonpath={.status.containerStatuses[0].restartCount}')"
  [ "$acked" -gt 0 ] || { why="no row was acknowledged before the kill"; return 1; }
  [ "$missing" = 0 ] || { why="$missing of $acked acknowledged rows missing after kill -9"; return 1; }
  out=$(timeout 120 /usr/lib/postgresql/15/bin/pg_amcheck --install-missing -h "$pg_ip" -U postgres -d postgres 2>&1) ||
    { why="pg_amcheck: $(echo "$out" | tail -n 3)"; return 1; }
  detail="rows acked $acked, found $found, missing 0, recovery ${rec}s, pg_amcheck clean"
  pg_next=$(( $(sort -n "$work/$set-found" | tail -n 1) + 1 ))
}
# MariaDB StatefulSet $1 (image localhost/stowage/mariadb:10.11, tests/pods/mariadb-entrypoint.sh)
# on the StorageClass $2: mysqld
# killed with SIGKILL mid-insert; after kubelet restarts it, every row the load generator
# (tests/pods/mariadb-load.sh, in a pod) saw acknowledged is there and CHECK TABLE passes.
my_() { k -n "$ns" exec "$1" -- mariadb -N -B --socket=/run/mysqld/mysqld.sock -u root "${@:2}"; }
my_ready() { [ "$(k -n "$ns" get pod "$1" -o 'jsonpath={.status.containerStatuses[0].ready}' 2>/dev/null)" = true ]; }
s_mariadb() {
  local set=$1 t0 ip cid kill_t rec acked found missing chk restarts p=$1-0
  local sc=$2
  t0=$SECONDS
  { [ -z "${mariadb_import:-}" ] || wait "$mariadb_import"; } && mariadb_import="" &&
    "$images" import "$CONTAINERD_SOCK" mariadb >>"$work/mariadb-image.log" 2>&1 ||
    { why="mariadb image: $(tail -n 3 "$work/mariadb-image.log")"; return 1; }
  say "mariadb image in containerd ($((SECONDS - t0))s waited; imported during the earlier scenarios)"
  k -n "$ns" get configmap my-entry >/dev/null 2>&1 ||
    k -n "$ns" create configmap my-entry --from-file=entrypoint.sh="$root/tests/pods/mariadb-entrypoint.sh" \
      --from-file=load.sh="$root/tests/pods/mariadb-load.sh" >/dev/null || { why="configmap"; return 1; }
  db_statefulset "$set" "$("$images" ref mariadb)" my-entry DATADIR=/data/mysql \
    '["mariadb-admin", "--socket=/run/mysqld/mysqld.sock", "-u", "root", "ping"]' "$sc" ||
    { why="StatefulSet $set did not apply"; return 1; }
  t0=$(now)
  until_ok 240 my_ready "$p" || { why="$p not ready in 240 s: $(pod_story "$p")"; return 1; }
  ip=$(k -n "$ns" get pod "$p" -o 'jsonpath={.status.podIP}')
  local ready_t; ready_t=$(secs "$t0" "$(now)")
  say "mariadb $p ready at $ip ${ready_t}s after apply (install-db included)"
  my_ "$p" stowage -e 'CREATE TABLE t (id BIGINT PRIMARY KEY, pad TEXT) ENGINE=InnoDB' || { why="CREATE TABLE failed"; return 1; }
  cat <<EOF | k -n "$ns" apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: $set-load}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 0
$(node_selector "  ")
  containers:
  - name: c
    image: $("$images" ref mariadb)
    imagePullPolicy: Never
    command: ["/bin/sh", "/entry/load.sh", "$ip", "1"]
    volumeMounts: [{name: entry, mountPath: /entry}]
  volumes: [{name: entry, configMap: {name: my-entry}}]
EOF
  until_ok 60 logs_have "$set-load" 'ack 200$' || { why="load generator did not get 200 rows acknowledged in 60 s: $(k -n "$ns" logs "$set-load" 2>&1 | tail -n 2)"; return 1; }
  sleep 3
  cid=$(k -n "$ns" get pod "$p" -o 'jsonpath={.status.containerStatuses[0].containerID}'); cid=${cid#containerd://}
  [ -n "$cid" ] || { why="no container ID for $p"; return 1; }
  kill_t=$(now)
  timeout 20 ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks kill -s SIGKILL "$cid" || { why="ctr tasks kill failed"; return 1; }
  wait_phase "$set-load" Failed 60 || { why="load generator did not stop after the kill: $why"; return 1; }
  until_ok 180 my_ "$p" -e 'SELECT 1' || { why="mariadb not back within 180 s of kill -9: $(k -n "$ns" logs "$p" 2>&1 | tail -n 3 | tr '\n' ' ')"; return 1; }
  rec=$(secs "$kill_t" "$(now)")
  k -n "$ns" logs "$set-load" 2>/dev/null | sed -n 's/^ack //p' > "$work/$set-acked"
  my_ "$p" stowage -e 'SELECT id FROM t ORDER BY id' > "$work/$set-found" || { why="SELECT after restart failed"; return 1; }
  acked=$(wc -l < "$work/$set-acked"); found=$(wc -l < "$work/$set-found")
  missing=$(comm -23 <(sort "$work/$set-acked") <(sort "$work/$set-found") | wc -l)
  chk=$(my_ "$p" stowage -e 'CHECK TABLE t EXTENDED' 2>&1 | awk '{print $3, $4}' | tr '\n' ' ')
  restarts=$(k -n "$ns" get pod "$p" -o 'jsonpath={.status.containerStatuses[0].restartCount}')
  say "mariadb kill -9 on $sc: rows acked $acked, found $found, missing $missing; recovery ${rec}s; restarts $restarts; CHECK TABLE: $chk; load: $(k -n "$ns" logs "$set-load" 2>&1 | grep -v '^ack' | tail -n 1)"
  [ "$acked" -gt 0 ] || { why="no row was acknowledged before the kill"; return 1; }
  [ "$missing" = 0 ] || { why="$missing of $acked acknowledged rows missing after kill -9"; return 1; }
  [ "$restarts" -ge 1 ] || { why="container restart count $restarts: the kill did not happen"; return 1; }
  grep -q 'status OK' <<<"$chk" || { why="CHECK TABLE: $chk"; return 1; }
  detail="ready ${ready_t}s after apply, rows acked $acked, found $found, missing 0, back ${rec}s after kill -9, CHECK TABLE OK"
  delete_pod "$set-load"
  k -n "$ns" delete statefulset "$set" --wait=false >/dev/null
  until_ok 90 gone pod "$p" || { why="$p not deleted"; return 1; }
  k -n "$ns" delete pvc "data-$p" --wait=false >/dev/null
}

# What a pod that did not get ready went through: its phase and node, its last log lines and
# its last events (a volume that never mounted shows only there).
pod_story() {
  printf 'pod: %s; log: %s; events: %s' \
    "$(k -n "$ns" get pod "$1" -o wide --no-headers 2>&1 | tr -s ' ')" \
    "$(k -n "$ns" logs "$1" 2>&1 | tail -n 3 | tr '\n' ' ')" \
    "$(k -n "$ns" get events --field-selector "involvedObject.name=$1" --sort-by=.lastTimestamp -o 'custom-columns=R:.reason,M:.message' --no-headers 2>&1 | tail -n 4 | tr '\n' ' ')"
}
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
sock_up() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])' "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- Stowage processes --------------------------------------------------------------------
# Links to the built binaries in $work/bin (a rebuild during the run does not change them).
pods_bins() {
  local bin=${STOWAGE_BIN_DIR:-${CARGO_TARGET_DIR:-$STOWAGE_CACHE/target}/debug} b
  mkdir -p "$work/bin"
  for b in stowage-controller stowage-node stowage-provisioner stowage; do
    ln "$bin/$b" "$work/bin/$b" 2>/dev/null || cp "$bin/$b" "$work/bin/$b" || bail "$bin/$b missing: build the workspace first"
  done
}

# start_controller NAME CONFIG: stowage-controller on $work/NAME-controller.sock.
start_controller() {
  setsid "$work/bin/stowage-controller" --endpoint "unix://$work/$1-controller.sock" --config "$2" \
    </dev/null >"$work/$1-controller.log" 2>&1 &
  echo $! > "$work/$1-controller.pid"
  until_ok 30 sock_up "$work/$1-controller.sock" || { tail -n 20 "$work/$1-controller.log"; bail "stowage-controller ($1) socket did not come up"; }
}

# The provisioner's ServiceAccount (provisioner/deploy/rbac.yaml, as in 35-provisioner) and a
# kubeconfig with its token, made once.
provisioner_kubeconfig() {
  [ -s "$work/provisioner.kubeconfig" ] && return 0
  local token
  k apply -f "$root/provisioner/deploy/rbac.yaml" >/dev/null || bail "rbac.yaml did not apply"
  token=$(k -n stowage-system create token stowage-provisioner --duration 2h) || bail "no provisioner token"
  cat > "$work/provisioner.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "$STOWAGE_KUBE_SERVER", certificate-authority: "$STOWAGE_KUBE_CA"}
users:
- name: u
  user: {token: "$token"}
contexts:
- name: c
  context: {cluster: c, user: u}
current-context: c
EOF
}

# start_provisioner NAME: stowage-provisioner (all duties) for the controller NAME.
start_provisioner() {
  provisioner_kubeconfig
  KUBECONFIG="$work/provisioner.kubeconfig" setsid "$work/bin/stowage-provisioner" \
    --csi-endpoint "unix://$work/$1-controller.sock" --metrics-address 127.0.0.1:0 --leader-elect=false \
    --pending-resync 2s --retry-max-delay 4s </dev/null >"$work/$1-provisioner.log" 2>&1 &
  echo $! > "$work/$1-provisioner.pid"
}

# --- scenarios ----------------------------------------------------------------------------
# Each returns non-zero with $why set; run() prints PASS/FAIL with the detail in $detail.
run() {
  local name="$1" t0=$SECONDS; shift
  # Development aid: PODS_ONLY="s_block s_rwop" runs only those (the others print SKIP).
  if [ -n "${PODS_ONLY:-}" ] && [[ " $PODS_ONLY " != *" $1 "* ]]; then echo "SKIP: $name (PODS_ONLY)"; return 0; fi
  why="" detail=""
  say "scenario $name"
  if "$@"; then pass "$name" "${detail:+$detail, }$((SECONDS - t0))s"; return 0; fi
  fail "$name" "${why:-failed}"
  # Whatever a failed scenario left running must not hold volumes for the next one.
  k -n "$ns" delete statefulsets --all --wait=false >/dev/null 2>&1
  if [ -n "$(k -n "$ns" get pods -o name 2>/dev/null)" ]; then
    k -n "$ns" delete pods --all --wait=false >/dev/null 2>&1
    until_ok 90 bash -c "[ -z \"\$($KUBECTL -n $ns get pods -o name 2>/dev/null)\" ]" || say "pods still left after $name"
  fi
}
