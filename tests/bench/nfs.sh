#!/usr/bin/env bash
# Runs the NFS benchmark (stowage-bench-nfs) against a private nfs-ganesha. Usage: tests/bench/nfs.sh [PAIRS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/stowage/target}
cargo build --quiet --release --workspace --bins
state=$(mktemp -d /tmp/stowage-bench-ganesha.XXXXXX)
trap '"$root/tests/infra/ganesha.sh" stop --state "$state" >/dev/null 2>&1; rm -rf "$state"' EXIT
"$root/tests/infra/ganesha.sh" start --state "$state" >/dev/null
set -a; . "$state/env"; set +a
STOWAGE_BIN_DIR=$CARGO_TARGET_DIR/release "$CARGO_TARGET_DIR/release/stowage-bench-nfs" "${1:-400}"
