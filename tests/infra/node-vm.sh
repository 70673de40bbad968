#!/usr/bin/env bash
# node-vm.sh - the "node VM" test tier: a QEMU guest with a stock Debian kernel (kernel NFS
# client, krbd, nbd, loop, ext4, xfs) that runs a command - normally `stowage-node` - inside a
# chroot of the host's root filesystem, with the command's TCP port forwarded to the host.
#
#   node-vm.sh build
#   node-vm.sh start --state DIR [--port PORT] [--share HOSTDIR]... [--env K=V]... [--timeout S]
#                    [--mem MiB] [--smp N] [--lifetime S] [-- CMD ARGS...]
#   node-vm.sh exec  --state DIR [--timeout S] [--cwd DIR] -- CMD ARGS...
#   node-vm.sh stop  --state DIR
#   node-vm.sh status --state DIR
#
# See tests/infra/node-vm/README.md for the design, the limits and the pitfalls.
#
# build   fetches linux-image-6.1.0-N-amd64 (newest N with an apt candidate, or $NODE_VM_KVER,
#         e.g. 6.1.0-56-amd64) with `apt-get download`, extracts it (nothing is installed),
#         extracts vmlinux, runs depmod and builds an initramfs (busybox-static + modules + /init
#         from tests/infra/node-vm/guest-init.sh). Everything lives in
#         ${STOWAGE_CACHE:-$HOME/.cache/stowage}/node-vm; a build whose inputs (kernel version,
#         module list, /init, busybox) are unchanged does nothing.
# start   boots the guest (TCG), waits until CMD listens on PORT inside the guest and the host's
#         127.0.0.1:PORT reaches it (bounded by --timeout, default 120 s), then returns with QEMU
#         running in the background. On success it prints NODE_VM_* lines (also in $STATE/env).
#         --port 0 picks a free port: CMD gets it as $NODE_VM_PORT and in place of any literal
#         {PORT} in its arguments. Without CMD it waits for the exec agent only.
#         Each --share HOSTDIR is mounted read-write (9p, no caching) at the same path in the guest.
#         --env K=V is exported to CMD and to every exec. --lifetime S (default 7200): the guest
#         powers itself off at S seconds of uptime, so a VM whose stop never came goes away.
# exec    runs CMD (via the host's bash, inside the guest's chroot, as root, stdin /dev/null),
#         prints its stdout/stderr and exits with its exit code; 124 when it ran out of --timeout
#         (default 60 s), 255 when the guest is not there.
# stop    asks the guest to power off (kills CMD, drops NFS mounts), SIGTERM/SIGKILL to QEMU
#         after a bounded wait; ok when nothing is running.
#
# Env: NODE_VM_KVER (pin a kernel), NODE_VM_ACCEL=tcg|kvm (default tcg: /dev/kvm on these
# machines is PVM and a stock kernel dies there), NODE_VM_MEM (MiB, 1024), NODE_VM_SMP (1),
# NODE_VM_POLL (seconds between the guest agent's looks at the exec spool, default 0.2).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_INIT=$HERE/node-vm/guest-init.sh
CACHE=${STOWAGE_CACHE:-$HOME/.cache/stowage}/node-vm
BUILD_FORMAT=1
# modules put into the initramfs (with their dependencies); missing ones are reported
MODULES="virtio_pci virtio_net virtio_blk virtio_scsi virtio_console virtio_rng virtio_balloon
         9p 9pnet_virtio overlay loop fuse
         nfs nfsv3 nfsv4 sunrpc lockd rbd libceph ceph nbd ext4 xfs
         crc32c_generic crc32c-intel libcrc32c"
# loaded at boot (the rest is loaded on demand: kernel autoload or modprobe in the guest)
PRELOAD="nfs nfsv3 nfsv4 loop"

log() { echo "node-vm: $*" >&2; }
die() {
    log "$*"
    exit 1
}
usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
arg() { [ $# -ge 2 ] || die "$1 needs a value"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# ------------------------------------------------------------------------------- host tools
need() { # "cmd:package" ...
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing host packages: ${missing[*]} (apt-get install ${missing[*]})"
}
check_build_tools() {
    need apt-get:apt apt-cache:apt dpkg-deb:dpkg busybox:busybox-static xz:xz-utils gzip:gzip \
        flock:util-linux sha256sum:coreutils awk:mawk
    # the initramfs has no libc: busybox must be the static one
    if ldd "$(command -v busybox)" >/dev/null 2>&1; then
        die "$(command -v busybox) is dynamically linked (apt-get install busybox-static)"
    fi
}
check_run_tools() {
    need qemu-system-x86_64:qemu-system-x86 busybox:busybox-static
    # run inside the guest from the host's root: mount.nfs for NFS, bash for CMD/exec
    need mount.nfs:nfs-common bash:bash env:coreutils
}

# ------------------------------------------------------------------------------- kernel
# Newest linux-image-6.1.0-N-amd64 that apt can download; else the newest one already cached.
resolve_kver() {
    if [ -n "${NODE_VM_KVER:-}" ]; then
        echo "$NODE_VM_KVER"
        return
    fi
    local p cand
    for p in $(apt-cache pkgnames linux-image-6.1.0- 2>/dev/null | grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -rV); do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ { print $2 }')
        if [ -n "$cand" ] && [ "$cand" != "(none)" ]; then
            echo "${p#linux-image-}"
            return
        fi
    done
    local cached
    cached=$(find "$CACHE/debs" -maxdepth 1 -name 'linux-image-6.1.0-*-amd64_*.deb' 2>/dev/null |
        sed -E 's|.*/linux-image-([^_]+)_.*|\1|' | sort -V | tail -1)
    if [ -n "$cached" ]; then
        log "apt knows no linux-image-6.1.0-*-amd64 (run apt-get update?); using the cached $cached"
        echo "$cached"
        return
    fi
    die "no linux-image-6.1.0-*-amd64 in apt (run apt-get update first; Debian bookworm sources needed)"
}

kernel_deb() { # KVER -> path of the cached .deb (downloads it when missing)
    local kver=$1 deb
    mkdir -p "$CACHE/debs"
    deb=$(find "$CACHE/debs" -maxdepth 1 -name "linux-image-${kver}_*.deb" | sort -V | tail -1)
    if [ -z "$deb" ]; then
        log "downloading linux-image-$kver"
        (cd "$CACHE/debs" && apt-get download -q "linux-image-$kver" >&2) ||
            die "apt-get download linux-image-$kver failed"
        deb=$(find "$CACHE/debs" -maxdepth 1 -name "linux-image-${kver}_*.deb" | sort -V | tail -1)
        [ -n "$deb" ] || die "apt-get download left no linux-image-${kver}_*.deb in $CACHE/debs"
    fi
    echo "$deb"
}

# bzImage -> ELF vmlinux. QEMU boots the ELF through its PVH note straight into 64-bit code:
# no real-mode setup and no in-guest decompression, ~2.8 s less per boot under TCG.
extract_vmlinux() { # IN OUT
    local in=$1 out=$2 tmp pos magic cmd
    tmp=$(mktemp "$out.XXXXXX")
    for magic in '\xFD7zXZ\x00:xz -dc' '\x28\xb5\x2f\xfd:zstd -dc' '\x1f\x8b\x08:gzip -dc' '\x02\x21\x4C\x18:lz4 -dc'; do
        cmd=${magic#*:}
        command -v "${cmd%% *}" >/dev/null 2>&1 || continue
        for pos in $(LC_ALL=C grep -obUaP "${magic%%:*}" "$in" | cut -d: -f1); do
            tail -c+$((pos + 1)) "$in" | $cmd >"$tmp" 2>/dev/null || true
            if [ "$(head -c4 "$tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
                mv "$tmp" "$out"
                return 0
            fi
        done
    done
    rm -f "$tmp"
    return 1
}

kmod_depmod() { # path of kmod's depmod, if the host has it
    local d
    for d in /usr/sbin/depmod /sbin/depmod; do
        if [ -x "$d" ] && [ "$(readlink -f "$d")" != "$(readlink -f "$(command -v busybox)")" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

inputs_hash() { # KVER
    {
        echo "format=$BUILD_FORMAT kver=$1 kmod=$(kmod_depmod || echo none)"
        echo "modules=$(echo $MODULES)"
        sha256sum <"$GUEST_INIT"
        sha256sum <"$(command -v busybox)"
    } | sha256sum | cut -c1-16
}

# Builds $CACHE/out-KVER/{vmlinux,initrd.img,inputs} unless they are up to date.
ensure_initrd() { # KVER
    local kver=$1 out=$CACHE/out-$1 hash
    hash=$(inputs_hash "$kver")
    if [ -s "$out/vmlinux" ] && [ -s "$out/initrd.img" ] && [ "$(cat "$out/inputs" 2>/dev/null)" = "$hash" ]; then
        return 0
    fi
    local t0=$EPOCHREALTIME deb work kroot moddir root
    deb=$(kernel_deb "$kver")
    work=$(mktemp -d "$CACHE/build.XXXXXX")
    BUILD_WORK=$work
    trap 'rm -rf "$BUILD_WORK"' EXIT
    kroot=$work/kernel
    root=$work/root
    mkdir -p "$kroot"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kroot" --wildcards './boot/vmlinuz-*' './lib/modules/*' ||
        die "cannot extract $deb"
    moddir=$kroot/lib/modules/$kver
    [ -d "$moddir" ] || die "$deb has no lib/modules/$kver"
    [ -s "$moddir/modules.dep" ] || busybox depmod -b "$kroot" "$kver" # the .deb ships no modules.dep

    # --- tree: busybox + applet links, /init, modules
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,newroot,lib/modules}
    cp "$(command -v busybox)" "$root/bin/busybox"
    local a
    for a in $(busybox --list-full); do
        [ -e "$root/$a" ] || [ -L "$root/$a" ] || ln -s /bin/busybox "$root/$a"
    done
    install -m 0755 "$GUEST_INIT" "$root/init"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"

    declare -A seen=()
    add_mod() { # path relative to moddir
        [ -n "${seen[$1]:-}" ] && return
        seen[$1]=1
        mkdir -p "$root/lib/modules/$kver/$(dirname "$1")"
        cp "$moddir/$1" "$root/lib/modules/$kver/$1"
        local d
        for d in $(awk -v m="$1:" '$1 == m { $1 = ""; print }' "$moddir/modules.dep"); do add_mod "$d"; done
    }
    local m n p missing=""
    for m in $MODULES; do
        n=${m//-/_}
        p=$(awk -F: -v n="$n" '{ b = $1; sub(/.*\//, "", b); sub(/\.ko.*/, "", b); gsub(/-/, "_", b); if (b == n) { print $1; exit } }' "$moddir/modules.dep")
        if [ -n "$p" ]; then
            add_mod "$p"
        elif ! grep -qE "/${n//_/[-_]}\.ko" "$moddir/modules.builtin"; then
            missing="$missing $m"
        fi
    done
    [ -z "$missing" ] || log "WARNING: not in $kver:$missing"
    cp "$moddir"/modules.builtin* "$moddir"/modules.order "$root/lib/modules/$kver/"
    # kmod's modprobe (the host's, used in the guest's chroot) reads only the binary indexes,
    # which only kmod's depmod writes; busybox's modprobe reads the text modules.dep of either
    if kmod_depmod >/dev/null; then
        "$(kmod_depmod)" -b "$root" "$kver" || die "depmod failed"
    else
        busybox depmod -b "$root" "$kver"
    fi

    # --- pack (into a temp dir, then swap: a running VM has its copy in memory already)
    local new=$work/out
    mkdir -p "$new"
    extract_vmlinux "$kroot/boot/vmlinuz-$kver" "$new/vmlinux" || die "no vmlinux payload in vmlinuz-$kver"
    chmod 0644 "$new/vmlinux"
    if command -v cpio >/dev/null 2>&1; then
        (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --reproducible --quiet) | gzip -6 >"$new/initrd.img"
    else
        (cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc) | gzip -6 >"$new/initrd.img"
    fi
    echo "$hash" >"$new/inputs"
    echo "$kver" >"$new/kver"
    rm -rf "$out.old"
    [ -d "$out" ] && mv "$out" "$out.old"
    mv "$new" "$out"
    rm -rf "$out.old" "$work"
    trap - EXIT
    log "built $out: ${#seen[@]} modules, initrd $(du -h "$out/initrd.img" | cut -f1), vmlinux $(du -h "$out/vmlinux" | cut -f1), $(elapsed "$t0") s"
}

do_build() {
    check_build_tools
    mkdir -p "$CACHE"
    local kver
    exec 8>"$CACHE/build.lock"
    flock -w 900 8 || die "another build holds $CACHE/build.lock"
    kver=$(resolve_kver)
    ensure_initrd "$kver"
    echo "$kver" >"$CACHE/current"
    # keep one kernel: drop other versions' debs and outputs
    find "$CACHE/debs" -maxdepth 1 -name 'linux-image-*.deb' ! -name "linux-image-${kver}_*" -delete 2>/dev/null || true
    find "$CACHE" -maxdepth 1 -name 'out-*' ! -name "out-$kver" -exec rm -rf {} + 2>/dev/null || true
    exec 8>&-
    echo "$CACHE/out-$kver"
}

# The build start uses: the pinned or last built kernel; a full build only when there is none.
ensure_built() {
    local kver=${NODE_VM_KVER:-}
    [ -n "$kver" ] || kver=$(cat "$CACHE/current" 2>/dev/null || true)
    if [ -z "$kver" ]; then
        do_build >/dev/null
        kver=$(cat "$CACHE/current")
    else
        check_build_tools
        mkdir -p "$CACHE"
        exec 8>"$CACHE/build.lock"
        flock -w 900 8 || die "another build holds $CACHE/build.lock"
        ensure_initrd "$kver"
        exec 8>&-
    fi
    OUT=$CACHE/out-$kver
}

# ------------------------------------------------------------------------------- VM helpers
STATE=""
abs_state() {
    [ -n "$STATE" ] || die "--state DIR is required"
    case "$STATE" in /*) ;; *) STATE=$PWD/$STATE ;; esac
}
# pid of this state dir's QEMU if it is alive (not a zombie, and really ours)
qemu_pid() {
    local pid
    pid=$(cat "$STATE/qemu.pid" 2>/dev/null || true)
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "-pidfile $STATE/qemu.pid" || return 1
    echo "$pid"
}
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        local p
        for _ in $(seq 1 50); do
            p=$((20000 + RANDOM % 40000))
            (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || {
                echo "$p"
                return
            }
        done
        die "no free port found"
    fi
}
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
tail_logs() {
    local f
    for f in qemu.log console.log guest.log guest/warnings guest/fatal; do
        [ -s "$STATE/$f" ] || continue
        echo "---- $STATE/$f (tail)" >&2
        tail -n 25 "$STATE/$f" >&2
    done
}
kill_qemu() { # bounded: grace for a guest-side poweroff, then SIGTERM, then SIGKILL
    local pid grace=${1:-8} i spid
    # a QEMU that is still starting up may not have written its pid file yet
    spid=$(cat "$STATE/supervisor.pid" 2>/dev/null || true)
    for ((i = 0; i < 100; i++)); do
        if qemu_pid >/dev/null || [ -e "$STATE/qemu.exit" ] || [ -z "$spid" ] || ! kill -0 "$spid" 2>/dev/null; then break; fi
        sleep 0.05
    done
    pid=$(qemu_pid) || return 0
    for ((i = 0; i < grace * 10; i++)); do
        qemu_pid >/dev/null || break
        sleep 0.1
    done
    if qemu_pid >/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            qemu_pid >/dev/null || break
            sleep 0.1
        done
    fi
    if qemu_pid >/dev/null; then
        log "QEMU $pid ignored SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            qemu_pid >/dev/null || break
            sleep 0.1
        done
        ! qemu_pid >/dev/null || die "QEMU $pid does not go away"
    fi
    # dead; its supervisor reaps it at once (give that a moment, so no zombie is left)
    for ((i = 0; i < 40; i++)); do
        [ -e "/proc/$pid" ] || break
        sleep 0.05
    done
}

# ------------------------------------------------------------------------------- start
do_start() {
    local port="" timeout=120 mem=${NODE_VM_MEM:-1024} smp=${NODE_VM_SMP:-1} lifetime=7200
    local shares=() envs=() cmd=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --state) arg "$@"; STATE=$2; shift 2 ;;
        --port) arg "$@"; port=$2; shift 2 ;;
        --share) arg "$@"; shares+=("$2"); shift 2 ;;
        --env) arg "$@"; envs+=("$2"); shift 2 ;;
        --timeout) arg "$@"; timeout=$2; shift 2 ;;
        --mem) arg "$@"; mem=$2; shift 2 ;;
        --smp) arg "$@"; smp=$2; shift 2 ;;
        --lifetime) arg "$@"; lifetime=$2; shift 2 ;;
        --) shift; cmd=("$@"); break ;;
        *) usage ;;
        esac
    done
    abs_state
    [ ${#cmd[@]} -eq 0 ] || [ -n "$port" ] || die "--port PORT (or 0) is required with a command"
    [ -z "$port" ] || [[ "$port" =~ ^[0-9]+$ ]] || die "bad --port $port"
    local n
    for n in "$timeout" "$mem" "$smp" "$lifetime"; do [[ "$n" =~ ^[0-9]+$ ]] || die "not a number: $n"; done
    check_run_tools
    mkdir -p "$STATE"
    local pid
    if pid=$(qemu_pid); then die "a node VM is already running for $STATE (pid $pid); stop it first"; fi
    ensure_built

    # --- state dir (shared with the guest as 9p tag nodevm-state)
    rm -rf "$STATE/spool" "$STATE/guest"
    rm -f "$STATE"/{qemu.pid,qemu.exit,qemu.log,console.log,guest.log,guest.conf,shares,cmd.sh,env.sh,env}
    mkdir -p "$STATE/spool" "$STATE/guest"
    local e
    : >"$STATE/env.sh"
    for e in "${envs[@]}"; do
        [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env $e (want NAME=VALUE)"
        printf 'export %s=%q\n' "${e%%=*}" "${e#*=}" >>"$STATE/env.sh"
    done
    local virtfs=() i=0 s sp
    for s in "${shares[@]}"; do
        [ -d "$s" ] || die "--share $s: not a directory"
        sp=$(realpath "$s")
        case "$sp" in / | /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) die "--share $sp is not allowed" ;; esac
        [[ "$sp" != *$'\n'* ]] || die "--share: no newlines in paths, please"
        printf '%s s%d %s\n' "${#sp}" "$i" "$sp" >>"$STATE/shares.unsorted"
        virtfs+=(-virtfs "local,path=${sp//,/,,},mount_tag=s$i,security_model=none,multidevs=remap")
        i=$((i + 1))
    done
    if [ -e "$STATE/shares.unsorted" ]; then # parents before nested shares
        sort -n "$STATE/shares.unsorted" | cut -d' ' -f2- >"$STATE/shares"
        rm -f "$STATE/shares.unsorted"
    fi
    local accel
    case "${NODE_VM_ACCEL:-tcg}" in
    tcg) accel=(-accel tcg,thread=multi -cpu max) ;;
    kvm) accel=(-accel kvm -cpu host) ;;
    *) die "NODE_VM_ACCEL must be tcg or kvm" ;;
    esac

    local auto_port=0 attempt rc t0 what
    [ "$port" != 0 ] || auto_port=1
    if [ ${#cmd[@]} -gt 0 ]; then what="the command's port"; else what="the exec agent"; fi
    for attempt in 1 2 3; do
        [ "$auto_port" = 0 ] || port=$(free_port)
        write_port_files "$port" "$lifetime" "${cmd[@]}"
        local vmname uuid
        vmname=nodevm-$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
        uuid=$(cat /proc/sys/kernel/random/uuid)
        sed -i "s/^HOSTNAME=.*/HOSTNAME=$vmname/" "$STATE/guest.conf"
        QEMU=(qemu-system-x86_64 -name "$vmname" "${accel[@]}" -M q35 -m "$mem" -smp "$smp"
            -nodefaults -no-user-config -display none -no-reboot
            -serial "file:$STATE/console.log"
            -kernel "$OUT/vmlinux" -initrd "$OUT/initrd.img"
            -append "console=ttyS0 quiet loglevel=4 panic=-1 nfs.nfs4_unique_id=$uuid"
            -netdev "user,id=n0${port:+,hostfwd=tcp:127.0.0.1:$port-:$port}" -device virtio-net-pci,netdev=n0,romfile=
            -device virtio-rng-pci
            -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
            -virtfs "local,path=${STATE//,/,,},mount_tag=nodevm-state,security_model=none,multidevs=remap"
            "${virtfs[@]}"
            -pidfile "$STATE/qemu.pid")
        printf '%q ' "${QEMU[@]}" >"$STATE/qemu.cmdline"
        echo >>"$STATE/qemu.cmdline"
        t0=$EPOCHREALTIME
        rc=0
        boot_and_wait "$timeout" "${#cmd[@]}" || rc=$?
        [ "$rc" = 0 ] && break
        tail_logs
        kill_qemu 0 || true
        if [ "$rc" = 2 ] && [ "$auto_port" = 1 ] && [ "$attempt" -lt 3 ]; then
            log "port $port was taken meanwhile; retrying with another free port"
            continue
        fi
        exit 1
    done

    local ready_s rss
    pid=$(qemu_pid)
    ready_s=$(elapsed "$t0")
    rss=$(awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$pid/status" 2>/dev/null || echo "?")
    {
        echo "NODE_VM_STATE=$STATE"
        echo "NODE_VM_PID=$pid"
        echo "NODE_VM_PORT=${port:-}"
        echo "NODE_VM_ENDPOINT=${port:+tcp://127.0.0.1:$port}"
        echo "NODE_VM_READY_SECONDS=$ready_s"
    } >"$STATE/env"
    log "ready after ${ready_s}s ($what; guest init-ready at $(sed -n 's/init_ready=//p' "$STATE/guest/boot-times") s uptime), QEMU pid $pid, RSS ${rss} MiB"
    cat "$STATE/env"
}

# guest.conf and cmd.sh depend on the port ({PORT} in CMD is replaced by it)
write_port_files() { # PORT LIFETIME CMD...
    local port=$1 lifetime=$2
    shift 2
    cat >"$STATE/guest.conf" <<EOC
PORT=${port:-0}
LIFETIME=$lifetime
HOSTNAME=nodevm
PRELOAD="$PRELOAD"
POLL=${NODE_VM_POLL:-0.2}
EOC
    rm -f "$STATE/cmd.sh"
    [ $# -gt 0 ] || return 0
    local a line=""
    for a in "$@"; do line+="$(printf '%q' "${a//\{PORT\}/$port}") "; done
    {
        cat "$STATE/env.sh"
        echo "cd / && exec $line"
    } >"$STATE/cmd.sh"
}

# Launches "${QEMU[@]}" under a small bash supervisor that reaps it the moment it exits (the
# init of these machines reaps orphans only every second or so, and a zombie QEMU looks like a
# leftover) and records its exit code in $STATE/qemu.exit. Then waits, bounded, until the guest
# is ready. Returns 0 ready, 1 failure, 2 QEMU could not set up the port forwarding.
boot_and_wait() { # TIMEOUT NCMD
    local timeout=$1 ncmd=$2 deadline
    rm -f "$STATE/qemu.pid" "$STATE/qemu.exit" "$STATE/guest"/*
    # stdio away from the caller's pipes; no inherited lock fds (the build lock is closed)
    setsid bash -c 'cd / && "${@:2}"; echo $? >"$1"' nodevm-supervisor "$STATE/qemu.exit" "${QEMU[@]}" \
        </dev/null >>"$STATE/qemu.log" 2>&1 &
    echo $! >"$STATE/supervisor.pid"
    deadline=$(awk -v a="$EPOCHREALTIME" -v t="$timeout" 'BEGIN { printf "%d", a + t }')
    while :; do
        if [ -e "$STATE/qemu.exit" ]; then
            if grep -qiE 'hostfwd|host forwarding' "$STATE/qemu.log" 2>/dev/null; then return 2; fi
            log "QEMU exited (rc $(cat "$STATE/qemu.exit")) during boot"
            return 1
        fi
        if qemu_pid >/dev/null; then
            if [ -s "$STATE/guest/fatal" ]; then
                log "guest init failed: $(cat "$STATE/guest/fatal")"
                return 1
            fi
            if [ "$ncmd" -gt 0 ]; then
                if [ -e "$STATE/guest/cmd.rc" ]; then
                    log "the command exited (rc $(cat "$STATE/guest/cmd.rc")) before its port was ready"
                    return 1
                fi
                # the host side of a hostfwd accepts connections even when nothing listens in
                # the guest: the guest reports LISTEN first, then the host checks the path
                if [ -e "$STATE/guest/listening" ] && tcp_open "$port"; then return 0; fi
                if [ -s "$STATE/guest/warnings" ]; then
                    log "$(cat "$STATE/guest/warnings")"
                    return 1
                fi
            else
                [ ! -e "$STATE/guest/agent-ready" ] || return 0
            fi
        fi
        if [ "${EPOCHREALTIME%.*}" -ge "$deadline" ]; then
            log "not ready after ${timeout}s"
            return 1
        fi
        sleep 0.1
    done
}

# ------------------------------------------------------------------------------- exec
do_exec() {
    local timeout=60 cwd=/ cmd=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --state) arg "$@"; STATE=$2; shift 2 ;;
        --timeout) arg "$@"; timeout=$2; shift 2 ;;
        --cwd) arg "$@"; cwd=$2; shift 2 ;;
        --) shift; cmd=("$@"); break ;;
        *) usage ;;
        esac
    done
    abs_state
    [ ${#cmd[@]} -gt 0 ] || usage
    [[ "$timeout" =~ ^[0-9]+$ ]] || die "bad --timeout $timeout"
    if ! qemu_pid >/dev/null; then
        log "no node VM running for $STATE"
        exit 255
    fi
    [ -e "$STATE/guest/agent-ready" ] || {
        log "the guest's exec agent is not ready"
        exit 255
    }
    local id sp=$STATE/spool line=""
    id=$(date +%s%N)-$$-$RANDOM
    local a
    for a in "${cmd[@]}"; do line+="$(printf '%q' "$a") "; done
    echo "$timeout" >"$sp/$id.timeout"
    {
        cat "$STATE/env.sh" 2>/dev/null || true
        printf 'cd %q || exit 125\n' "$cwd"
        echo "$line"
    } >"$sp/$id.tmp"
    mv "$sp/$id.tmp" "$sp/$id.cmd"
    local deadline=$((${EPOCHREALTIME%.*} + timeout + 15)) n=0
    while [ ! -e "$sp/$id.rc" ]; do
        if [ "${EPOCHREALTIME%.*}" -ge "$deadline" ] || { [ $((++n % 20)) = 0 ] && ! qemu_pid >/dev/null; }; then
            rm -f "$sp/$id.cmd" "$sp/$id.timeout" # not picked up: withdraw it
            if qemu_pid >/dev/null; then
                log "exec timed out after ${timeout}s: ${cmd[*]}"
                exit 124
            fi
            log "the node VM went away during exec"
            exit 255
        fi
        sleep 0.05
    done
    local rc
    rc=$(cat "$sp/$id.rc")
    cat "$sp/$id.out" 2>/dev/null || true
    cat "$sp/$id.err" >&2 2>/dev/null || true
    rm -f "$sp/$id".*
    exit "${rc:-255}"
}

# ------------------------------------------------------------------------------- stop / status
do_stop() {
    while [ $# -gt 0 ]; do
        case "$1" in
        --state) arg "$@"; STATE=$2; shift 2 ;;
        *) usage ;;
        esac
    done
    abs_state
    local pid t0=$EPOCHREALTIME
    if ! pid=$(qemu_pid); then
        rm -f "$STATE/qemu.pid"
        log "not running ($STATE)"
        return 0
    fi
    [ -d "$STATE/spool" ] && touch "$STATE/spool/shutdown"
    kill_qemu 8
    rm -f "$STATE/qemu.pid" "$STATE/env"
    log "stopped QEMU $pid in $(elapsed "$t0") s"
}

do_status() {
    while [ $# -gt 0 ]; do
        case "$1" in
        --state) arg "$@"; STATE=$2; shift 2 ;;
        *) usage ;;
        esac
    done
    abs_state
    local pid
    if ! pid=$(qemu_pid); then
        echo "not running ($STATE)"
        return 3
    fi
    echo "running: QEMU pid $pid, RSS $(awk '/VmRSS/ { printf "%d MiB", $2 / 1024 }' "/proc/$pid/status"), peak $(awk '/VmHWM/ { printf "%d MiB", $2 / 1024 }' "/proc/$pid/status")"
    [ ! -e "$STATE/guest/cmd.rc" ] || echo "command exited with rc $(cat "$STATE/guest/cmd.rc")"
    cat "$STATE/env" 2>/dev/null || true
}

[ $# -ge 1 ] || usage
sub=$1
shift
case "$sub" in
build) do_build "$@" ;;
start) do_start "$@" ;;
exec) do_exec "$@" ;;
stop) do_stop "$@" ;;
status) do_status "$@" ;;
-h | --help | help) usage ;;
*) usage ;;
esac
