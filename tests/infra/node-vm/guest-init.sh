#!/bin/busybox sh
# /init of the Stowage node VM initramfs (built by tests/infra/node-vm.sh build).
#
# Runs with busybox only. It
#   1. loads virtio/9p/overlay, brings up eth0 (QEMU user net: 10.0.2.15, host = 10.0.2.2),
#   2. mounts the state dir (9p tag nodevm-state) at /.state and reads /.state/guest.conf,
#   3. mounts the host's / (9p tag hostroot, read-only) and puts a tmpfs-backed overlay over
#      it at /newroot, so host binaries and libraries are there at their host paths and the
#      guest can still write anywhere (writes stay in guest RAM),
#   4. mounts proc/sys/dev/run into /newroot, the kernel's modules at /lib/modules/$(uname -r),
#      and every --share (9p tags s0, s1, ..., listed in /.state/shares) read-write at its host
#      path,
#   5. starts the command (/.state/cmd.sh, run by the host's bash inside `chroot /newroot`),
#      output appended to /.state/guest.log,
#   6. serves `node-vm.sh exec` requests from /.state/spool until shutdown is requested, the
#      lifetime runs out, or something fatal happens, then powers off (QEMU runs -no-reboot).
#
# Status files for the host, in /.state/guest/: agent-ready, listening, cmd.pid, cmd.rc,
# fatal, boot-times.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root

/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev

up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "nodevm-init [$(up)] $*" >/dev/console; }
ST=/.state
G=$ST/guest
SP=$ST/spool
fatal() {
    log "FATAL: $*"
    [ -d "$G" ] && echo "$*" >"$G/fatal"
    sync
    sleep 1
    poweroff -f
    sleep 30
}
log "init-start kernel=$(uname -r)"

M9P="trans=virtio,version=9p2000.L,msize=262144"
for m in virtio_pci virtio_net virtio_rng 9pnet_virtio 9p overlay; do
    modprobe -q "$m" || log "modprobe $m failed"
done

# ---------------------------------------------------------------- state dir
mkdir -p $ST
mount -t 9p -o "$M9P,cache=none" nodevm-state $ST || fatal "cannot mount the state dir (9p tag nodevm-state)"
mkdir -p $G $SP
PORT=0 LIFETIME=7200 HOSTNAME=nodevm PRELOAD="" POLL=0.2
# shellcheck disable=SC1091
[ -r $ST/guest.conf ] && . $ST/guest.conf

# ---------------------------------------------------------------- network
hostname "$HOSTNAME"
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 ||
    fatal "network setup failed: $(ip addr 2>&1 | tr '\n' ' ')"

# ---------------------------------------------------------------- host root + overlay
mkdir -p /.host /.rw /newroot
mount -t 9p -o "$M9P,cache=none,ro" hostroot /.host || fatal "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=755 nodevm-rw /.rw && mkdir -p /.rw/upper /.rw/work || fatal "tmpfs for the overlay failed"
mount -t overlay -o lowerdir=/.host,upperdir=/.rw/upper,workdir=/.rw/work nodevm-root /newroot ||
    fatal "overlay over the host root failed: $(dmesg | grep -i overlay | tail -3 | tr '\n' ' ')"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run
mkdir -p $R/run/lock $R/run/mount
# the host's kmod finds this kernel's modules at the usual place (explicit modprobe in the chroot)
KV=$(uname -r)
chroot $R /bin/mkdir -p "/lib/modules/$KV" && mount --bind "/lib/modules/$KV" "$R$(chroot $R /bin/readlink -f "/lib/modules/$KV")" ||
    log "could not bind /lib/modules/$KV into the chroot"
# no kmod on the host: busybox's modprobe/lsmod/... in /usr/local/sbin of the chroot
# (NB: busybox runs its own applet for a bare `chroot $R sh`: always give full paths)
if ! chroot $R /bin/sh -c 'command -v modprobe' >/dev/null 2>&1; then
    mkdir -p $R/usr/local/lib/nodevm $R/usr/local/sbin && cp /bin/busybox $R/usr/local/lib/nodevm/busybox &&
        for a in modprobe lsmod insmod rmmod modinfo depmod; do
            ln -sf ../lib/nodevm/busybox "$R/usr/local/sbin/$a"
        done
fi
# DNS through QEMU's slirp resolver; /etc/resolv.conf may be a symlink into the host's /run
chroot $R /bin/sh -c 'rm -f /etc/resolv.conf; echo "nameserver 10.0.2.3" >/etc/resolv.conf' || true

# ---------------------------------------------------------------- shares (same path as on the host)
if [ -r $ST/shares ]; then
    # "TAG PATH" lines, sorted by the host so that parents come before nested shares
    while read -r tag path; do
        [ -n "$tag" ] || continue
        mkdir -p "$R$path" 2>/dev/null || chroot $R /bin/mkdir -p "$path"
        mount -t 9p -o "$M9P,cache=none" "$tag" "$R$path" || fatal "cannot mount share $tag at $path"
        log "share $tag -> $path"
    done <$ST/shares
fi

# ---------------------------------------------------------------- modules the tests use
for m in $PRELOAD; do modprobe -q "$m" || log "modprobe $m failed"; done
log "init-ready"
echo "init_ready=$(up)" >$G/boot-times

BASEENV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb NODE_VM=1 NODE_VM_PORT=$PORT"

# ---------------------------------------------------------------- the command
CMDPID=""
if [ -s $ST/cmd.sh ]; then
    (
        # setsid: own process group, so shutdown can signal everything the command started
        # shellcheck disable=SC2016
        setsid sh -c 'echo $$ >/.state/guest/cmd.pid; exec chroot /newroot /usr/bin/env -i $0 /bin/bash -c "$(cat /.state/cmd.sh)"' \
            "$BASEENV" </dev/null >>$ST/guest.log 2>&1
        echo $? >$G/cmd.rc
        log "command exited rc=$(cat $G/cmd.rc)"
    ) &
    i=0
    while [ ! -s $G/cmd.pid ] && [ $i -lt 100 ]; do sleep 0.02; i=$((i + 1)); done
    CMDPID=$(cat $G/cmd.pid 2>/dev/null)
    log "command started pid=$CMDPID"
fi

# ---------------------------------------------------------------- exec agent
run_job() { # ID: runs $SP/ID.run in the chroot, bounded by $SP/ID.timeout seconds
    f=$SP/$1
    t=$(cat "$f.timeout" 2>/dev/null)
    case "$t" in '' | *[!0-9]*) t=60 ;; esac
    t0=$(cut -d. -f1 /proc/uptime)
    # shellcheck disable=SC2086
    timeout -s KILL "$t" chroot $R /usr/bin/env -i $BASEENV /bin/bash -c "$(cat "$f.run")" \
        </dev/null >"$f.out" 2>"$f.err"
    rc=$?
    if [ "$rc" = 137 ] && [ $(($(cut -d. -f1 /proc/uptime) - t0)) -ge "$t" ]; then
        echo "node-vm exec: killed after the ${t}s timeout" >>"$f.err"
        rc=124
    fi
    echo "$rc" >"$f.rc.tmp" && mv "$f.rc.tmp" "$f.rc"
}

PORTHEX=$(printf '%04X' "$PORT")
# 0.0.0.0 / :: / 10.0.2.15 (slirp connects to the guest's eth0 address, not to loopback)
listening() {
    awk -v p=":$PORTHEX" '$4 == "0A" && substr($2, length($2) - 4) == p {
            a = substr($2, 1, length($2) - 5)
            if (a ~ /^0+$/ || a == "0F02000A" || a == "0000000000000000FFFF00000F02000A") ok = 1; else lo = 1 }
        END { if (ok) exit 0; if (lo) exit 2; exit 1 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

echo "$(up)" >$G/agent-ready
log "agent ready (poll ${POLL}s, lifetime ${LIFETIME}s)"
warned=0
listen_seen=0
[ "$PORT" = 0 ] && listen_seen=1
reason=""
while :; do
    for f in "$SP"/*.cmd; do
        [ -e "$f" ] || break
        id=${f##*/}
        id=${id%.cmd}
        mv "$f" "$SP/$id.run" 2>/dev/null || continue
        run_job "$id" &
    done
    if [ -e $SP/shutdown ]; then
        reason="shutdown requested"
        break
    fi
    if [ "$listen_seen" = 0 ]; then
        listening
        case $? in
        0)
            listen_seen=1
            echo "$(up)" >$G/listening
            log "port $PORT is listening"
            ;;
        2)
            if [ "$warned" = 0 ]; then
                warned=1
                echo "port $PORT listens on loopback only: QEMU's hostfwd cannot reach it (bind 0.0.0.0)" >>$G/warnings
                log "port $PORT listens on loopback only"
            fi
            ;;
        esac
    fi
    u=$(cut -d. -f1 /proc/uptime)
    if [ "$u" -ge "$LIFETIME" ]; then
        reason="lifetime of ${LIFETIME}s is over"
        break
    fi
    sleep "$POLL"
done

# ---------------------------------------------------------------- shutdown
log "powering off: $reason"
if [ -n "$CMDPID" ] && kill -0 "$CMDPID" 2>/dev/null; then
    kill -TERM -"$CMDPID" 2>/dev/null
    i=0
    while kill -0 "$CMDPID" 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL -"$CMDPID" 2>/dev/null
fi
# drop network mounts (innermost first) so servers see the client go away; never block on them
grep -E '^[^ ]+ [^ ]+ (nfs|nfs4|ceph) ' /proc/mounts | cut -d' ' -f2 | sort -r | while read -r mnt; do
    timeout -s KILL 3 umount -f -l "$mnt" 2>/dev/null
done
timeout -s KILL 5 sync
echo "$(up) $reason" >$G/poweroff 2>/dev/null
umount -l $ST 2>/dev/null
poweroff -f
sleep 30
