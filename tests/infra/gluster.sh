#!/usr/bin/env bash
# A real, single-node GlusterFS server for Stowage tests: glusterd with its own working
# directory, one distribute volume with quota enforced strictly. No systemd, no /var/lib/glusterd.
#
#   gluster.sh start  [--state DIR]   start (or confirm running); prints the env file
#   gluster.sh stop   [--state DIR]   unmount our volume everywhere, stop our processes, purge DIR
#   gluster.sh status [--state DIR]   exit 0 and print the env file when running, else 3
#   gluster.sh stop-glusterd  [--state DIR]   stop only glusterd (bricks and mounts stay up)
#
# State dir (default /tmp/stowage-gluster) holds glusterd.vol, glusterd's working directory,
# logs, the brick and $STATE/env:
#   GLUSTER_HOST GLUSTER_VOLUME GLUSTER_SOCK GLUSTER_BRICK GLUSTER_STATE, and the same values as
#   STOWAGE_GLUSTER_* so `set -a; . $STATE/env` feeds the integration tests.
#
# Only ONE glusterd can run per machine: port 24007 and /var/run/gluster are fixed (bricks,
# quotad and the quota aux mounts connect to localhost:24007). So a second state dir cannot
# start while another one's glusterd runs: start says so and fails. Starts and stops take a
# machine-wide lock. The volume name is unique per state dir (chosen at the first start).
#
# Packages (tests/infra/deps.sh installs them): glusterfs-server glusterfs-client fuse3
# Env knobs: GLUSTER_READY_TIMEOUT (s, default 30), GLUSTER_HOST (default: hostname if it
# resolves to a local address, else 127.0.0.2; the CLI refuses localhost/127.0.0.1 by text),
# GLUSTER_PORT_WAIT (s, default 0: how long start waits for another state dir's glusterd).
set -euo pipefail

STATE=/tmp/stowage-gluster
READY_TIMEOUT=${GLUSTER_READY_TIMEOUT:-30}
LOCK=/run/lock/stowage-gluster.lock

usage() { echo "usage: $0 start|stop|status|stop-glusterd [--state DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
CMD=$1; shift
while [ $# -gt 0 ]; do
  case "$1" in
  --state) [ $# -ge 2 ] || usage; STATE=$2; shift 2 ;;
  --state=*) STATE=${1#--state=}; shift ;;
  *) usage ;;
  esac
done
case "$STATE" in /*) ;; *) STATE=$PWD/$STATE ;; esac

WORKDIR=$STATE/glusterd; RUNDIR=$STATE/run; LOGDIR=$STATE/log; BRICKS=$STATE/bricks
SOCK=$STATE/glusterd.socket; PIDFILE=$STATE/glusterd.pid; ENVF=$STATE/env

log() { echo "gluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
cli() { timeout 120 gluster --mode=script --glusterd-sock="$SOCK" --log-file="$LOGDIR/cli.log" "$@"; }

alive() { # pid name: live (not zombie) process whose comm contains name
  local pid=$1 name=$2 st
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/comm" 2>/dev/null || return 1
  st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\).*/\1/p' "/proc/$pid/stat" 2>/dev/null)
  [ "$st" != Z ] && [ "$st" != X ]
}
pid_of() { [ -s "$1" ] && cat "$1" || true; }

check_binaries() {
  local b missing=()
  for b in glusterd gluster glusterfs glusterfsd mount.glusterfs flock ss; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} = 0 ] || die "missing: ${missing[*]} (apt-get install glusterfs-server glusterfs-client fuse3 iproute2 util-linux)"
  [ -c /dev/fuse ] || die "/dev/fuse is missing: FUSE mounts cannot work here"
  [ "$(id -u)" = 0 ] || die "must run as root (bricks use trusted.* xattrs; FUSE mounts)"
}

is_local_addr() {
  local ip
  for ip in $(getent ahostsv4 "$1" 2>/dev/null | awk '{print $1}' | sort -u); do
    case $ip in 127.*) return 0 ;; esac
    ip -4 -o addr show 2>/dev/null | grep -qw "inet $ip" && return 0
  done
  return 1
}

choose_host() {
  local h=${GLUSTER_HOST:-}
  if [ -z "$h" ]; then
    if is_local_addr "$(hostname)"; then h=$(hostname); else h=127.0.0.2; fi
  fi
  case $h in localhost|127.0.0.1|0.*) die "GLUSTER_HOST=$h is refused by the gluster CLI; use \$(hostname) or 127.0.0.2" ;; esac
  is_local_addr "$h" || die "GLUSTER_HOST=$h does not resolve to an address of this machine"
  echo "$h"
}

write_vol() {
  cat >"$STATE/glusterd.vol" <<EOV
volume management
    type mgmt/glusterd
    option working-directory $WORKDIR
    option run-directory $RUNDIR
    option logging-directory $LOGDIR
    option glusterd-sockfile $SOCK
    option transport-type socket
    option transport.socket.keepalive-time 10
    option transport.socket.keepalive-interval 2
    option transport.socket.read-fail-log off
    option transport.socket.listen-port 24007
    option ping-timeout 0
    option event-threads 1
    option base-port 49152
    option max-port 60999
end-volume
EOV
}

write_env() {
  cat >"$ENVF.tmp" <<EOV
GLUSTER_HOST=$HOST
GLUSTER_VOLUME=$VOL
GLUSTER_SOCK=$SOCK
GLUSTER_BRICK=$BRICKS/$VOL/brick
GLUSTER_STATE=$STATE
STOWAGE_GLUSTER_HOST=$HOST
STOWAGE_GLUSTER_VOLUME=$VOL
STOWAGE_GLUSTER_SOCK=$SOCK
STOWAGE_GLUSTER_BRICK=$BRICKS/$VOL/brick
STOWAGE_GLUSTER_STATE=$STATE
EOV
  mv "$ENVF.tmp" "$ENVF"
}

glusterd_ready() { cli pool list >/dev/null 2>&1; }

# Everything the volume needs, each step only when missing (safe after a partial start).
ensure_volume() {
  local info st t0
  info=$(cli volume info "$VOL" --xml 2>/dev/null || true)
  if ! grep -q '<opRet>0</opRet>' <<<"$info"; then
    mkdir -p "$BRICKS/$VOL"
    t0=$(now_ms)
    # force: the brick is on the root filesystem, which gluster refuses otherwise.
    cli volume create "$VOL" "$HOST:$BRICKS/$VOL/brick" force >/dev/null 9>&-
    log "volume $VOL created in $(($(now_ms) - t0)) ms"
    info=$(cli volume info "$VOL" --xml)
  fi
  if ! grep -q '<statusStr>Started</statusStr>' <<<"$info"; then
    cli volume start "$VOL" force >/dev/null 9>&-
  fi
  if ! cli volume get "$VOL" features.quota 2>/dev/null | grep -qE 'features.quota +on'; then
    t0=$(now_ms)
    cli volume quota "$VOL" enable >/dev/null 9>&-
    log "quota enabled on $VOL in $(($(now_ms) - t0)) ms"
  fi
  # Stowage's controller sets these itself; set here too so raw-CLI tests see enforcement.
  cli volume set "$VOL" features.soft-timeout 0 >/dev/null
  cli volume set "$VOL" features.hard-timeout 0 >/dev/null
  for _ in $(seq 1 $((READY_TIMEOUT * 10))); do
    st=$(cli volume status "$VOL" --xml 2>/dev/null || true)
    if grep -q '<opRet>0</opRet>' <<<"$st" && grep -q '<status>1</status>' <<<"$st" && ! grep -q '<status>0</status>' <<<"$st"; then
      return 0
    fi
    sleep 0.1
  done
  die "brick of $VOL not online after ${READY_TIMEOUT}s"
}

start_glusterd() {
  local pid t0
  pid=$(pid_of "$PIDFILE")
  if alive "$pid" glusterd && glusterd_ready; then return 0; fi
  if ss -Hltn 'sport = :24007' 2>/dev/null | grep -q .; then
    reap_stale
    sleep 0.5
    if ss -Hltn 'sport = :24007' 2>/dev/null | grep -q .; then
      die "port 24007 is taken by another glusterd (only one per machine; stop it or use its --state)"
    fi
  fi
  mkdir -p "$WORKDIR" "$RUNDIR" "$LOGDIR" "$BRICKS"
  write_vol
  t0=$(now_ms)
  STARTED_GLUSTERD=1
  # 9>&-: the daemon must not inherit (and so hold forever) the lock this script holds.
  glusterd -f "$STATE/glusterd.vol" -p "$PIDFILE" -l "$LOGDIR/glusterd.log" 9>&-
  for _ in $(seq 1 $((READY_TIMEOUT * 10))); do
    if glusterd_ready; then
      log "glusterd (pid $(pid_of "$PIDFILE")) ready in $(($(now_ms) - t0)) ms"
      return 0
    fi
    sleep 0.1
  done
  tail -20 "$LOGDIR/glusterd.log" >&2 || true
  die "glusterd not ready after ${READY_TIMEOUT}s"
}

# A glusterd (and its bricks, quotad, clients) left by a run of this script whose state dir is
# gone (the run was killed before its trap): nobody can stop it through its state any more, and
# it holds the machine's one glusterd port. Only processes whose command line names such a
# vanished dir are touched, by PID.
reap_stale() {
  local p pid cmd dir
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$(cat "$p/comm" 2>/dev/null)" = glusterd ] || continue
    cmd=$(tr '\0' '\n' <"$p/cmdline" 2>/dev/null) || continue
    dir=$(awk 'prev=="-f"{print; exit} {prev=$0}' <<<"$cmd")
    dir=${dir%/glusterd.vol}
    [ -n "$dir" ] && [ "$dir" != "$STATE" ] && [ ! -e "$dir" ] || continue
    log "reaping glusterd $pid of vanished state dir $dir"
    local q
    for q in /proc/[0-9]*; do
      { tr '\0' ' ' <"$q/cmdline"; } 2>/dev/null | grep -qF "$dir/" && kill -KILL "${q#/proc/}" 2>/dev/null
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

stop_glusterd() {
  local pid
  pid=$(pid_of "$PIDFILE")
  if alive "$pid" glusterd; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$pid" glusterd || break; sleep 0.05; done
    alive "$pid" glusterd && kill -KILL "$pid" 2>/dev/null || true
    log "stopped glusterd (pid $pid)"
  fi
  rm -f "$PIDFILE" "$SOCK"
}

# Our gluster processes: bricks, quotad, shd and glusterd whose command line names the state
# dir, plus FUSE clients of our volume (their command line names the volume, not the dir).
our_pids() {
  local p pid exe cmd
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case $exe in */glusterd | */glusterfs | */glusterfsd) ;; *) continue ;; esac
    cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
    case $cmd in *"$STATE/"* | *"--volfile-id=$VOL "* | *"--volfile-id=/$VOL "* | *"--volfile-id=$VOL/"* | *"--volfile-id=/$VOL/"*) echo "$pid" ;; esac
  done
}

unmount_ours() {
  local line fstype src mp vol
  # Reverse order: children first. Fields: 5 = mount point; after " - ": fstype, source.
  awk '{ for (i = 7; i <= NF; i++) if ($i == "-") break; print $(i+1) "\t" $(i+2) "\t" $5 }' /proc/self/mountinfo |
    tac | while IFS=$'\t' read -r fstype src mp; do
      mp=$(printf '%b' "$mp")
      vol=${src#*:}; vol=${vol#/}; vol=${vol%%/*}
      if [ "$fstype" = fuse.glusterfs ] && [ "$vol" = "$VOL" ] || case $mp in "$STATE"/*) true ;; *) false ;; esac; then
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || log "could not unmount $mp"
      fi
    done
}

cleanup_half_start() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "${STARTED_GLUSTERD:-0}" = 1 ]; then
    log "start failed (exit $rc); stopping what this start launched"
    do_stop >/dev/null 2>&1 || true
  fi
  exit "$rc"
}

do_start() {
  check_binaries
  mkdir -p "$STATE"
  if [ -s "$STATE/volume" ]; then VOL=$(cat "$STATE/volume"); else
    VOL=stw-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
    echo "$VOL" >"$STATE/volume"
  fi
  if [ -s "$STATE/host" ]; then HOST=$(cat "$STATE/host"); else
    HOST=$(choose_host); echo "$HOST" >"$STATE/host"
  fi
  STARTED_GLUSTERD=0
  trap cleanup_half_start EXIT
  trap 'exit 130' INT TERM
  local t0; t0=$(now_ms)
  start_glusterd
  ensure_volume
  write_env
  trap - EXIT INT TERM
  log "ready in $(($(now_ms) - t0)) ms: volume $VOL on $HOST, socket $SOCK"
  cat "$ENVF"
}

do_stop() {
  VOL=$(cat "$STATE/volume" 2>/dev/null || echo "none-$$")
  unmount_ours
  # glusterd leaves quota aux-mount pid files of deleted volumes (volume-per-PV tests delete
  # theirs): drop those of volumes it no longer knows, while it can still be asked.
  local f v
  if alive "$(pid_of "$PIDFILE")" glusterd; then
    for f in /var/run/gluster/*_quota_limit.pid /var/run/gluster/*_quota_list.pid; do
      [ -e "$f" ] || continue
      v=$(basename "$f"); v=${v%_quota_*}
      if cli volume info "$v" --xml 2>/dev/null | grep -q 'does not exist'; then
        rm -f "$f"; rmdir "${f%.pid}" 2>/dev/null || true
      fi
    done
  fi
  stop_glusterd
  local pids=() pid
  mapfile -t pids < <(our_pids)
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local any=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ $any = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null && log "SIGKILL $pid" || true; done
  # Leftovers in the hard-coded /var/run/gluster: sockets nobody listens on, quota aux dirs.
  rm -f /var/run/gluster/"${VOL}"_quota_{limit,list}.pid
  rmdir /var/run/gluster/"${VOL}"_quota_{limit,list} 2>/dev/null || true
  local listening s r
  listening=$(ss -xlH 2>/dev/null | awk '{print $5}')
  for s in /var/run/gluster/*.socket; do
    [ -S "$s" ] || continue
    r=$(readlink -f "$s")
    grep -qxF -e "$s" -e "$r" <<<"$listening" || rm -f "$s"
  done
  rm -f /var/log/glusterfs/quota_crawl/"$(echo "${STATE#/}/bricks/" | tr / -)"*.log 2>/dev/null || true
  rm -rf "$STATE"
  log "stopped and purged $STATE"
}

do_status() {
  if alive "$(pid_of "$PIDFILE")" glusterd && [ -s "$ENVF" ] && glusterd_ready; then
    echo "running: glusterd pid $(cat "$PIDFILE")"
    cat "$ENVF"
    return 0
  fi
  echo "not running (state $STATE)"
  return 3
}

take_lock() {
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  flock -w 120 9 || die "another gluster.sh holds $LOCK for more than 120 s"
}

# GLUSTER_PORT_WAIT=N: when another state dir's glusterd holds the machine's one port, wait
# up to N seconds for it to go (without holding the lock its stop needs) instead of failing.
wait_for_port() {
  local waited=0 limit=${GLUSTER_PORT_WAIT:-0}
  while [ "$waited" -lt "$limit" ] && ss -Hltn 'sport = :24007' 2>/dev/null | grep -q . &&
    ! alive "$(pid_of "$PIDFILE")" glusterd; do
    [ "$waited" = 0 ] && log "port 24007 is held by another glusterd; waiting up to ${limit}s"
    sleep 2; waited=$((waited + 2))
  done
}

case "$CMD" in
start) wait_for_port; take_lock; do_start ;;
stop) [ -d "$STATE" ] || exit 0; take_lock; do_stop ;;
stop-glusterd) [ -d "$STATE" ] || exit 0; take_lock; stop_glusterd ;;
status) [ -d "$STATE" ] || { echo "not running (no state dir $STATE)"; exit 3; }; do_status ;;
*) usage ;;
esac
