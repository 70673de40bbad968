#!/usr/bin/env bash
# A throwaway OpenSSH server on 127.0.0.1 for tests of "run the CLI on the server over SSH"
# (the GlusterFS controller's SSH executor): its own host key, one client key authorized for
# root, a free port, nothing read from /etc/ssh.
#
#   sshd.sh start [--state DIR]   start (or confirm running); prints the env file
#   sshd.sh stop  [--state DIR]   stop it and delete DIR
#
# $STATE/env: SSHD_HOST=127.0.0.1 SSHD_PORT SSHD_USER=root SSHD_KEY (client private key)
# SSHD_KNOWN_HOSTS (pins the host key), plus the same as STOWAGE_SSHD_*.
# Packages (tests/infra/deps.sh installs them): openssh-server openssh-client python3
set -euo pipefail

STATE=/tmp/stowage-sshd
usage() { echo "usage: $0 start|stop [--state DIR]" >&2; exit 2; }
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
PIDF=$STATE/sshd.pid
log() { echo "sshd.sh: $*" >&2; }
die() { log "$*"; exit 1; }

alive() { local p; p=$(cat "$PIDF" 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null && grep -q sshd "/proc/$p/comm" 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

ready() {
  timeout 10 ssh -o BatchMode=yes -o ConnectTimeout=5 -o UserKnownHostsFile="$STATE/known_hosts" \
    -i "$STATE/client_key" -p "$PORT" -l root 127.0.0.1 true </dev/null >/dev/null 2>&1
}

do_start() {
  local sshd
  sshd=$(command -v sshd || echo /usr/sbin/sshd)
  [ -x "$sshd" ] || die "sshd missing (apt-get install openssh-server)"
  command -v ssh >/dev/null || die "ssh missing (apt-get install openssh-client)"
  [ "$(id -u)" = 0 ] || die "must run as root (sshd changes users)"
  mkdir -p "$STATE" /run/sshd
  chmod 700 "$STATE"
  if alive && [ -s "$STATE/env" ]; then
    # shellcheck disable=SC1091
    . "$STATE/env"; PORT=$SSHD_PORT
    if ready; then log "already running (pid $(cat "$PIDF"))"; cat "$STATE/env"; return 0; fi
    kill "$(cat "$PIDF")" 2>/dev/null || true
  fi
  [ -f "$STATE/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/host_key"
  [ -f "$STATE/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/client_key"
  cp "$STATE/client_key.pub" "$STATE/authorized_keys"
  chmod 600 "$STATE/authorized_keys"
  PORT=$(free_port)
  echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$STATE/host_key.pub")" >"$STATE/known_hosts"
  trap 'rc=$?; [ $rc = 0 ] || { [ -s "$PIDF" ] && kill "$(cat "$PIDF")" 2>/dev/null; }; exit $rc' EXIT
  # -f /dev/null: none of /etc/ssh/sshd_config applies; everything needed is given here.
  "$sshd" -f /dev/null -h "$STATE/host_key" -p "$PORT" \
    -o ListenAddress=127.0.0.1 -o PidFile="$PIDF" -o AuthorizedKeysFile="$STATE/authorized_keys" \
    -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
    -o UsePAM=no -o StrictModes=no -o LogLevel=ERROR -E "$STATE/sshd.log" 9>&-
  for _ in $(seq 1 100); do ready && break; sleep 0.1; done
  ready || { tail -5 "$STATE/sshd.log" >&2 || true; die "sshd not answering on 127.0.0.1:$PORT"; }
  cat >"$STATE/env" <<EOV
SSHD_HOST=127.0.0.1
SSHD_PORT=$PORT
SSHD_USER=root
SSHD_KEY=$STATE/client_key
SSHD_KNOWN_HOSTS=$STATE/known_hosts
STOWAGE_SSHD_HOST=127.0.0.1
STOWAGE_SSHD_PORT=$PORT
STOWAGE_SSHD_USER=root
STOWAGE_SSHD_KEY=$STATE/client_key
STOWAGE_SSHD_KNOWN_HOSTS=$STATE/known_hosts
EOV
  trap - EXIT
  log "ready: pid $(cat "$PIDF"), 127.0.0.1:$PORT"
  cat "$STATE/env"
}

do_stop() {
  if alive; then
    local p; p=$(cat "$PIDF")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -rf "$STATE"
}

case "$CMD" in
start) do_start ;;
stop) [ -d "$STATE" ] || exit 0; do_stop ;;
*) usage ;;
esac
