#!/bin/sh
# Load generator for the MariaDB kill -9 scenario (tests/suites/81-pods-backends.sh), run in a
# pod of its own (the host has no MariaDB client): inserts rows id=FIRST, FIRST+1, ... into
# stowage.t, one autocommit INSERT each, through one `mariadb` session, and prints `ack N` only
# after the server answered that INSERT (the SELECT after it is sent only then; -n flushes each
# result at once). Stops at the first error: the server went away.
# Usage: mariadb-load.sh HOST FIRST
host=$1 i=$2
while :; do
  echo "INSERT INTO t (id, pad) VALUES ($i, REPEAT('x', 200)); SELECT 'ack $i';"
  i=$((i + 1))
done | mariadb -h "$host" -u root -N -B -n --skip-reconnect --connect-timeout=5 stowage
