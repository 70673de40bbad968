#!/usr/bin/env bash
# Stowage test infrastructure: a REAL Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler + kubectl) built from Go modules and run on loopback.
# `build` also builds kubelet (same wrapper module); `start` runs no kubelet: for pods, add a node
# with tests/infra/kubelet.sh.
#
# Usage: tests/infra/kube.sh build                                  # once per machine/version
#        tests/infra/kube.sh start  [--no-pv-binder] [--state DIR]  # prints the state dir
#        tests/infra/kube.sh stop   [--state DIR]
#        tests/infra/kube.sh status [--state DIR]   # exit 0 ready, 1 degraded, 3 stopped
#        tests/infra/kube.sh env    [--state DIR]   # print the env file: eval "$(kube.sh env)"
#
#   start: fresh cluster (new etcd data, certs, tokens, free loopback ports) in DIR
#     (default /tmp/stowage-kube); a no-op if a healthy cluster of the same mode already runs
#     there, a restart if the mode differs. --no-pv-binder runs kube-controller-manager with
#     --controllers=*,-persistentvolume-binder-controller (for Stowage's own binder mode).
#     Waits (bounded by KUBE_READY_TIMEOUT) for /readyz, kcm and scheduler /healthz, namespace
#     default and serviceaccount default/default; on failure or Ctrl-C kills what it started.
#   DIR afterwards: kubeconfig (admin token, CA embedded), kubeconfig-cert (admin client cert,
#     O=system:masters), env (KUBECONFIG, KUBECTL, KUBECACHEDIR, STOWAGE_KUBE_{STATE,SERVER,CA,
#     TOKEN,MODE}), ports, pki/ (ca.crt, apiserver.crt with IP SAN 127.0.0.1, admin.*, sa.*),
#     logs/<daemon>.log, pids/<daemon>.pid.
#   stop: SIGTERM, then SIGKILL after 10 s; only pids whose /proc/PID/exe is our binary.
#   No kubelet: Node objects you create get tainted NotReady/unreachable by the node-lifecycle
#   controller after ~40 s; pods never run (the scheduler still binds them and sets
#   volume.kubernetes.io/selected-node for WaitForFirstConsumer claims).
#
# Environment:
#   STOWAGE_CACHE   cache root (default $HOME/.cache/stowage); binaries go to
#                   $STOWAGE_CACHE/kube/<KUBE_VERSION>/bin, Go caches to $STOWAGE_CACHE/go*
#   KUBE_VERSION    k8s.io/kubernetes version (default below)
#   ETCD_VERSION    go.etcd.io/etcd/server/v3 version (default below)
#   KUBE_STATE      default state dir (default /tmp/stowage-kube)
#   KUBE_READY_TIMEOUT  seconds to wait for readiness (default 90)
#   KUBE_VERBOSITY  --v for the kube daemons (default 1)
#
# Version notes (keep up to date when bumping):
#   WORKS: k8s.io/kubernetes v1.34.4 + etcd server v3.6.4 (the etcd 1.34.4's go.mod pins),
#   Go 1.26.8, Debian 12, 2 cores: cold build ~5 min (incl. module downloads), warm rebuild
#   ~30 s (Go caches kept), cluster ready ~10 s after `start`. kubelet (added later, built
#   alone when the others exist): 81 s with the control plane's Go cache warm, 84 MB.
#   Recipe: a throwaway wrapper module requiring k8s.io/kubernetes, with
#   `replace k8s.io/X => k8s.io/X v0.<minor>.<patch>` for each staging module listed in
#   k8s.io/kubernetes' own go.mod (its `=> ./staging/...` replaces don't apply to dependents),
#   plus its `godebug` line, and version ldflags (else the server reports v0.0.0-master).
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.4}"
CACHE_ROOT="${STOWAGE_CACHE:-$HOME/.cache/stowage}"
KUBE_CACHE="$CACHE_ROOT/kube/$KUBE_VERSION"
BIN_DIR="$KUBE_CACHE/bin"
DEFAULT_STATE="${KUBE_STATE:-/tmp/stowage-kube}"
READY_TIMEOUT="${KUBE_READY_TIMEOUT:-90}"
KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
DAEMONS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"

log() { printf '[kube.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[kube.sh] ERROR: %s\n' "$*" >&2; exit 1; }

# ----------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------

go_env() {
  # Keep every Go cache out of the repo: under the Stowage cache.
  export GOPATH="$CACHE_ROOT/go"
  export GOMODCACHE="$CACHE_ROOT/go/pkg/mod"
  export GOCACHE="$CACHE_ROOT/go-build"
  export GOTOOLCHAIN=local   # never fetch another toolchain
  export GOFLAGS="-mod=mod -buildvcs=false"
  export CGO_ENABLED=0       # static binaries, no C toolchain needed
  command -v go >/dev/null || die "go not found in PATH"
}

built_ok() {
  local b
  for b in etcd "${KUBE_BINS[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done
  [[ -f "$BIN_DIR/.stamp" && "$(cat "$BIN_DIR/.stamp")" == "kube=$KUBE_VERSION etcd=$ETCD_VERSION" ]]
}

build_etcd() {
  [[ -x "$BIN_DIR/etcd" && -f "$BIN_DIR/.etcd-$ETCD_VERSION" ]] && { log "etcd $ETCD_VERSION already built"; return 0; }
  local w="$KUBE_CACHE/etcd-wrapper"
  rm -rf "$w"; mkdir -p "$w"
  log "building etcd $ETCD_VERSION in $w"
  (
    cd "$w"
    cat > main.go <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    cat > go.mod <<EOF
module stowage.local/etcdwrapper

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
    go mod tidy
    go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd.tmp" .
  )
  mv -f "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
  touch "$BIN_DIR/.etcd-$ETCD_VERSION"
}

build_kube() {
  local b missing=()
  for b in "${KUBE_BINS[@]}"; do [[ -x "$BIN_DIR/$b" ]] || missing+=("$b"); done
  if [[ -f "$BIN_DIR/.kube-$KUBE_VERSION" ]]; then
    ((${#missing[@]})) || { log "kubernetes $KUBE_VERSION already built"; return 0; }
    # Built before this list grew (kubelet was added later): build only what is missing.
  else
    missing=("${KUBE_BINS[@]}")
  fi
  local w="$KUBE_CACHE/kube-wrapper" minor patch stagever gomod
  [[ "$KUBE_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || die "KUBE_VERSION must look like v1.N.M (got $KUBE_VERSION)"
  minor="${BASH_REMATCH[1]}"; patch="${BASH_REMATCH[2]}"
  stagever="v0.$minor.$patch"
  rm -rf "$w"; mkdir -p "$w"
  log "building kubernetes $KUBE_VERSION (staging modules $stagever) in $w"
  (
    cd "$w"
    printf 'module stowage.local/kubewrapper\n\ngo 1.24.0\n' > go.mod
    gomod="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$KUBE_VERSION from the Go proxy"
    {
      printf 'module stowage.local/kubewrapper\n\ngo 1.24.0\n\n'
      # Same default GODEBUG as upstream's own build.
      sed -n 's/^godebug /godebug /p' "$gomod"
      printf '\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
      sed -n "s#^[[:space:]]*\(k8s.io/[A-Za-z0-9._-]*\) => ./staging/.*#\t\1 => \1 $stagever#p" "$gomod"
      printf ')\n'
    } > go.mod
    grep -q '=> k8s.io/api ' go.mod || die "no staging replace lines found in $gomod"
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for b in "${KUBE_BINS[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$b"; done
      printf ')\n'
    } > tools.go
    go mod tidy
    local pkg=k8s.io/component-base/version cg=k8s.io/client-go/pkg/version ld="-s -w" k v
    local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    for k in "gitVersion=$KUBE_VERSION" "gitMajor=1" "gitMinor=$minor" "gitTreeState=clean" \
             "gitCommit=0000000000000000000000000000000000000000" "buildDate=$date"; do
      ld+=" -X $pkg.$k -X $cg.$k"
    done
    local pkgs=()
    for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
    mkdir -p out
    log "go build ${missing[*]}"
    go build -trimpath -ldflags "$ld" -o out/ "${pkgs[@]}"
    for b in "${missing[@]}"; do mv -f "out/$b" "$BIN_DIR/$b"; done
  )
  touch "$BIN_DIR/.kube-$KUBE_VERSION"
}

cmd_build() {
  mkdir -p "$CACHE_ROOT"
  case "$(cd "$CACHE_ROOT" && pwd -P)/" in
    "$REPO_ROOT"/*) die "STOWAGE_CACHE ($CACHE_ROOT) is inside the repo; put it elsewhere" ;;
  esac
  if built_ok; then log "already built: $BIN_DIR"; echo "$BIN_DIR"; return 0; fi
  # Serialise concurrent builds of the same version (two CI jobs on one machine).
  mkdir -p "$KUBE_CACHE"
  exec 9>"$KUBE_CACHE/.build.lock"
  if ! flock -n 9; then
    log "another build of $KUBE_VERSION is running; waiting (up to 60 min)"
    flock -w 3600 9 || die "timed out waiting for the build lock $KUBE_CACHE/.build.lock"
  fi
  if built_ok; then log "already built: $BIN_DIR"; echo "$BIN_DIR"; return 0; fi
  go_env
  mkdir -p "$BIN_DIR"
  local t0=$SECONDS
  build_etcd
  build_kube
  echo "kube=$KUBE_VERSION etcd=$ETCD_VERSION" > "$BIN_DIR/.stamp"
  "$BIN_DIR/kubectl" version --client >&2 || die "built kubectl does not run"
  log "build done in $((SECONDS - t0))s: $BIN_DIR"
  echo "$BIN_DIR"
}

# ----------------------------------------------------------------------------------------
# start / stop / status
# ----------------------------------------------------------------------------------------

STATE=""
NO_PV_BINDER=0

parse_state_args() {
  STATE="$DEFAULT_STATE"
  while (($#)); do
    case "$1" in
      --state) [[ $# -ge 2 ]] || die "--state needs a directory"; STATE="$2"; shift 2 ;;
      --state=*) STATE="${1#--state=}"; shift ;;
      --no-pv-binder) NO_PV_BINDER=1; shift ;;
      *) die "unknown argument: $1" ;;
    esac
  done
  [[ -n "$STATE" ]] || die "empty --state"
  if [[ -d "$STATE" ]]; then STATE="$(cd "$STATE" && pwd -P)"; fi
}

# Is the pid in $STATE/pids/$1.pid alive and really our binary? Prints the pid.
daemon_pid() {
  local f="$STATE/pids/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null)"; [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  exe="${exe% (deleted)}"
  # Right after `launch`, the pid is still setsid about to exec the daemon: alive, not dead
  # (checking in that instant once failed 80-pods with "kube-scheduler exited").
  [[ "$exe" == */"$1" || "$exe" == */setsid ]] || return 1   # pid recycled by something else
  echo "$pid"
}

# SIGTERM the named daemons together, wait up to 10 s, then SIGKILL the rest.
stop_daemons() {
  local name pid i alive
  local -A pids=()
  for name in "$@"; do
    if pid="$(daemon_pid "$name")"; then
      pids[$name]=$pid
      kill -TERM "$pid" 2>/dev/null || true
    else
      rm -f "$STATE/pids/$name.pid"
    fi
  done
  for ((i = 0; i < 100; i++)); do
    alive=0
    for name in "${!pids[@]}"; do kill -0 "${pids[$name]}" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for name in "${!pids[@]}"; do
    pid="${pids[$name]}"
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) ignored SIGTERM for 10s, killing"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$STATE/pids/$name.pid"
    log "stopped $name (pid $pid)"
  done
}

stop_all() {
  [[ -d "$STATE/pids" ]] || return 0
  # Clients first (together), etcd last so the apiserver doesn't hang on a dead backend.
  stop_daemons kube-scheduler kube-controller-manager kube-apiserver
  stop_daemons etcd
}

# N free loopback TCP ports, all distinct.
free_ports() {
  local n="$1"
  local py
  py="$(command -v /usr/bin/python3 python3 2>/dev/null | head -n1)" || true
  if [[ -n "$py" ]] && "$py" -c 'pass' 2>/dev/null; then
    "$py" - "$n" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
  else
    local used out=() p
    used=" $(ss -Htln | awk '{n=split($4,a,":"); print a[n]}' | tr '\n' ' ') "
    while ((${#out[@]} < n)); do
      p=$((20000 + RANDOM % 12000))
      [[ "$used" == *" $p "* || " ${out[*]} " == *" $p "* ]] || out+=("$p")
    done
    echo "${out[*]}"
  fi
}

make_pki() {
  local d="$STATE/pki"
  mkdir -p "$d"
  # TLS keys are ECDSA P-256 (instant to generate; rustls, Go and OpenSSL all accept them);
  # the service-account signing key stays RSA (RS256 tokens, what every client expects).
  (
    cd "$d"
    umask 077
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=stowage-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    cat > server.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    cat > client.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 3650 -extfile server.ext 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout admin.key -out admin.csr \
      -subj "/O=system:masters/CN=stowage-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    # Aggregation-layer (requestheader) CA: without it kcm/scheduler log
    # "missing content for CA bundle ... requestheader-client-ca-file" every few seconds.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
      -subj "/CN=stowage-front-proxy-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr \
      -subj "/CN=front-proxy-client" 2>/dev/null
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
      -CAcreateserial -out front-proxy-client.crt -days 3650 -extfile client.ext 2>/dev/null
    rm -f ./*.csr
    chmod 644 ca.crt apiserver.crt admin.crt sa.pub front-proxy-ca.crt front-proxy-client.crt
  ) || die "openssl failed while creating certificates in $d"
  openssl verify -CAfile "$d/ca.crt" "$d/apiserver.crt" >/dev/null || die "apiserver cert does not verify"
}

write_kubeconfig() { # file user token
  local ca; ca="$(base64 -w0 < "$STATE/pki/ca.crt")"
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: stowage
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $ca
users:
- name: $2
  user:
    token: $3
contexts:
- name: stowage
  context:
    cluster: stowage
    user: $2
current-context: stowage
EOF
  chmod 600 "$1"
}

write_cert_kubeconfig() { # file
  local ca crt key
  ca="$(base64 -w0 < "$STATE/pki/ca.crt")"
  crt="$(base64 -w0 < "$STATE/pki/admin.crt")"
  key="$(base64 -w0 < "$STATE/pki/admin.key")"
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: stowage
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $ca
users:
- name: stowage-admin
  user:
    client-certificate-data: $crt
    client-key-data: $key
contexts:
- name: stowage
  context:
    cluster: stowage
    user: stowage-admin
current-context: stowage
EOF
  chmod 600 "$1"
}

launch() { # name args...
  local name="$1"; shift
  # setsid: detach from the caller's process group / terminal so the cluster outlives
  # `start`; no fork happens here, so $! is the daemon's own pid.
  setsid "$BIN_DIR/$name" "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 &
  echo $! > "$STATE/pids/$name.pid"
  log "started $name (pid $!)"
}

# Fails (returns 1) if any started daemon has died; names it and shows its log tail.
check_alive() {
  local n
  for n in "$@"; do
    if ! daemon_pid "$n" >/dev/null; then
      log "$n exited; last lines of $STATE/logs/$n.log:"
      tail -n 25 "$STATE/logs/$n.log" >&2 || true
      return 1
    fi
  done
}

# wait_for DESCRIPTION DEADLINE DAEMONS-TO-WATCH -- command...
wait_for() {
  local what="$1" deadline="$2" watch="$3"; shift 4
  while ! "$@" >/dev/null 2>&1; do
    # shellcheck disable=SC2086
    check_alive $watch || return 1
    if ((SECONDS >= deadline)); then log "timed out waiting for $what"; return 1; fi
    sleep 0.5
  done
  log "$what: ok"
}

api_curl() { curl -fsS --max-time 5 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "https://127.0.0.1:$API_PORT$1"; }
healthz() { curl -fsSk --max-time 5 "https://127.0.0.1:$1/healthz"; }
kc() { KUBECACHEDIR="$STATE/kubectl-cache" "$BIN_DIR/kubectl" --kubeconfig "$STATE/kubeconfig" --request-timeout=5s "$@"; }

cluster_healthy() {
  local n
  for n in "${DAEMONS[@]}"; do daemon_pid "$n" >/dev/null || return 1; done
  [[ -f "$STATE/ports" ]] || return 1
  # shellcheck disable=SC1091
  source "$STATE/ports"
  api_curl /readyz >/dev/null 2>&1
}

start_once() {
  local mode="$1" deadline etcd_port etcd_peer kcm_port sched_port ports
  read -r etcd_port etcd_peer API_PORT kcm_port sched_port <<<"$(free_ports 5)"
  [[ -n "$sched_port" ]] || die "could not pick free ports"
  ADMIN_TOKEN="$(openssl rand -hex 24)"
  local kcm_token sched_token
  kcm_token="$(openssl rand -hex 24)"; sched_token="$(openssl rand -hex 24)"

  rm -rf "$STATE/etcd" "$STATE/logs" "$STATE/pids" "$STATE/pki" "$STATE/kubectl-cache" "$STATE/flexvolume"
  mkdir -p "$STATE/logs" "$STATE/pids"
  touch "$STATE/.stowage-kube"
  make_pki
  local p="$STATE/pki"
  ( umask 077
    printf '%s,stowage-admin,stowage-admin,"system:masters"\n' "$ADMIN_TOKEN"
    printf '%s,system:kube-controller-manager,system:kube-controller-manager,\n' "$kcm_token"
    printf '%s,system:kube-scheduler,system:kube-scheduler,\n' "$sched_token"
  ) > "$p/tokens.csv"
  chmod 600 "$p/tokens.csv"
  cat > "$STATE/ports" <<EOF
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$etcd_peer
API_PORT=$API_PORT
KCM_PORT=$kcm_port
SCHED_PORT=$sched_port
ADMIN_TOKEN=$ADMIN_TOKEN
MODE=$mode
EOF
  chmod 600 "$STATE/ports"
  write_kubeconfig "$STATE/kubeconfig" stowage-admin "$ADMIN_TOKEN"
  write_cert_kubeconfig "$STATE/kubeconfig-cert"
  write_kubeconfig "$STATE/kcm.kubeconfig" system:kube-controller-manager "$kcm_token"
  write_kubeconfig "$STATE/scheduler.kubeconfig" system:kube-scheduler "$sched_token"

  deadline=$((SECONDS + READY_TIMEOUT))
  launch etcd --name stowage --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "stowage=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync --log-level warn
  wait_for "etcd health" "$deadline" "etcd" -- curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health" || return 1

  launch kube-apiserver \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
    --client-ca-file "$p/ca.crt" --token-auth-file "$p/tokens.csv" \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --requestheader-client-ca-file "$p/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$p/front-proxy-client.crt" --proxy-client-key-file "$p/front-proxy-client.key" \
    --v "${KUBE_VERBOSITY:-1}"
  wait_for "kube-apiserver /readyz" "$deadline" "etcd kube-apiserver" -- api_curl /readyz || return 1

  local controllers='*'
  [[ "$mode" == no-pv-binder ]] && controllers='*,-persistentvolume-binder-controller'
  launch kube-controller-manager \
    --kubeconfig "$STATE/kcm.kubeconfig" \
    --authentication-kubeconfig "$STATE/kcm.kubeconfig" --authorization-kubeconfig "$STATE/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" \
    --leader-elect=false --use-service-account-credentials=true \
    --controllers "$controllers" \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
    --flex-volume-plugin-dir "$STATE/flexvolume" \
    --v "${KUBE_VERBOSITY:-1}"
  launch kube-scheduler \
    --kubeconfig "$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/scheduler.kubeconfig" --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" \
    --leader-elect=false \
    --v "${KUBE_VERBOSITY:-1}"

  local all="${DAEMONS[*]}"
  wait_for "kube-controller-manager /healthz" "$deadline" "$all" -- healthz "$kcm_port" || return 1
  wait_for "kube-scheduler /healthz" "$deadline" "$all" -- healthz "$sched_port" || return 1
  wait_for "namespace default" "$deadline" "$all" -- kc get namespace default || return 1
  wait_for "serviceaccount default/default" "$deadline" "$all" -- kc -n default get serviceaccount default || return 1

  cat > "$STATE/env" <<EOF
export KUBECONFIG=$STATE/kubeconfig
export KUBECTL=$BIN_DIR/kubectl
export KUBECACHEDIR=$STATE/kubectl-cache
export STOWAGE_KUBE_STATE=$STATE
export STOWAGE_KUBE_SERVER=https://127.0.0.1:$API_PORT
export STOWAGE_KUBE_CA=$STATE/pki/ca.crt
export STOWAGE_KUBE_TOKEN=$ADMIN_TOKEN
export STOWAGE_KUBE_MODE=$mode
EOF
  chmod 600 "$STATE/env"
}

cmd_start() {
  parse_state_args "$@"
  built_ok || die "binaries for $KUBE_VERSION not built in $BIN_DIR; run: $0 build (cold: 15-30 min)"
  local mode=default
  ((NO_PV_BINDER)) && mode=no-pv-binder
  if cluster_healthy && [[ "${MODE:-}" == "$mode" ]]; then
    log "already running ($mode) in $STATE"
    echo "$STATE"; return 0
  fi
  mkdir -p "$STATE" && STATE="$(cd "$STATE" && pwd -P)"
  # Never wipe a directory we didn't create.
  if [[ ! -e "$STATE/.stowage-kube" ]] && [[ -n "$(ls -A "$STATE")" ]]; then
    die "$STATE is not empty and not a kube.sh state dir; refusing to use it"
  fi
  stop_all    # leftovers of a previous run or a different mode
  local t0=$SECONDS attempt
  trap 'log "start failed/interrupted, stopping daemons"; stop_all' EXIT
  trap 'exit 130' INT TERM
  for attempt in 1 2 3; do
    if start_once "$mode"; then
      trap - EXIT INT TERM
      log "cluster ready ($mode) in $((SECONDS - t0))s: https://127.0.0.1:$API_PORT"
      log "use: source $STATE/env   (KUBECONFIG, KUBECTL)"
      echo "$STATE"; return 0
    fi
    stop_all
    if grep -qsl 'address already in use' "$STATE"/logs/*.log && ((attempt < 3)); then
      log "port collision, retrying with new ports (attempt $((attempt + 1)))"
      continue
    fi
    break
  done
  die "cluster did not become ready within ${READY_TIMEOUT}s; logs in $STATE/logs"
}

cmd_stop() {
  parse_state_args "$@"
  stop_all
  rm -f "$STATE/env"
  log "stopped (state kept in $STATE)"
}

cmd_status() {
  parse_state_args "$@"
  local n pid up=0 rss
  for n in "${DAEMONS[@]}"; do
    if pid="$(daemon_pid "$n")"; then
      rss="$(awk '/^VmRSS/ {printf "%d MiB", $2/1024}' "/proc/$pid/status" 2>/dev/null)"
      printf '%-24s running  pid %-7s rss %s\n' "$n" "$pid" "$rss"; up=$((up + 1))
    else
      printf '%-24s stopped\n' "$n"
    fi
  done
  if ((up == 0)); then echo "cluster: stopped ($STATE)"; return 3; fi
  if cluster_healthy; then
    echo "cluster: ready ($MODE) https://127.0.0.1:$API_PORT  state $STATE"
    ((up == ${#DAEMONS[@]})) && return 0
  fi
  echo "cluster: degraded ($STATE)"; return 1
}

cmd_env() {
  parse_state_args "$@"
  [[ -f "$STATE/env" ]] || die "no cluster started in $STATE"
  cat "$STATE/env"
}

main() {
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    build) cmd_build "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    env) cmd_env "$@" ;;
    *) die "usage: $0 {build|start [--no-pv-binder] [--state DIR]|stop [--state DIR]|status [--state DIR]|env [--state DIR]}" ;;
  esac
}

# Keep the call and `exit` on one line: bash reads scripts lazily, so editing this file while a
# long `build` runs could otherwise make bash execute whatever lands after the old end offset.
main "$@"; exit
