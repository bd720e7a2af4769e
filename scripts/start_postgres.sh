#!/usr/bin/env bash
# Install (Debian's package, if missing) and start a local PostgreSQL server for the storage tests, then
# print the URL to export as EVOMERGE_TEST_POSTGRES. Needs root (CI and the dev machines run as root).
# Usage: export EVOMERGE_TEST_POSTGRES=$(bash scripts/start_postgres.sh)
set -euo pipefail
DB=${EVOMERGE_PG_DB:-evomerge_test}
PASSWORD=${EVOMERGE_PG_PASSWORD:-evomerge}
if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  echo "start_postgres: installing Debian's postgresql package" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
read -r VERSION CLUSTER PORT STATUS _ < <(pg_lsclusters -h | head -n 1)
if [ "$STATUS" != online ]; then
  pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p "$PORT" && break; sleep 1; done
su postgres -c "psql -q -p $PORT -c \"ALTER USER postgres PASSWORD '$PASSWORD'\"" >&2
if ! su postgres -c "psql -p $PORT -tAc \"SELECT 1 FROM pg_database WHERE datname='$DB'\"" | grep -q 1; then
  su postgres -c "createdb -p $PORT $DB" >&2
fi
echo "postgresql://postgres:$PASSWORD@127.0.0.1:$PORT/$DB"
