#!/bin/sh
# PID 1 of the MariaDB test container (image localhost/stowage/mariadb:10.11, Debian's
# mariadb-server). Makes the data directory on first start in $DATADIR (on the claim), then
# runs mysqld in the foreground. Test only: root may connect from anywhere without a password.
# Durability is MariaDB's default and stated anyway: every commit is flushed to the redo log
# (innodb_flush_log_at_trx_commit=1), the doublewrite buffer protects torn pages.
set -eu
DATADIR=${DATADIR:-/data/mysql}
mkdir -p "$DATADIR" /run/mysqld
chown mysql:mysql "$DATADIR" /run/mysqld
if [ ! -d "$DATADIR/mysql" ]; then
  mariadb-install-db --user=mysql --datadir="$DATADIR" --auth-root-authentication-method=normal \
    --skip-test-db >/dev/null
fi
cat > /tmp/init.sql <<SQL
CREATE USER IF NOT EXISTS 'root'@'%';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS stowage;
SQL
exec mysqld --user=mysql --datadir="$DATADIR" --bind-address=0.0.0.0 --port=3306 \
  --socket=/run/mysqld/mysqld.sock --skip-name-resolve --init-file=/tmp/init.sql \
  --innodb-flush-log-at-trx-commit=1 --innodb-doublewrite=1 --innodb-buffer-pool-size=32M \
  --max-connections=20
