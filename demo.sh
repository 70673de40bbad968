#!/usr/bin/env bash
# Runs Stowage on its embedded default (the local backend): builds the binaries, starts
# stowage-controller and stowage-node, and walks one volume through its life, timing each step.
# Needs root: staging and publishing are real bind mounts.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh mounts volumes and must run as root (try: sudo ./demo.sh)" >&2
  exit 1
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/stowage/target}
cargo build --quiet --workspace --bins
exec "$CARGO_TARGET_DIR/debug/stowage-demo"
