#!/usr/bin/env bash
# Stowage's Docker volume plugin under a real dockerd (Debian docker.io 20.10, private to this
# run: tests/infra/docker.sh). First pass, standalone engine: docker_engine (local backend:
# create/inspect/ls/rm, data across containers, shared mounts, reclaim policies, bad options,
# plugin restart under a running container, the managed-plugin and CSI packages run by Docker)
# and docker_backends (GlusterFS, S3 on Ceph RGW, RBD through rbd-fuse, each against its real
# server). Second pass: the same after `docker swarm init`, plus a Swarm service whose replica
# writes to a volume. Then csi-sanity against `stowage-docker csi` (the Swarm cluster-volume
# endpoint). The plugin-protocol tests that need no daemon (docker_api, docker_csi) run in the
# cargo suite. About 2 minutes once built (Ceph start ~15 s).
# STOWAGE_BENCH=1 also runs the Docker bench (figures only, never pass/fail).
set -uo pipefail
root=${STOWAGE_ROOT:?}
infra=$root/tests/infra
work=$(mktemp -d /tmp/stowage-docker.XXXXXX)
cleanup() {
  "$infra/docker.sh" stop --state "$work/docker" >/dev/null 2>&1
  "$infra/docker.sh" stop --state "$work/docker-cluster" >/dev/null 2>&1
  "$infra/gluster.sh" stop --state "$work/gluster" >/dev/null 2>&1
  "$infra/ceph.sh" stop --state "$work/ceph" --purge >/dev/null 2>&1
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

passed=0; failed=0; rc=0
fail_setup() { echo "$1"; failed=$((failed + 1)); rc=1; }
# Tests of a server that did not start are not run (its start already counts as the failure),
# rather than counted as passed when they find no server.
skips=()

# STOWAGE_DOCKER_ENGINE=current (tests/suites/72-docker-current.sh): the same tests on a current
# engine (Docker 28.5.2, built from the Go module proxy by tests/infra/moby.sh), plus Swarm
# cluster volumes through the CSI plugin package, which Docker 20.10 does not have.
engine=${STOWAGE_DOCKER_ENGINE:-debian}
if [ "$engine" = current ]; then
  if ! engine_dir=$("$infra/moby.sh" 2>"$work/moby.log"); then
    tail -n 20 "$work/moby.log"; echo "Docker engine build failed"; echo "0 passed, 1 failed"; exit 1
  fi
  export DOCKER_ENGINE_DIR=$engine_dir
  # The CSI plugin's root filesystem: the image's packages (cached; ~9 min cold, 85-helm reuses it).
  if ! STOWAGE_PLUGIN_ROOTFS=$("$root/images/build.sh" --rootfs-only 2>"$work/rootfs.log"); then
    tail -n 20 "$work/rootfs.log"; echo "plugin root filesystem build failed"; echo "0 passed, 1 failed"; exit 1
  fi
  export STOWAGE_PLUGIN_ROOTFS
  # The MariaDB image of the stack test (tests/it/docker_cluster/stack.rs; cached, built offline).
  if ! img_dir=$("$infra/images.sh" build mariadb 2>"$work/images.log"); then
    tail -n 20 "$work/images.log"; echo "MariaDB image build failed"; echo "0 passed, 1 failed"; exit 1
  fi
  export STOWAGE_MARIADB_IMAGE=$img_dir/mariadb.tar
fi
if ! "$infra/docker.sh" start --state "$work/docker" >/dev/null; then
  echo "dockerd did not start"; echo "0 passed, 1 failed"; exit 1
fi
echo "engine: $(DOCKER_HOST=unix://$work/docker/docker.sock "${DOCKER_ENGINE_DIR:-/usr/bin}/docker" version --format 'server {{.Server.Version}}, client {{.Client.Version}}')"
set -a
# shellcheck disable=SC1091
. "$work/docker/env"
set +a
export STOWAGE_REQUIRE_DOCKER=1
# The network backends' servers; each one that starts is required by the tests from then on.
if "$infra/gluster.sh" start --state "$work/gluster" >/dev/null; then
  set -a
  # shellcheck disable=SC1091
  . "$work/gluster/env"
  set +a
  export STOWAGE_REQUIRE_GLUSTER=1 STOWAGE_GLUSTER_STATE="$work/gluster"
else
  fail_setup "glusterd did not start"
  skips+=(--skip glusterfs_)
fi
if "$infra/ceph.sh" start --state "$work/ceph" --rgw >/dev/null; then
  set -a
  # shellcheck disable=SC1091
  . "$work/ceph/env"
  set +a
  export STOWAGE_S3_ENDPOINT=$S3_ENDPOINT STOWAGE_S3_ACCESS_KEY=$S3_ACCESS_KEY \
    STOWAGE_S3_SECRET_KEY=$S3_SECRET_KEY STOWAGE_CEPH_ENV=$work/ceph/env \
    STOWAGE_REQUIRE_S3=1 STOWAGE_REQUIRE_RBD=1
else
  fail_setup "ceph (with radosgw) did not start"
  skips+=(--skip s3_ --skip rbd_)
fi

# $1 = what the pass is; the rest goes to every test binary.
run_pass() {
  local what=$1 out p f r t tests=(${RUN_TESTS:-docker_engine docker_backends})
  shift
  for t in "${tests[@]}"; do
    echo "== $t: $what =="
    out=$(mktemp)
    cargo test -p stowage-tests --locked --test "$t" -- "$@" ${skips[@]+"${skips[@]}"} 2>&1 | tee "$out"
    r=${PIPESTATUS[0]}
    p=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
    f=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
    rm -f "$out"
    [ "$r" != 0 ] && [ "$f" = 0 ] && f=1
    [ "$r" != 0 ] && rc=1
    passed=$((passed + p)); failed=$((failed + f))
  done
}

# Standalone engine (the Swarm test needs the swarm; it runs in the second pass).
run_pass "standalone engine" --skip swarm_
if "$infra/docker.sh" swarm-init --state "$work/docker"; then
  STOWAGE_DOCKER_SWARM=1 run_pass "swarm manager"
else
  fail_setup "swarm init failed"
fi

# The Swarm cluster-volume package's endpoint (Docker >= 23 is not on these machines, so
# csi-sanity stands in for Swarm): controller and node on one socket.
# Swarm cluster volumes, on a fresh engine of the same version: the legacy plugins of the
# passes above are gone, and an engine that has seen them asks each one (and waits out its dead
# socket, ~30 s) whenever `docker volume inspect` runs.
if [ "$engine" = current ]; then
  "$infra/docker.sh" stop --state "$work/docker" >/dev/null 2>&1
  if "$infra/docker.sh" start --state "$work/docker-cluster" >/dev/null &&
    "$infra/docker.sh" swarm-init --state "$work/docker-cluster"; then
    set -a
    # shellcheck disable=SC1091
    . "$work/docker-cluster/env"
    set +a
    # Three at a time: the tests mostly wait for Swarm (plugin creates are serialized in the
    # harness), and the MariaDB stack alone takes ~2 min.
    STOWAGE_DOCKER_SWARM=1 STOWAGE_DOCKER_CLUSTER=1 RUN_TESTS=docker_cluster run_pass "swarm cluster volumes" --test-threads 3
  else
    fail_setup "the engine for cluster volumes did not start"
  fi
  "$infra/docker.sh" stop --state "$work/docker-cluster" >/dev/null 2>&1
fi
# (Engine-independent: run once, with Debian's engine.)
if [ "$engine" = current ]; then
  echo "$passed passed, $failed failed"
  exit "$rc"
fi
out=$(mktemp)
bash "$root/tests/sanity/run-docker-csi.sh" 2>&1 | tee "$out"
r=${PIPESTATUS[0]}
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1)
rm -f "$out"
p=$(echo "${line:-0 passed, 1 failed}" | awk '{print $1}'); f=$(echo "${line:-0 passed, 1 failed}" | awk '{print $3}')
[ "$r" != 0 ] && [ "$f" = 0 ] && f=1
[ "$r" != 0 ] && rc=1
passed=$((passed + p)); failed=$((failed + f))

if [ "${STOWAGE_BENCH:-0}" = 1 ]; then
  "${STOWAGE_BIN_DIR:?}/stowage-bench-docker" 10 || echo "(bench failed; not a test)"
fi
echo "$passed passed, $failed failed"
exit "$rc"
