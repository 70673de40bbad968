#!/usr/bin/env bash
# Runs the S3 benchmark (stowage-bench-s3) against a private Ceph RADOS Gateway.
# Usage: tests/bench/s3.sh [stowage-bench-s3 flags, e.g. --size-mib 256 --files 200 --mounters s3fs,rclone]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/stowage/target}
export PATH=${STOWAGE_CACHE:-$HOME/.cache/stowage}/bin:$PATH
cargo build --quiet --release --workspace --bins
state=$(mktemp -d /tmp/stowage-bench-ceph.XXXXXX)
trap '"$root/tests/infra/ceph.sh" stop --state "$state" --purge >/dev/null 2>&1; rm -rf "$state"' EXIT
"$root/tests/infra/ceph.sh" start --state "$state" --rgw >/dev/null
set -a; . "$state/env"; set +a
export STOWAGE_S3_ENDPOINT=$S3_ENDPOINT STOWAGE_S3_ACCESS_KEY=$S3_ACCESS_KEY STOWAGE_S3_SECRET_KEY=$S3_SECRET_KEY
STOWAGE_BIN_DIR=$CARGO_TARGET_DIR/release "$CARGO_TARGET_DIR/release/stowage-bench-s3" "$@"
