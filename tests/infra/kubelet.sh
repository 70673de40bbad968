#!/usr/bin/env bash
# Stowage test infrastructure: a REAL kubelet node joined to the control plane of
# tests/infra/kube.sh: its own containerd instance (own root, state, socket, config; never the
# Docker daemon's), runc, CNI (bridge + host-local + loopback from Debian's
# containernetworking-plugins), offline images (tests/infra/images.sh), and kubelet v1.34.4 built
# by `kube.sh build`. No kube-proxy, no DNS: tests reach pods by pod IP.
#
# Usage: tests/infra/kubelet.sh start  [--state DIR] [--kube-state DIR] [--node N]
#        tests/infra/kubelet.sh stop   [--state DIR] [--kube-state DIR]
#        tests/infra/kubelet.sh restart-kubelet [--state DIR]  # kubelet only; pods keep running
#        tests/infra/kubelet.sh status [--state DIR]   # exit 0 ready, 1 degraded, 3 stopped
#        tests/infra/kubelet.sh env    [--state DIR]   # eval "$(kubelet.sh env)"
#
#   --kube-state: the state dir of a running `kube.sh start` (default $KUBE_STATE or
#     /tmp/stowage-kube). --node N (1-9, default 1) picks the node's network, so two nodes can
#     run side by side: node IP 10.123.N.1 on veth stowk<N>a (peer stowk<N>b; this kernel has
#     no dummy links), named by that IP (kubectl logs/exec then need no DNS); pod subnet
#     10.124.N.0/24 on bridge stowk<N>br; pod cgroups under /stowage-k<N> (cgroup v1).
#   start: idempotent (a no-op when this node already runs and is Ready); waits, bounded by
#     KUBELET_READY_TIMEOUT (default 120 s), for containerd, the image imports, kubelet /healthz
#     and the Node Ready condition; on failure it stops what it started.
#   stop: idempotent. Deletes the pods bound to the node (grace 0, bounded wait) so kubelet
#     unmounts their volumes and tears their sandboxes down, stops kubelet, kills what is left
#     in our containerd (tasks, containers, shims of our socket only), stops containerd,
#     unmounts everything under the state dir, removes our network namespaces, veth, bridge and
#     cgroups, and deletes the Node object.
#   DIR (default /tmp/stowage-kubelet-<N>) afterwards: env (KUBELET_STATE, KUBELET_ROOT,
#     KUBELET_NODE_NAME, KUBELET_NODE_IP, KUBELET_PORT, KUBELET_HEALTHZ, CONTAINERD_SOCK,
#     POD_SUBNET), root/ (kubelet --root-dir: pods/, plugins/, plugins_registry/), containerd/,
#     pki/ (node client cert CN=system:node:<ip>, O=system:nodes), logs/, pids/.
#   kubelet serves :10250 on the node IP with anonymous auth + AlwaysAllow (test only): logs,
#     exec and /metrics need no credentials.
#
# Tried: node Ready 2-6 s after start; busybox emptyDir pod Succeeded ~3.5 s after apply; logs,
# exec; two nodes side by side (--node 5 and 6, one control plane): both Ready, a pod on each,
# pod-to-pod ping across them, stop leaves no mounts, netns, links, cgroups or shims.
# Facts (Debian 12, cgroup v1, 2 cores): containerd needs `restrict_oom_score_adj = true` (root
# here lacks CAP_SYS_RESOURCE; without it the pause container dies with "can't get final
# child's PID from pipe: EOF"); image GC and eviction thresholds are set so our imported,
# unpullable images are never collected.
set -euo pipefail

CACHE_ROOT="${STOWAGE_CACHE:-$HOME/.cache/stowage}"
KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
BIN_DIR="$CACHE_ROOT/kube/$KUBE_VERSION/bin"
READY_TIMEOUT="${KUBELET_READY_TIMEOUT:-120}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
CNI_BIN=/usr/lib/cni

log() { printf '[kubelet.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[kubelet.sh] ERROR: %s\n' "$*" >&2; exit 1; }

STATE="" KSTATE="" NODE=""
parse_args() {
  NODE=1 STATE="" KSTATE=""
  while (($#)); do
    case "$1" in
      --state) STATE="${2:?--state needs a directory}"; shift 2 ;;
      --kube-state) KSTATE="$(cd "${2:?--kube-state needs a directory}" && pwd -P)" || die "no directory $2"; shift 2 ;;
      --node) NODE="${2:?--node needs 1-9}"; shift 2 ;;
      *) die "unknown argument: $1" ;;
    esac
  done
  [[ "$NODE" =~ ^[1-9]$ ]] || die "--node must be 1-9"
  STATE="${STATE:-/tmp/stowage-kubelet-$NODE}"
  if [[ -d "$STATE" ]]; then STATE="$(cd "$STATE" && pwd -P)"; fi
  # A state dir remembers its node number (stop/status/env without --node).
  if [[ -f "$STATE/node" ]]; then NODE="$(cat "$STATE/node")"; fi
  # ... and its control plane (stop must reach the same apiserver start joined).
  if [[ -z "$KSTATE" && -f "$STATE/kube-state" ]]; then KSTATE="$(cat "$STATE/kube-state")"; fi
  KSTATE="${KSTATE:-${KUBE_STATE:-/tmp/stowage-kube}}"
  NODE_IP="10.123.$NODE.1"
  NODE_NAME="$NODE_IP"
  VETH="stowk${NODE}a" VETH_PEER="stowk${NODE}b" BRIDGE="stowk${NODE}br"
  POD_SUBNET="10.124.$NODE.0/24"
  CGROUP="stowage-k$NODE"
  SOCK="$STATE/containerd/containerd.sock"
  ROOT="$STATE/root"
}

ctr_() { timeout 30 ctr -a "$SOCK" -n k8s.io "$@"; }
kc() { KUBECACHEDIR="$KSTATE/kubectl-cache" timeout 20 "$BIN_DIR/kubectl" --kubeconfig "$KSTATE/kubeconfig" --request-timeout=10s "$@"; }

# Is the pid in $STATE/pids/$1.pid alive and really that binary? Prints the pid.
daemon_pid() {
  local f="$STATE/pids/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null)"; [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  exe="${exe% (deleted)}"
  # Right after `launch` the pid is still setsid about to exec the daemon: alive.
  [[ "$exe" == */"$1" || "$exe" == */setsid ]] || return 1
  echo "$pid"
}

launch() { # name binary args...
  local name="$1" bin="$2"; shift 2
  setsid "$bin" "$@" </dev/null >>"$STATE/logs/$name.log" 2>&1 &
  echo $! > "$STATE/pids/$name.pid"
  log "started $name (pid $!)"
}

stop_daemon() { # name [grace seconds]
  local name="$1" grace="${2:-15}" pid i
  pid="$(daemon_pid "$name")" || { rm -f "$STATE/pids/$name.pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored SIGTERM for ${grace}s, killing"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$STATE/pids/$name.pid"
  log "stopped $name (pid $pid)"
}

wait_for() { # description deadline watched-daemons -- command...
  local what="$1" deadline="$2" watch="$3" n; shift 4
  while ! "$@" >/dev/null 2>&1; do
    for n in $watch; do
      if ! daemon_pid "$n" >/dev/null; then
        log "$n exited; last lines of $STATE/logs/$n.log:"; tail -n 25 "$STATE/logs/$n.log" >&2 || true
        return 1
      fi
    done
    if ((SECONDS >= deadline)); then log "timed out waiting for $what"; return 1; fi
    sleep 0.5
  done
  log "$what: ok"
}

api_up() { [[ -f "$KSTATE/kubeconfig" ]] && kc get --raw /readyz >/dev/null 2>&1; }
node_ready() {
  [[ "$(kc get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}
healthz() { curl -fsS --max-time 3 "http://127.0.0.1:$HEALTHZ_PORT/healthz"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------------------
# network, cgroups
# ---------------------------------------------------------------------------------------

net_up() {
  if ! ip link show "$VETH" >/dev/null 2>&1; then
    ip link add "$VETH" type veth peer name "$VETH_PEER"
  fi
  ip addr replace "$NODE_IP/24" dev "$VETH"
  ip link set "$VETH_PEER" up
  ip link set "$VETH" up
}

net_down() {
  local ns addrs
  # Network namespaces of sandboxes kubelet could not tear down: ours hold an address of our
  # pod subnet (containerd names them /run/netns/cni-<uuid>).
  for ns in /run/netns/cni-*; do
    [[ -e "$ns" ]] || continue
    addrs="$(ip netns exec "$(basename "$ns")" ip -4 -o addr show 2>/dev/null || true)"
    if grep -q " ${POD_SUBNET%.0/24}\." <<<"$addrs"; then
      umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true
      rm -f "$ns"
    fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  ip link del "$VETH" 2>/dev/null || true
}

cgroup_dirs() { local c; for c in /sys/fs/cgroup/*/; do [[ -d "$c" ]] && echo "${c%/}/$CGROUP"; done; }

cgroups_up() { local d; for d in $(cgroup_dirs); do mkdir -p "$d" 2>/dev/null || true; done; }

cgroups_down() {
  local d sub
  for d in $(cgroup_dirs); do
    [[ -d "$d" ]] || continue
    # Leaves first (rmdir only succeeds on empty cgroups: nothing running is touched).
    while IFS= read -r sub; do rmdir "$sub" 2>/dev/null || true; done < <(find "$d" -depth -type d 2>/dev/null)
  done
}

# ---------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------

write_containerd_config() {
  mkdir -p "$STATE/containerd" "$STATE/cni/net.d" "$STATE/cni/ipam"
  cat > "$STATE/containerd/config.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$("$SCRIPT_DIR/images.sh" ref pause)"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$STATE/cni/net.d"
EOF
  cat > "$STATE/cni/net.d/10-stowage.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "stowage-k$NODE",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_SUBNET"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
}

write_node_credentials() {
  local p="$STATE/pki"
  mkdir -p "$p"
  [[ -f "$KSTATE/pki/ca.key" ]] || die "no $KSTATE/pki/ca.key: is the control plane (kube.sh start) running?"
  ( cd "$p"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.ext
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout node.key -out node.csr \
      -subj "/O=system:nodes/CN=system:node:$NODE_NAME" 2>/dev/null
    openssl x509 -req -in node.csr -CA "$KSTATE/pki/ca.crt" -CAkey "$KSTATE/pki/ca.key" \
      -CAcreateserial -CAserial "$p/ca.srl" -out node.crt -days 30 -extfile client.ext 2>/dev/null
    rm -f node.csr client.ext
  ) || die "openssl failed making the node certificate"
  cp "$KSTATE/pki/ca.crt" "$p/ca.crt"
  # shellcheck disable=SC1091
  local server; server="$(. "$KSTATE/env" && echo "$STOWAGE_KUBE_SERVER")"
  cat > "$STATE/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: stowage
  cluster:
    server: $server
    certificate-authority: $p/ca.crt
users:
- name: node
  user:
    client-certificate: $p/node.crt
    client-key: $p/node.key
contexts:
- name: stowage
  context: {cluster: stowage, user: node}
current-context: stowage
EOF
  chmod 600 "$STATE/kubelet.kubeconfig" "$p/node.key"
}

write_kubelet_config() {
  mkdir -p "$ROOT" "$STATE/pod-logs" "$STATE/volume-plugins"
  cat > "$STATE/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://$SOCK
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $HEALTHZ_PORT
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
  x509:
    clientCAFile: $STATE/pki/ca.crt
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
podLogsDir: $STATE/pod-logs
volumePluginDir: $STATE/volume-plugins
makeIPTablesUtilChains: false
rotateCertificates: false
serverTLSBootstrap: false
# Our images cannot be pulled again: never garbage-collect them, never evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
# Test speed: status every 4 s, volume manager reconciles quickly.
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
maxPods: 50
# kubelet_volume_stats_* (NodeGetVolumeStats) every 10 s instead of every minute.
volumeStatsAggPeriod: 10s
EOF
}

# ---------------------------------------------------------------------------------------
# start / stop
# ---------------------------------------------------------------------------------------

load_ports() {
  KUBELET_PORT=10250 HEALTHZ_PORT=""
  # shellcheck disable=SC1091
  [[ -f "$STATE/ports" ]] && . "$STATE/ports"
  return 0
}

running_ok() {
  load_ports
  [[ -n "$HEALTHZ_PORT" ]] && daemon_pid containerd >/dev/null && daemon_pid kubelet >/dev/null &&
    healthz >/dev/null 2>&1 && api_up && node_ready
}

launch_kubelet() {
  launch kubelet "$BIN_DIR/kubelet" --config "$STATE/kubelet-config.yaml" \
    --kubeconfig "$STATE/kubelet.kubeconfig" --root-dir "$ROOT" --cert-dir "$STATE/pki" \
    --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --v "${KUBELET_VERBOSITY:-1}"
}

start_once() {
  local deadline=$((SECONDS + READY_TIMEOUT))
  mkdir -p "$STATE/logs" "$STATE/pids"
  echo "$NODE" > "$STATE/node"
  echo "$KSTATE" > "$STATE/kube-state"
  touch "$STATE/.stowage-kubelet"
  KUBELET_PORT=10250
  HEALTHZ_PORT="$(free_port)"
  printf 'KUBELET_PORT=%s\nHEALTHZ_PORT=%s\n' "$KUBELET_PORT" "$HEALTHZ_PORT" > "$STATE/ports"

  net_up
  cgroups_up
  write_containerd_config
  launch containerd "$(command -v containerd)" --config "$STATE/containerd/config.toml"
  wait_for "containerd" "$deadline" "containerd" -- ctr_ version || return 1
  "$SCRIPT_DIR/images.sh" import "$SOCK" pause busybox || return 1

  write_node_credentials
  write_kubelet_config
  launch_kubelet
  wait_for "kubelet /healthz" "$deadline" "containerd kubelet" -- healthz || return 1
  wait_for "node $NODE_NAME Ready" "$deadline" "containerd kubelet" -- node_ready || return 1

  cat > "$STATE/env" <<EOF
export KUBELET_STATE=$STATE
export KUBELET_ROOT=$ROOT
export KUBELET_NODE_NAME=$NODE_NAME
export KUBELET_NODE_IP=$NODE_IP
export KUBELET_PORT=$KUBELET_PORT
export KUBELET_HEALTHZ=http://127.0.0.1:$HEALTHZ_PORT/healthz
export CONTAINERD_SOCK=$SOCK
export POD_SUBNET=$POD_SUBNET
EOF
}

stop_all() {
  local pod pods i pid
  load_ports
  rm -f "$STATE/env"
  # 1. Pods first, while kubelet runs: it unpublishes/unstages their volumes and frees their
  #    sandboxes (CNI DEL). Bounded; whatever is left is torn down by force below.
  if daemon_pid kubelet >/dev/null && api_up; then
    pods="$(kc get pods -A --field-selector "spec.nodeName=$NODE_NAME" \
      -o 'jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}' 2>/dev/null || true)"
    if [[ -n "$pods" ]]; then
      log "deleting $(wc -l <<<"$pods") pod(s) on $NODE_NAME"
      while IFS=/ read -r ns pod; do
        [[ -n "$pod" ]] && kc -n "$ns" delete pod "$pod" --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
      done <<<"$pods"
      for ((i = 0; i < 60; i++)); do
        [[ -z "$(ctr_ tasks ls -q 2>/dev/null)" ]] && break
        sleep 0.5
      done
    fi
  fi
  # 2. kubelet, then whatever is left in our containerd.
  stop_daemon kubelet 15
  if daemon_pid containerd >/dev/null; then
    local t c
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    sleep 0.5
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks rm -f "$t" >/dev/null 2>&1 || true; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$c" >/dev/null 2>&1 || true; done
  fi
  stop_daemon containerd 10
  # Shims of OUR containerd only (their command line names our socket).
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK( |\$)" 2>/dev/null || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # 3. Mounts under the state dir (pod volumes, kubelet's shared bind of its root, overlay
  #    snapshots, sandbox shm), deepest first.
  local m
  for i in 1 2 3; do
    mapfile -t ms < <(awk -v p="$STATE/" 'index($5, p) == 1 || $5 == substr(p, 1, length(p) - 1) {print $5}' /proc/self/mountinfo | sort -r)
    ((${#ms[@]})) || break
    for m in "${ms[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  done
  net_down
  cgroups_down
  if api_up; then kc delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null 2>&1 || true; fi
}

cmd_start() {
  parse_args "$@"
  [[ -x "$BIN_DIR/kubelet" ]] || die "no kubelet in $BIN_DIR: run tests/infra/kube.sh build"
  [[ -f "$KSTATE/env" ]] && api_up || die "no control plane answering in $KSTATE (run tests/infra/kube.sh start)"
  local b
  for b in containerd runc ctr ip openssl python3; do command -v "$b" >/dev/null || die "$b not found (tests/infra/deps.sh)"; done
  [[ -x "$CNI_BIN/bridge" && -x "$CNI_BIN/host-local" && -x "$CNI_BIN/loopback" ]] ||
    die "CNI plugins missing in $CNI_BIN (apt-get install containernetworking-plugins)"
  mkdir -p "$STATE" && STATE="$(cd "$STATE" && pwd -P)"
  if [[ ! -e "$STATE/.stowage-kubelet" ]] && [[ -n "$(ls -A "$STATE")" ]]; then
    die "$STATE is not empty and not a kubelet.sh state dir; refusing to use it"
  fi
  if running_ok; then log "already running: node $NODE_NAME in $STATE"; echo "$STATE"; return 0; fi
  stop_all
  local t0=$SECONDS
  trap 'log "start failed/interrupted, stopping"; stop_all' EXIT
  trap 'exit 130' INT TERM
  if start_once; then
    trap - EXIT INT TERM
    log "node $NODE_NAME Ready in $((SECONDS - t0))s (state $STATE; source $STATE/env)"
    echo "$STATE"; return 0
  fi
  die "node $NODE_NAME did not become Ready within ${READY_TIMEOUT}s; logs in $STATE/logs"
}

cmd_stop() {
  parse_args "$@"
  [[ -d "$STATE" ]] || { log "nothing in $STATE"; return 0; }
  [[ -e "$STATE/.stowage-kubelet" ]] || die "$STATE is not a kubelet.sh state dir"
  stop_all
  log "stopped node $NODE_NAME (state kept in $STATE)"
}

# Restart only kubelet (SIGTERM, then the same command line): containers keep running in
# containerd, and kubelet re-scans plugins_registry/ and re-registers the plugins there.
cmd_restart_kubelet() {
  parse_args "$@"
  load_ports
  [[ -f "$STATE/env" ]] && daemon_pid containerd >/dev/null || die "node in $STATE is not running"
  stop_daemon kubelet 15
  launch_kubelet
  local deadline=$((SECONDS + READY_TIMEOUT))
  wait_for "kubelet /healthz" "$deadline" "containerd kubelet" -- healthz || die "kubelet did not come back"
  wait_for "node $NODE_NAME Ready" "$deadline" "containerd kubelet" -- node_ready || die "node not Ready after the restart"
}

cmd_status() {
  parse_args "$@"
  load_ports
  local n pid up=0
  for n in containerd kubelet; do
    if pid="$(daemon_pid "$n")"; then printf '%-12s running pid %s\n' "$n" "$pid"; up=$((up + 1)); else printf '%-12s stopped\n' "$n"; fi
  done
  ((up)) || { echo "node: stopped ($STATE)"; return 3; }
  if running_ok; then echo "node: $NODE_NAME Ready ($STATE)"; return 0; fi
  echo "node: $NODE_NAME degraded ($STATE)"; return 1
}

cmd_env() {
  parse_args "$@"
  [[ -f "$STATE/env" ]] || die "no node started in $STATE"
  cat "$STATE/env"
}

main() {
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    restart-kubelet) cmd_restart_kubelet "$@" ;;
    status) cmd_status "$@" ;;
    env) cmd_env "$@" ;;
    *) die "usage: $0 {start|stop|restart-kubelet|status|env} [--state DIR] [--kube-state DIR] [--node N]" ;;
  esac
}
# One line: bash reads scripts lazily (see kube.sh).
main "$@"; exit
