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
mkdir -p target
cargo test --workspace --quiet -- --test-threads="${TEST_THREADS:-2}" "$@" 2>&1 | tee target/test-output.txt
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
# The short chaos run: about a minute of kills, an API restart and one
# PostgreSQL restart under load; any broken invariant fails the build.
log "chaos (short form)"
cargo run --quiet -p widget-tests --bin chaos -- --duration "${CHAOS_DURATION:-60}" --workers 3 \
  --json target/chaos-summary.json 2>&1 | tee target/chaos-output.txt
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

# The storefront in headless Chromium against the real stack (installs
# Chromium and playwright-core itself under CI=true). SKIP_BROWSER=1 skips it.
browser_status=0
if [ "${SKIP_BROWSER:-0}" = 1 ]; then
  log "browser stage skipped (SKIP_BROWSER=1)"
  : >target/browser-output.txt
else
  log "browser (tests/browser/run.sh)"
  set +e
  tests/browser/run.sh 2>&1 | tee target/browser-output.txt
  browser_status=${PIPESTATUS[0]}
  set -e
fi
browser_passed=$(grep -c '^\[browser\] PASS' target/browser-output.txt || true)
browser_failed=$(grep -c '^\[browser\] FAIL' target/browser-output.txt || true)
# A stage that failed before its scenarios (no Chromium, stack down) counts once.
if [ "$browser_status" != 0 ] && [ "$browser_failed" = 0 ]; then browser_failed=1; fi

passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
invariants=$(grep -c '^  \[pass\]' target/chaos-output.txt || true)
echo "total: $((passed + invariants + browser_passed)) passed, $((failed + browser_failed)) failed"
[ "$browser_status" = 0 ] || exit 1
