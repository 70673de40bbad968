#!/usr/bin/env bash
# A private Docker engine for Stowage's Docker plugin tests: dockerd (Debian docker.io 20.10,
# or a current engine built by tests/infra/moby.sh) with the containerd it manages, everything
# under the state dir, nothing shared with another engine on the machine.
#
#   docker.sh start       [--state DIR]  start (or confirm running); prints the env file
#   docker.sh stop        [--state DIR]  leave the swarm, remove containers, stop the daemon;
#                                        ok when already stopped
#   docker.sh status      [--state DIR]  exit 0 and print the env file when running, else 3
#   docker.sh swarm-init  [--state DIR]  make the daemon a single-node Swarm manager (idempotent)
#   docker.sh swarm-leave [--state DIR]  leave the Swarm again (idempotent)
#
# State dir (default /tmp/stowage-docker): daemon.json, data-root (data/), exec-root (exec/,
# holds containerd's socket and state), dockerd.pid, docker.sock, dockerd.log, the busybox
# rootfs, and $STATE/env:
#   STOWAGE_DOCKER_HOST=unix://$STATE/docker.sock  DOCKER_HOST=(same)
#   STOWAGE_DOCKER_CLI=/usr/bin/docker  STOWAGE_DOCKER_IMAGE=busybox:local
#
# Isolation: own API socket, pidfile, data-root, exec-root and containerd; no iptables rules,
# no masquerading, no docker0 bridge (--bridge=none: containers get loopback only, which the
# tests need). Swarm's docker_gwbridge is created beforehand on a bridge device with a unique
# name; the Swarm control and data ports are picked free. One thing is fixed inside dockerd
# 20.10: Swarm's gossip port 7946 (on the listen address, 127.0.0.1); swarm-init fails with a
# clear message when another Swarm on the machine holds it.
#
# No image can be pulled on these machines: busybox:local is imported from the host's
# busybox-static.
#
# Legacy volume plugins are found by every dockerd in /run/docker/plugins (fixed in dockerd);
# tests put their plugin sockets there under names unique to the run.
#
# Packages (tests/infra/deps.sh installs them; this script installs nothing):
#   apt-get install docker.io containerd runc iptables busybox-static
#
# Env knobs: DOCKER_READY_TIMEOUT (s, default 60); DOCKER_ENGINE_DIR: a directory holding
# `dockerd` and `docker` to run instead of Debian's (tests/infra/moby.sh prints one: Docker
# 28.5.2, the engine with Swarm cluster volumes). Both start with the same isolation flags;
# the newer engine also gets --ip6tables=false --ip-forward=false so it leaves the host's
# sysctls and ip6tables alone.
set -euo pipefail

STATE=/tmp/stowage-docker
READY_TIMEOUT=${DOCKER_READY_TIMEOUT:-60}
IMAGE=busybox:local

usage() {
  echo "usage: $0 start|stop|status|swarm-init|swarm-leave [--state DIR]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
CMD=$1
shift
while [ $# -gt 0 ]; do
  case "$1" in
  --state)
    [ $# -ge 2 ] || usage
    STATE=$2
    shift 2
    ;;
  --state=*)
    STATE=${1#--state=}
    shift
    ;;
  *) usage ;;
  esac
done
case "$STATE" in /*) ;; *) STATE=$PWD/$STATE ;; esac

PIDF=$STATE/dockerd.pid
SOCK=$STATE/docker.sock
ENVF=$STATE/env
LOGF=$STATE/dockerd.log
CLI=/usr/bin/docker
[ -x "$CLI" ] || CLI=$(command -v docker || echo /usr/bin/docker)
DOCKERD=dockerd
EXTRA_FLAGS=()
if [ -n "${DOCKER_ENGINE_DIR:-}" ]; then
  CLI=$DOCKER_ENGINE_DIR/docker
  DOCKERD=$DOCKER_ENGINE_DIR/dockerd
  EXTRA_FLAGS=(--ip6tables=false --ip-forward=false)
fi

log() { echo "docker.sh: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# True when $1 is a live (non-zombie) process whose command name contains $2. A pid file
# alone is not trusted: after a crash the number may belong to something else.
alive() {
  local pid=$1 name=$2 st
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/comm" 2>/dev/null || return 1
  st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$pid/stat" 2>/dev/null)
  [ "$st" != Z ] && [ "$st" != X ]
}
pid_of() { [ -s "$1" ] && cat "$1" || true; }

dk() { DOCKER_HOST=unix://$SOCK timeout 120 "$CLI" "$@"; }
answering() { [ -S "$SOCK" ] && DOCKER_HOST=unix://$SOCK timeout 10 "$CLI" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

check_binaries() {
  local missing=()
  for b in "$DOCKERD" containerd runc containerd-shim-runc-v2 ip ss setsid timeout; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ -x "$CLI" ] || missing+=(docker)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  [ ${#missing[@]} = 0 ] || die "missing: ${missing[*]} (apt-get install docker.io containerd runc iptables busybox-static)"
  # A dynamically linked busybox would need its libraries inside the image.
  if ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is not static (install busybox-static)"
  fi
}

write_env() {
  cat >"$ENVF" <<EOF
STOWAGE_DOCKER_HOST=unix://$SOCK
DOCKER_HOST=unix://$SOCK
STOWAGE_DOCKER_CLI=$CLI
STOWAGE_DOCKER_IMAGE=$IMAGE
EOF
}

import_image() {
  if dk image inspect "$IMAGE" >/dev/null 2>&1; then
    return 0
  fi
  local root=$STATE/rootfs a
  rm -rf "$root"
  mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,data}
  cp /bin/busybox "$root/bin/busybox"
  for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
  done
  echo 'root:x:0:0:root:/:/bin/sh' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
  tar -C "$root" -c . | dk import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
  rm -rf "$root"
}

start() {
  check_binaries
  mkdir -p "$STATE"
  local pid
  pid=$(pid_of "$PIDF")
  if alive "$pid" dockerd && answering; then
    import_image
    write_env
    cat "$ENVF"
    return 0
  fi
  if alive "$pid" dockerd; then
    die "dockerd (pid $pid) runs but does not answer on $SOCK; run: $0 stop --state $STATE"
  fi
  echo '{}' >"$STATE/daemon.json"
  local t0
  t0=$(date +%s%N)
  # A half-started daemon is stopped again, never left behind.
  trap 'log "start failed; stopping what was started"; stop_daemon >/dev/null 2>&1 || true' ERR
  setsid "$DOCKERD" \
    --config-file "$STATE/daemon.json" \
    --data-root "$STATE/data" \
    --exec-root "$STATE/exec" \
    --pidfile "$PIDF" \
    --host "unix://$SOCK" \
    --iptables=false --ip-masq=false --bridge=none --userland-proxy=false ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"} \
    >>"$LOGF" 2>&1 </dev/null &
  # Known before dockerd writes its pid file, so a failed start can still stop it.
  echo $! >"$STATE/dockerd.spawned"
  local waited=0
  until answering; do
    if ! kill -0 $! 2>/dev/null; then
      tail -n 30 "$LOGF" >&2
      false
    fi
    [ $waited -lt $((READY_TIMEOUT * 10)) ] || {
      tail -n 30 "$LOGF" >&2
      log "dockerd not ready within ${READY_TIMEOUT}s"
      false
    }
    sleep 0.1
    waited=$((waited + 1))
  done
  import_image
  trap - ERR
  write_env
  log "dockerd $(dk version --format '{{.Server.Version}}') ready in $((($(date +%s%N) - t0) / 1000000)) ms"
  cat "$ENVF"
}

# A port free for both TCP and UDP (the data path is VXLAN over UDP), below the kernel's
# ephemeral range: dockerd takes data path ports only up to 49151.
free_port() {
  python3 - <<'EOF'
import random, socket, sys
for _ in range(500):
    port = random.randint(20000, 32767)
    ok = True
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            ok = False
        finally:
            s.close()
    if ok:
        print(port)
        sys.exit(0)
sys.exit("no free port found in 20000-32767")
EOF
}

swarm_state() { dk info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown; }

swarm_init() {
  answering || die "dockerd is not running (state $STATE); run: $0 start --state $STATE"
  [ "$(swarm_state)" = active ] && {
    log "already a swarm manager"
    return 0
  }
  if ss -Hltn 'sport = :7946' 2>/dev/null | grep -q .; then
    die "port 7946 (Swarm gossip, fixed in dockerd 20.10) is in use: another Swarm runs on this machine"
  fi
  # docker_gwbridge on a bridge device named for this state dir, so it cannot collide with
  # another engine's docker_gwbridge.
  local br
  br=sgw$(echo "$STATE" | sha256sum | cut -c1-8)
  if ! dk network inspect docker_gwbridge >/dev/null 2>&1; then
    dk network create --driver bridge \
      -o com.docker.network.bridge.name="$br" \
      -o com.docker.network.bridge.enable_icc=false \
      -o com.docker.network.bridge.enable_ip_masquerade=false \
      docker_gwbridge >/dev/null
  fi
  echo "$br" >"$STATE/gwbridge"
  local port dport
  port=$(free_port)
  dport=$(free_port)
  dk swarm init --listen-addr "127.0.0.1:$port" --advertise-addr "127.0.0.1:$port" \
    --data-path-port "$dport" >/dev/null
  local i
  for i in $(seq 100); do
    [ "$(swarm_state)" = active ] && break
    sleep 0.1
  done
  [ "$(swarm_state)" = active ] || die "swarm init did not become active"
  log "swarm manager on 127.0.0.1:$port (data path port $dport, gateway bridge $br)"
}

swarm_leave() {
  answering || return 0
  if [ "$(swarm_state)" != inactive ]; then
    dk swarm leave --force >/dev/null 2>&1 || true
  fi
  dk network rm docker_gwbridge >/dev/null 2>&1 || true
  local br
  br=$(cat "$STATE/gwbridge" 2>/dev/null || true)
  if [ -n "$br" ] && ip link show "$br" >/dev/null 2>&1; then
    ip link del "$br" 2>/dev/null || true
  fi
  rm -f "$STATE/gwbridge"
}

stop_daemon() {
  local pid i cpid
  pid=$(pid_of "$PIDF")
  alive "$pid" dockerd || pid=$(pid_of "$STATE/dockerd.spawned")
  cpid=$(pid_of "$STATE/exec/containerd/containerd.pid")
  if alive "$pid" dockerd; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 300); do
      alive "$pid" dockerd || break
      sleep 0.1
    done
    if alive "$pid" dockerd; then
      log "dockerd did not stop within 30s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # dockerd stops the containerd it started; make sure, by its own pid file.
  if alive "$cpid" containerd; then
    kill -TERM "$cpid" 2>/dev/null || true
    for i in $(seq 100); do
      alive "$cpid" containerd || break
      sleep 0.1
    done
    alive "$cpid" containerd && kill -KILL "$cpid" 2>/dev/null || true
  fi
  # Whatever is still mounted under the state dir (overlay layers, network namespaces of a
  # killed daemon) goes before the directory can.
  { grep -o " $STATE/[^ ]*" /proc/self/mountinfo 2>/dev/null || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -f "$PIDF" "$SOCK" "$STATE/dockerd.spawned"
}

stop() {
  if answering; then
    swarm_leave
    local ids
    ids=$(dk ps -aq 2>/dev/null || true)
    [ -z "$ids" ] || dk rm -f $ids >/dev/null 2>&1 || true
  fi
  local br
  br=$(cat "$STATE/gwbridge" 2>/dev/null || true)
  stop_daemon
  if [ -n "$br" ] && ip link show "$br" >/dev/null 2>&1; then
    ip link del "$br" 2>/dev/null || true
  fi
  rm -f "$STATE/gwbridge" "$ENVF"
  log "stopped"
}

status() {
  if alive "$(pid_of "$PIDF")" dockerd && answering; then
    cat "$ENVF"
    return 0
  fi
  return 3
}

case "$CMD" in
start) start ;;
stop) stop ;;
status) status ;;
swarm-init) swarm_init ;;
swarm-leave) swarm_leave ;;
*) usage ;;
esac
