#!/bin/sh
# PID 1 of the PostgreSQL test container (image localhost/stowage/postgres:15, Debian's
# postgresql-15). Makes the cluster on first start in $PGDATA (on the claim), then runs
# postgres in the foreground. Test only: trust authentication from anywhere.
set -eu
PGDATA=${PGDATA:-/data/pg}
BIN=/usr/lib/postgresql/15/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"; chmod 700 "$PGDATA"
  setpriv --reuid postgres --regid postgres --init-groups \
    "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-locale -E UTF8 --no-instructions
  {
    echo "listen_addresses = '*'"
    echo "unix_socket_directories = '/tmp'"
    echo "fsync = on"
    echo "synchronous_commit = on"
    echo "shared_buffers = 32MB"
    echo "max_connections = 20"
  } >> "$PGDATA/postgresql.conf"
  echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
fi
exec setpriv --reuid postgres --regid postgres --init-groups "$BIN/postgres" -D "$PGDATA"
