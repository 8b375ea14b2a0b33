#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL (found or started, as
# the launcher does). Each test creates its own database.
#
#   tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI:-}" = true ]; then export INSTALL_POSTGRES=1; fi
source deploy/local/postgres.sh
# sqlx macros (ours and apalis-postgres') would check their SQL against
# DATABASE_URL at compile time; build from the committed offline data.
export SQLX_OFFLINE=true

ensure_postgres widget_test_admin
export WIDGET_TEST_ADMIN_URL="$ADMIN_URL"
# Databases left by earlier runs.
for db in $(psql "$ADMIN_URL" -XtAqc "SELECT datname FROM pg_database WHERE datname LIKE 'widget_t\_%'"); do
  psql "$ADMIN_URL" -XqAc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
done

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "building binaries"
cargo build --workspace --bins --quiet
log "running tests"
cargo test --workspace --quiet -- --test-threads="${TEST_THREADS:-2}" "$@"
