#!/usr/bin/env bash
# Makes sure the Redis, PostgreSQL and MariaDB servers the tests talk to are up on 127.0.0.1:
# starts them when installed but stopped, installs them with apt-get when missing.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v ip >/dev/null; then
  echo "services: installing iproute2 (the multi-host tests make network namespaces)" >&2
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi
if ! command -v systemd-analyze >/dev/null; then
  echo "services: installing systemd (the deploy tests check the units with systemd-analyze verify)" >&2
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! redis_up; then
  if ! command -v redis-server >/dev/null; then
    echo "services: installing redis-server" >&2
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  echo "services: starting Redis on 127.0.0.1:6379" >&2
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "services: Redis did not start; see /var/log/redis/ci.log" >&2; exit 1; }
fi

if ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "services: installing postgresql" >&2
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! $SUDO grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    # Tests connect as postgres over TCP without a password, as on the CI machine.
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  echo "services: starting PostgreSQL $version on 127.0.0.1:5432" >&2
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 100); do pg_up && break; sleep 0.1; done
  pg_up || { echo "services: PostgreSQL did not start; see /var/log/postgresql/" >&2; exit 1; }
fi

if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname = 'test'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "create database test"
fi
mariadb_up() { mysqladmin -h 127.0.0.1 -uroot ping >/dev/null 2>&1; }

if ! mariadb_up; then
  if [ ! -x /usr/sbin/mariadbd ]; then
    echo "services: installing mariadb-server" >&2
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null
  fi
  echo "services: starting MariaDB on 127.0.0.1:3306" >&2
  $SUDO mkdir -p /run/mysqld && $SUDO chown mysql:mysql /run/mysqld
  $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql \
    --bind-address=127.0.0.1 --port=3306 --local-infile=1
  for _ in $(seq 300); do mariadb_up && break; sleep 0.1; done
  mariadb_up || { echo "services: MariaDB did not start; see /var/log/mysql/ or journalctl" >&2; exit 1; }
fi
# Tests connect as root over TCP without a password and load with LOAD DATA LOCAL INFILE.
mariadb -h 127.0.0.1 -uroot -e "SET GLOBAL local_infile = 1; CREATE DATABASE IF NOT EXISTS test" >/dev/null

echo "services: Redis, PostgreSQL and MariaDB are up on 127.0.0.1" >&2
