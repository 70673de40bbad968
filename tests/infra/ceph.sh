#!/usr/bin/env bash
# Throw-away single-node Ceph (Pacific 16.2) for Stowage tests: 1 mon + 1 mgr + 1 bluestore OSD
# on a sparse file, cephx on, pool "rbd" initialised; with --rgw also a radosgw (S3, beast) and a
# test user with fixed test keys. No systemd, no kernel modules, everything below the state dir.
#
#   ceph.sh start     --state DIR [--rgw] [--public-addr IP] [--osd-size-gb N]
#   ceph.sh stop      --state DIR [--purge]   stop what start started (ok when stopped)
#   ceph.sh status    --state DIR             exit 0 when healthy, 3 when not
#   ceph.sh stop-osd  --state DIR             stop the OSD only (failure tests)
#   ceph.sh start-osd --state DIR             start it again and wait until it is up
#   ceph.sh stop-mon  --state DIR             stop the (only) monitor (failure tests)
#   ceph.sh start-mon --state DIR             start it again and wait for its quorum
#
# start is idempotent: a healthy cluster is left alone; a stopped one is restarted on its data
# (same ports: they are in the monmap); otherwise a new cluster is made. Two clusters can run at
# once: ports are picked free at creation (never fixed ones), run dir, admin sockets, pid files
# and logs live in the state dir, and stop only touches processes started with its ceph.conf.
#
# $STATE/env (sh syntax; `set -a; . $STATE/env`):
#   CEPH_CONF CEPH_KEYRING (admin keyring file) CEPH_ADMIN_KEY CEPH_USER=admin CEPH_MON_HOST
#   (v2+v1 list) CEPH_MON_ADDR (ip:port v1, for krbd) CEPH_FSID CEPH_RBD_POOL=rbd CEPH_PUBLIC_ADDR
#   CEPH_MNT_ROOT ($STATE/mnt: test mounts below it are cleaned up by stop)
#   with --rgw: RGW_ENDPOINT S3_ENDPOINT S3_ACCESS_KEY S3_SECRET_KEY S3_REGION and AWS_* twins.
#
# --public-addr: the address daemons bind to and advertise (default 127.0.0.1). A kernel client
# in the node VM refuses a monitor that advertises loopback ("wrong peer"), so the krbd tests run
# Ceph on an address of a private network namespace that the guest reaches through QEMU's NAT.
#
# Packages (tests/infra/deps.sh installs them): ceph-mon ceph-osd ceph-mgr ceph-common
#   radosgw python3-rados (for --rgw) uuid-runtime curl
set -euo pipefail

STATE=""
RGW=0
ADDR=127.0.0.1
OSD_SIZE_GB=${CEPH_OSD_SIZE_GB:-10}
PURGE=0
S3_ACCESS_KEY=STOWAGETESTACCESS001
S3_SECRET_KEY=stowagetestsecretkey0000000000000000001
S3_UID=stowage-test

usage() {
    echo "usage: $0 start|stop|status|stop-osd|start-osd|stop-mon|start-mon --state DIR [--rgw] [--public-addr IP] [--osd-size-gb N] [--purge]" >&2
    exit 2
}
[ $# -ge 1 ] || usage
CMD=$1
shift
while [ $# -gt 0 ]; do
    case "$1" in
    --state) [ $# -ge 2 ] || usage; STATE=$2; shift 2 ;;
    --rgw) RGW=1; shift ;;
    --public-addr) [ $# -ge 2 ] || usage; ADDR=$2; shift 2 ;;
    --osd-size-gb) [ $# -ge 2 ] || usage; OSD_SIZE_GB=$2; shift 2 ;;
    --purge) PURGE=1; shift ;;
    *) usage ;;
    esac
done
[ -n "$STATE" ] || usage
case "$STATE" in /*) ;; *) STATE=$PWD/$STATE ;; esac

# libceph-common reads CEPH_ARGS, CEPH_CONF and CEPH_KEYRING in every ceph binary, daemons
# included: a client keyring leaking into ceph-mgr makes it fail with "failed to fetch mon config".
unset CEPH_ARGS CEPH_KEYRING CEPH_CONF

CONF=$STATE/ceph.conf
KEYRING=$STATE/ceph.client.admin.keyring
RUN=$STATE/run
LOG=$STATE/log
MNT=$STATE/mnt
T0=$EPOCHREALTIME

say() { printf '[ceph.sh %5.1fs] %s\n' "$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
ceph_() { timeout 60 ceph -c "$CONF" -k "$KEYRING" --connect-timeout 15 "$@"; }

# A pid file counts only if its process exists, is not a zombie and runs with our ceph.conf
# (guards against pid reuse and against the other cluster's daemons).
pid_alive() {
    local pid st
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    st=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$st" ] && [ "$st" != Z ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$CONF"
}

wait_for() { # seconds description command...
    local secs=$1 what=$2
    shift 2
    local end=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$end" ] && die "timeout (${secs}s) waiting for $what (logs: $LOG)"
        sleep 0.3
    done
}

free_port() { # a port nobody listens on now, different from the ones given
    python3 - "$ADDR" "$@" <<'PY'
import socket, sys
addr, taken = sys.argv[1], set(sys.argv[2:])
while True:
    s = socket.socket(); s.bind((addr, 0)); p = s.getsockname()[1]; s.close()
    if str(p) not in taken and not (6800 <= p <= 7300):
        print(p); break
PY
}

# Test-cluster timing, in the monitors' config database (clients built with their own
# settings, like Stowage's librados connections, still fetch it at connect; a healthy cluster
# gets it too, so start stays idempotent). A client killed inside a librbd call keeps its
# watch on the image header until osd_client_watch_timeout (30 s by default): retried calls
# after kill -9 wait that long (removing a half-made image, a fenced NodeStage). 10 s here;
# librados pings its watches every objecter_tick_interval (5 s by default), lowered to 2 s so
# that a live client's watch never misses the shorter timeout.
tunables() {
    ceph_ config set osd osd_client_watch_timeout 10 >/dev/null &&
        ceph_ config set global objecter_tick_interval 2 >/dev/null
}

osd_up() { ceph_ osd stat -f json 2>/dev/null | grep -q '"num_up_osds":1'; }
rgw_ok() { curl -fsS -m 3 "http://$ADDR:$RGW_PORT/" >/dev/null 2>&1; }

healthy() {
    [ -f "$STATE/.created" ] || return 1
    pid_alive "$RUN/mon.a.pid" && pid_alive "$RUN/mgr.x.pid" && pid_alive "$RUN/osd.0.pid" || return 1
    if [ "$RGW" = 1 ]; then pid_alive "$RUN/client.rgw.gw.pid" && rgw_ok || return 1; fi
    osd_up
}

write_env() {
    local key
    key=$(ceph-authtool "$KEYRING" -n client.admin -p)
    {
        echo "CEPH_CONF=$CONF"
        echo "CEPH_KEYRING=$KEYRING"
        echo "CEPH_USER=admin"
        echo "CEPH_ADMIN_KEY=$key"
        echo "CEPH_MON_HOST='[v2:$ADDR:$MON_PORT,v1:$ADDR:$MON_PORT_V1]'"
        echo "CEPH_MON_ADDR=$ADDR:$MON_PORT_V1"
        echo "CEPH_PUBLIC_ADDR=$ADDR"
        echo "CEPH_FSID=$(cat "$STATE/fsid")"
        echo "CEPH_RBD_POOL=rbd"
        echo "CEPH_MNT_ROOT=$MNT"
        echo "CEPH_STATE=$STATE"
        if [ "$RGW" = 1 ]; then
            echo "RGW_ENDPOINT=http://$ADDR:$RGW_PORT"
            echo "S3_ENDPOINT=http://$ADDR:$RGW_PORT"
            echo "S3_ACCESS_KEY=$S3_ACCESS_KEY"
            echo "S3_SECRET_KEY=$S3_SECRET_KEY"
            echo "S3_REGION=us-east-1"
            echo "AWS_ENDPOINT_URL=http://$ADDR:$RGW_PORT"
            echo "AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY"
            echo "AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY"
            echo "AWS_DEFAULT_REGION=us-east-1"
        fi
    } >"$STATE/env.tmp"
    mv "$STATE/env.tmp" "$STATE/env"
}

start_daemon() { # name pidfile command...   (daemons fork once they have their mon config)
    local name=$1 pidf=$2 try
    shift 2
    if pid_alive "$pidf"; then return; fi
    for try in 1 2 3; do
        if timeout 60 "$@" 2>>"$LOG/$name.start.err"; then break; fi
        # The daemon's reason is in its own log (stderr is off), e.g. a mon refusing a full disk.
        [ "$try" = 3 ] && { tail -5 "$LOG/$name.start.err" "$LOG/$name.log" >&2 2>/dev/null
            df -h "$STATE" >&2; die "$name did not start (see $LOG)"; }
        sleep 1
    done
    wait_for 20 "$name pid file" pid_alive "$pidf"
    say "$name started (pid $(cat "$pidf"))"
}

# Stops processes named by pid files: SIGTERM, SIGKILL after ~10 s.
stop_pids() {
    local f pid pids=() alive
    for f in "$@"; do
        [ -f "$f" ] || continue
        if pid_alive "$f" || { case "$f" in */extra.*) [ -r "/proc/$(cat "$f" 2>/dev/null)/stat" ] ;; *) false ;; esac; }; then
            pid=$(cat "$f")
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        fi
        rm -f "$f"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    for _ in $(seq 40); do
        alive=0
        for pid in "${pids[@]}"; do
            st=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
            [ -n "$st" ] && [ "$st" != Z ] && alive=1
        done
        [ "$alive" = 0 ] && return 0
        sleep 0.25
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# Test leftovers below $MNT in an order that cannot hang: a FUSE daemon whose cluster is gone
# blocks every access (and the loop device on top of it) forever.
clean_mounts() {
    [ -d "$MNT" ] || return 0
    local loops=() bf m
    for bf in /sys/block/loop*/loop/backing_file; do
        [ -r "$bf" ] || continue
        case "$(cat "$bf" 2>/dev/null)" in "$MNT"/*) loops+=("/dev/$(basename "$(dirname "$(dirname "$bf")")")") ;; esac
    done
    for m in $(awk -v r="$MNT/" 'index($2, r) == 1 && $3 !~ /^fuse/ {print $2}' /proc/self/mounts | sort -r); do
        timeout 30 umount "$m" 2>/dev/null || timeout 10 umount -l "$m" 2>/dev/null || true
    done
    for m in "${loops[@]}"; do timeout 30 losetup -d "$m" 2>/dev/null || true; done
    for m in $(awk -v r="$MNT/" 'index($2, r) == 1 && $3 ~ /^fuse/ {print $2}' /proc/self/mounts | sort -r); do
        timeout 30 fusermount3 -u "$m" 2>/dev/null || timeout 10 umount -l "$m" 2>/dev/null || true
    done
}

do_stop() {
    [ -d "$STATE" ] || return 0
    clean_mounts
    if [ -d "$RUN" ]; then
        shopt -s nullglob
        # Helpers that name our conf (rbd-fuse, rbd-nbd, s3fs started by tests) go first.
        local p pid strays=()
        for p in /proc/[0-9]*; do
            pid=${p#/proc/}
            case "$(cat "$p/comm" 2>/dev/null)" in rbd-fuse | rbd-nbd | s3fs | rbd | rados | ceph) ;; *) continue ;; esac
            if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "$STATE/"; then
                echo "$pid" >"$RUN/extra.$pid.pid"
                strays+=("$RUN/extra.$pid.pid")
            fi
        done
        [ ${#strays[@]} -gt 0 ] && stop_pids "${strays[@]}"
        # radosgw while the OSD is still up (its shutdown otherwise hangs on RADOS ops).
        stop_pids "$RUN"/client.*.pid
        stop_pids "$RUN"/osd.*.pid "$RUN"/mgr.*.pid
        stop_pids "$RUN"/mon.*.pid
        shopt -u nullglob
    fi
    if [ "$PURGE" = 1 ]; then
        if awk -v r="$STATE/" 'index($2, r) == 1 {f=1} END {exit !f}' /proc/self/mounts; then
            die "not purging $STATE: something is still mounted below it"
        fi
        rm -rf --one-file-system "$STATE"
    fi
}

load_ports() {
    # shellcheck disable=SC1091
    [ -f "$STATE/ports" ] && . "$STATE/ports"
    MON_PORT=${MON_PORT:-}
    MON_PORT_V1=${MON_PORT_V1:-}
    RGW_PORT=${RGW_PORT:-}
    # A restart keeps the address the cluster was made with (it is in the monmap).
    [ -f "$STATE/addr" ] && ADDR=$(cat "$STATE/addr")
    return 0
}

make_cluster() {
    say "creating a new cluster in $STATE (mon $ADDR:$MON_PORT)"
    local fsid monkr
    fsid=$(uuidgen)
    echo "$fsid" >"$STATE/fsid"
    uuidgen >"$STATE/osd.0.uuid"
    cat >"$CONF" <<EOF
# generated by tests/infra/ceph.sh
[global]
    fsid = $fsid
    mon host = [v2:$ADDR:$MON_PORT,v1:$ADDR:$MON_PORT_V1]
    public addr = $ADDR
    cluster addr = $ADDR
    auth cluster required = cephx
    auth service required = cephx
    auth client required = cephx
    auth allow insecure global id reclaim = false
    run dir = $RUN
    pid file = $RUN/\$name.pid
    admin socket = $RUN/\$name.asok
    log file = $LOG/\$name.log
    log to stderr = false
    err to stderr = false
    osd pool default size = 1
    osd pool default min size = 1
    mon allow pool size one = true
    osd crush chooseleaf type = 0
    osd pool default pg num = 8
    osd pool default pgp num = 8
    osd pool default pg autoscale mode = off
    mon max pg per osd = 1000
    mon allow pool delete = true
    mon warn on pool no redundancy = false
    mon data avail warn = 2
    mon data avail crit = 1
    mon osd full ratio = .99
    mon osd nearfull ratio = .98
    mon osd backfillfull ratio = .985
    osd failsafe full ratio = .995
    ms bind port min = 6800
    ms bind port max = 7300
    # test cluster: commit map changes every 0.1 s instead of every second
    paxos propose interval = 0.1
    mgr initial modules =
[mon]
    mon data = $STATE/mon.\$id
    mon cluster log file = $LOG/cluster.log
    mon warn on insecure global id reclaim allowed = false
    mon osd reporter subtree level = osd
[mon.a]
    mon addr = [v2:$ADDR:$MON_PORT,v1:$ADDR:$MON_PORT_V1]
[mgr]
    mgr data = $STATE/mgr.\$id
    mgr disabled modules = diskprediction_local
[osd]
    osd data = $STATE/osd.\$id
    osd objectstore = bluestore
    osd class load list = *
    osd class default list = *
    osd memory target = 939524096
    osd scrub load threshold = 2000.0
    bluestore block create = true
    bluestore block size = $((OSD_SIZE_GB * 1024 * 1024 * 1024))
    bluestore block db create = false
    bluestore block wal create = false
    bluestore fsck on mount = false
    bluestore fsck on mkfs = false
    osd op num shards = 2
    osd op num threads per shard = 1
[client]
    keyring = $KEYRING
    log file = $LOG/\$name.\$pid.log
    admin socket = $RUN/\$name.\$pid.asok
[client.rgw.gw]
    keyring = $STATE/rgw.gw/keyring
    log file = $LOG/\$name.log
    admin socket = $RUN/\$name.asok
    rgw data = $STATE/rgw.gw
    rgw frontends = beast endpoint=$ADDR:$RGW_PORT
    rgw dns name = $ADDR
    rgw thread pool size = 32
EOF
    mkdir -p "$STATE/mon.a" "$STATE/mgr.x" "$STATE/osd.0" "$STATE/rgw.gw"
    monkr=$STATE/mon.keyring.tmp
    # Keys are made offline and imported at mon mkfs: no `ceph auth add` round trips later.
    {
        ceph-authtool --create-keyring "$monkr" --gen-key -n mon. --cap mon 'allow *'
        ceph-authtool --create-keyring "$KEYRING" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
        ceph-authtool --create-keyring "$STATE/mgr.x/keyring" --gen-key -n mgr.x \
            --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
        ceph-authtool --create-keyring "$STATE/osd.0/keyring" --gen-key -n osd.0 \
            --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
        ceph-authtool --create-keyring "$STATE/rgw.gw/keyring" --gen-key -n client.rgw.gw \
            --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw'
        for kr in "$KEYRING" "$STATE/mgr.x/keyring" "$STATE/osd.0/keyring" "$STATE/rgw.gw/keyring"; do
            ceph-authtool "$monkr" --import-keyring "$kr"
        done
    } >/dev/null
    chmod 600 "$KEYRING"
    monmaptool --create --fsid "$fsid" \
        --addv a "[v2:$ADDR:$MON_PORT,v1:$ADDR:$MON_PORT_V1]" "$STATE/monmap.tmp" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$STATE/monmap.tmp" --keyring "$monkr"
    rm -f "$STATE/monmap.tmp" "$monkr"
}

start_osd() {
    start_daemon osd.0 "$RUN/osd.0.pid" ceph-osd -c "$CONF" -i 0
    wait_for 90 "osd.0 up" osd_up
}

do_start() {
    mkdir -p "$STATE" "$RUN" "$LOG" "$MNT"
    load_ports
    [ -f "$STATE/rgw" ] && RGW=1
    if [ -f "$STATE/.created" ] && [ -z "$RGW_PORT" ] && [ "$RGW" = 1 ]; then
        RGW_PORT=$(free_port "$MON_PORT" "$MON_PORT_V1")
        echo "RGW_PORT=$RGW_PORT" >>"$STATE/ports"
        sed -i "s|^\(    rgw frontends = beast endpoint=\).*|\1$ADDR:$RGW_PORT|" "$CONF"
    fi
    if healthy; then
        tunables || die "setting the test tunables failed"
        write_env
        say "already running"
        return 0
    fi
    local new=0
    if [ ! -f "$STATE/.created" ]; then
        # A half-made cluster (start killed midway): stop what runs on it and begin again.
        do_stop
        find "$STATE" -mindepth 1 -maxdepth 1 ! -name mnt -exec rm -rf --one-file-system {} +
        mkdir -p "$RUN" "$LOG" "$MNT"
        echo "$ADDR" >"$STATE/addr"
        MON_PORT=$(free_port)
        MON_PORT_V1=$(free_port "$MON_PORT")
        RGW_PORT=$(free_port "$MON_PORT" "$MON_PORT_V1")
        printf 'MON_PORT=%s\nMON_PORT_V1=%s\nRGW_PORT=%s\n' "$MON_PORT" "$MON_PORT_V1" "$RGW_PORT" >"$STATE/ports"
        make_cluster
        new=1
    fi
    [ "$RGW" = 1 ] && touch "$STATE/rgw"
    # A failure from here on leaves daemons of a half-started cluster: stop them.
    trap 'rc=$?; if [ $rc != 0 ]; then say "start failed; stopping what was started"; PURGE=0 do_stop; fi' EXIT

    start_daemon mon.a "$RUN/mon.a.pid" ceph-mon -c "$CONF" -i a
    wait_for 60 "mon quorum" ceph_ mon stat
    tunables || die "setting the test tunables failed"
    if [ "$new" = 1 ]; then
        ceph_ osd set-require-min-compat-client mimic >/dev/null 2>&1 || say "warning: set-require-min-compat-client failed"
    fi
    start_daemon mgr.x "$RUN/mgr.x.pid" ceph-mgr -c "$CONF" -i x
    if [ "$new" = 1 ]; then
        ceph_ osd new "$(cat "$STATE/osd.0.uuid")" 0 >/dev/null
        ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$(cat "$STATE/osd.0.uuid")" >"$LOG/osd.0.mkfs.out" 2>&1 ||
            { tail -5 "$LOG/osd.0.mkfs.out" >&2; die "ceph-osd --mkfs failed"; }
    fi
    start_osd
    if [ "$new" = 1 ]; then
        ceph_ osd pool create rbd 8 8 >/dev/null 2>&1
        timeout 60 rbd -c "$CONF" -k "$KEYRING" pool init rbd
    fi
    if [ "$RGW" = 1 ]; then
        if [ ! -f "$STATE/.rgw-pools" ]; then
            # RGW otherwise makes its pools one by one at start (1-2 s each): all in one client.
            timeout 120 /usr/bin/python3 - "$CONF" "$KEYRING" <<'PY' >&2
import json, sys, rados
c = rados.Rados(conffile=sys.argv[1], conf={"keyring": sys.argv[2]}); c.connect(timeout=30)
for p in [".rgw.root", "default.rgw.log", "default.rgw.control", "default.rgw.meta",
          "default.rgw.buckets.index", "default.rgw.buckets.data", "default.rgw.buckets.non-ec"]:
    for cmd in ({"prefix": "osd pool create", "pool": p, "pg_num": 8, "pgp_num": 8},
                {"prefix": "osd pool application enable", "pool": p, "app": "rgw"}):
        r, out, err = c.mon_command(json.dumps(cmd), b"")
        if r != 0 and r != -17:
            print("rgw pool command failed", cmd, r, err); sys.exit(1)
c.shutdown()
PY
            touch "$STATE/.rgw-pools"
        fi
        start_daemon rgw.gw "$RUN/client.rgw.gw.pid" radosgw -c "$CONF" -n client.rgw.gw
        wait_for 120 "radosgw on $ADDR:$RGW_PORT" rgw_ok
        if ! timeout 60 radosgw-admin -c "$CONF" -k "$KEYRING" user info --uid "$S3_UID" >/dev/null 2>&1; then
            timeout 60 radosgw-admin -c "$CONF" -k "$KEYRING" user create --uid "$S3_UID" \
                --display-name "stowage test user" --access-key "$S3_ACCESS_KEY" \
                --secret-key "$S3_SECRET_KEY" >/dev/null
        fi
    fi
    all_clean() { ceph_ pg stat 2>/dev/null | grep -Eq '^([0-9]+) pgs: \1 active\+clean'; }
    wait_for 90 "all PGs active+clean" all_clean
    touch "$STATE/.created"
    write_env
    trap - EXIT
    say "ready"
}

case "$CMD" in
start)
    do_start
    cat "$STATE/env"
    ;;
stop)
    do_stop
    ;;
status)
    load_ports
    [ -f "$STATE/rgw" ] && RGW=1
    if healthy; then cat "$STATE/env"; else exit 3; fi
    ;;
stop-osd)
    stop_pids "$RUN/osd.0.pid"
    ;;
start-osd)
    load_ports
    start_osd
    ;;
stop-mon)
    stop_pids "$RUN/mon.a.pid"
    ;;
start-mon)
    load_ports
    start_daemon mon.a "$RUN/mon.a.pid" ceph-mon -c "$CONF" -i a
    wait_for 60 "mon quorum" ceph_ mon stat
    # The OSD and mgr reconnect by themselves; wait until the OSD is reported up again.
    wait_for 90 "osd.0 up" osd_up
    ;;
*) usage ;;
esac
