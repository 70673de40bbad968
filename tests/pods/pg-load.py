#!/usr/bin/env python3
"""Load generator for the PostgreSQL kill -9 test (tests/suites/80-pods.sh).

Usage: pg-load.py HOST ACKED_FILE [FIRST_ID]
Inserts rows id=FIRST_ID (default 1), +1, +2,... one autocommit INSERT each through one `psql` session and appends an
id to ACKED_FILE (flushed) only after psql reported the INSERT's commit (an `\\echo ack N` is
only printed once the statement before it completed). Stops at the first error (the server
went away) or on SIGTERM, and prints `acked N attempted M`.
"""
import os, signal, subprocess, sys

host, acked_path = sys.argv[1], sys.argv[2]
first = int(sys.argv[3]) if len(sys.argv) > 3 else 1
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)

p = subprocess.Popen(
    ["psql", "-X", "-q", "-h", host, "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
acked = 0   # count of acknowledged rows
attempted = 0
with open(acked_path, "a") as out:
    n = first - 1
    while not stop:
        n += 1
        try:
            p.stdin.write(f"INSERT INTO t (id, pad) VALUES ({n}, repeat('x', 200));\n\\echo ack {n}\n")
            p.stdin.flush()
        except BrokenPipeError:
            break
        attempted += 1
        line = p.stdout.readline()
        if line.strip() != f"ack {n}":
            break
        out.write(f"{n}\n")
        out.flush()
        os.fsync(out.fileno())
        acked += 1
try:
    p.stdin.close()
except Exception:
    pass
try:
    p.wait(timeout=5)
except subprocess.TimeoutExpired:
    p.kill()
err = p.stderr.read().strip().splitlines()[-1:] if p.stderr else []
print(f"acked {acked} attempted {attempted}" + (f" (psql: {err[0]})" if err else ""))
