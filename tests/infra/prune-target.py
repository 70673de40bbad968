#!/usr/bin/env python3
"""Delete stale executables from a cargo target's deps directory.

Usage: prune-target.py CARGO_JSON_MESSAGES DEPS_DIR

CARGO_JSON_MESSAGES is the stdout of `cargo build --message-format=json...`: every
compiler-artifact message names its executable, fresh or rebuilt. Any other executable file
in DEPS_DIR (no extension, executable bit) is left over from an older build and is removed.
Libraries, .d files and build scripts are never touched, so nothing needs recompiling.
"""
import json
import os
import sys


def main() -> int:
    messages, deps = sys.argv[1], sys.argv[2]
    keep = set()
    with open(messages, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            exe = msg.get("executable") if isinstance(msg, dict) else None
            if exe:
                keep.add(os.path.realpath(exe))
    if not keep:
        # Nothing parsed: better to keep everything than to delete what the suites need.
        print("prune-target: no artifacts listed, nothing removed", file=sys.stderr)
        return 0
    freed = 0
    removed = 0
    for name in os.listdir(deps):
        path = os.path.join(deps, name)
        if "." in name or not os.path.isfile(path) or not os.access(path, os.X_OK):
            continue
        if os.path.realpath(path) in keep:
            continue
        freed += os.path.getsize(path)
        os.remove(path)
        removed += 1
    if removed:
        print(f"prune-target: removed {removed} stale executables ({freed >> 20} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
