# Sourced by deploy/local/run.sh and tests/run.sh: finds or starts PostgreSQL.
#
#   ensure_postgres DBNAME
#
# Sets ADMIN_URL (a URL to the server's `postgres` database, for creating
# databases) and DATABASE_URL (DBNAME on that server, created if missing):
#   1. DATABASE_URL when given (its server is used as is; its database is
#      created if missing; a server that does not answer is reported);
#   2. else the server on 127.0.0.1:5432 when it answers (user postgres);
#   3. else a private cluster under .local/postgres (git-ignored), started
#      from the installed PostgreSQL binaries on port ${WIDGET_PG_PORT:-54329}.
# A server of this machine (2 and 3) is reached over loopback without TLS
# (sslmode=disable): encryption there protects nothing and, where the server
# offers it, cost a quarter of its throughput in simple statements
# (docs/benchmarks/profile.md). A DATABASE_URL given is used as it is.
# With INSTALL_POSTGRES=1 (tests/run.sh under CI) missing binaries are
# installed with apt-get; otherwise it says what to install.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PRIVATE_PG_DIR="$ROOT/.local/postgres"
PRIVATE_PG_PORT="${WIDGET_PG_PORT:-54329}"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

pg_bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

psql_ok() { psql "$1" -XtAqc 'SELECT 1' >/dev/null 2>&1; }

# The URL of database $2 on the server of URL $1 (its parameters kept).
database_url() { printf '%s' "$1" | sed -E "s#/[^/?]*(\?|\$)#/$2\1#"; }

LOCAL_PARAMS="?sslmode=disable"

install_postgres() {
  if [ "${INSTALL_POSTGRES:-0}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing PostgreSQL from Debian's packages"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "No PostgreSQL server found and no PostgreSQL binaries to start one." >&2
    echo "Install them (Debian/Ubuntu: sudo apt-get install postgresql), or set DATABASE_URL." >&2
    exit 1
  fi
}

start_private_postgres() {
  local bin
  bin=$(pg_bin_dir) || { install_postgres; bin=$(pg_bin_dir) || { echo "PostgreSQL install failed" >&2; exit 1; }; }
  command -v psql >/dev/null 2>&1 || export PATH="$bin:$PATH"
  local as=()
  if [ "$(id -u)" = 0 ]; then
    # initdb refuses to run as root: the cluster belongs to the postgres user.
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    as=(runuser -u postgres --)
  fi
  mkdir -p "$PRIVATE_PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PRIVATE_PG_DIR"
  if [ ! -f "$PRIVATE_PG_DIR/data/PG_VERSION" ]; then
    log "creating a private PostgreSQL cluster in $PRIVATE_PG_DIR"
    "${as[@]}" "$bin/initdb" -D "$PRIVATE_PG_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if ! "${as[@]}" "$bin/pg_ctl" -D "$PRIVATE_PG_DIR/data" status >/dev/null 2>&1; then
    log "starting private PostgreSQL on 127.0.0.1:$PRIVATE_PG_PORT"
    "${as[@]}" "$bin/pg_ctl" -D "$PRIVATE_PG_DIR/data" -l "$PRIVATE_PG_DIR/server.log" -w -t 60 \
      -o "-p $PRIVATE_PG_PORT -k $PRIVATE_PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on" start >/dev/null
  fi
  ADMIN_URL="postgres://postgres@127.0.0.1:$PRIVATE_PG_PORT/postgres$LOCAL_PARAMS"
}

ensure_postgres() {
  local dbname="$1"
  command -v psql >/dev/null 2>&1 || { local bin; bin=$(pg_bin_dir) && export PATH="$bin:$PATH"; }
  if [ -n "${DATABASE_URL:-}" ]; then
    log "using DATABASE_URL"
    ADMIN_URL="$(database_url "$DATABASE_URL" postgres)"
    export DATABASE_URL ADMIN_URL
    psql_ok "$DATABASE_URL" && return 0
    # Its server answers but the database is missing: create it, as for a
    # server found here. Anything else is said now; the processes retry.
    local name
    name=$(printf '%s' "${DATABASE_URL%%\?*}" | sed -E 's#^.*/##')
    if [ -n "$name" ] && psql_ok "$ADMIN_URL" \
      && [ "$(psql "$ADMIN_URL" -XtAqc "SELECT count(*) FROM pg_database WHERE datname = '$name'")" = 0 ]; then
      log "creating database $name"
      psql "$ADMIN_URL" -XqAc "CREATE DATABASE \"$name\"" >/dev/null
      return 0
    fi
    echo "warning: DATABASE_URL does not answer ($(psql "$DATABASE_URL" -XtAqc 'SELECT 1' 2>&1 | head -1)); the processes will retry until it does" >&2
    return 0
  elif command -v psql >/dev/null 2>&1 && psql_ok "postgres://postgres@127.0.0.1:5432/postgres$LOCAL_PARAMS"; then
    log "using the PostgreSQL server on 127.0.0.1:5432"
    ADMIN_URL="postgres://postgres@127.0.0.1:5432/postgres$LOCAL_PARAMS"
  else
    start_private_postgres
  fi
  local i
  for i in $(seq 1 60); do psql_ok "$ADMIN_URL" && break; sleep 0.5; done
  psql_ok "$ADMIN_URL" || { echo "PostgreSQL at $ADMIN_URL does not answer" >&2; exit 1; }
  if [ "$(psql "$ADMIN_URL" -XtAqc "SELECT 1 FROM pg_database WHERE datname = '$dbname'")" != 1 ]; then
    psql "$ADMIN_URL" -XqAc "CREATE DATABASE \"$dbname\"" >/dev/null
  fi
  DATABASE_URL="$(database_url "$ADMIN_URL" "$dbname")"
  export DATABASE_URL ADMIN_URL
}
