#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL (found or started, as
# the launcher does). Each test creates its own database.
#
#   tests/run.sh [extra cargo test args]
#
# Every stage runs even when an earlier one failed; the last line is
# `total: N passed, M failed` over all of them (format, lint, build, each
# Rust test, each chaos check, each browser scenario), and the exit status is
# non-zero when M > 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${CI:-}" = true ]; then
  export INSTALL_POSTGRES=1
  # A clean clone builds once: incremental data would only take disk.
  export CARGO_INCREMENTAL=0
fi
source deploy/local/postgres.sh
# sqlx macros (ours and apalis-postgres') would check their SQL against
# DATABASE_URL at compile time; build from the committed offline data.
export SQLX_OFFLINE=true

ensure_postgres widget_test_admin || { echo "total: 0 passed, 1 failed (no PostgreSQL)"; exit 1; }
export WIDGET_TEST_ADMIN_URL="$ADMIN_URL"
# Databases left by earlier runs.
for db in $(psql "$ADMIN_URL" -XtAqc "SELECT datname FROM pg_database WHERE datname LIKE 'widget_t\_%'"); do
  psql "$ADMIN_URL" -XqAc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
done
mkdir -p target

passed=0
failed=0
stages=()
# One stage's result: its name, passed and failed counts.
record() {
  passed=$((passed + $2))
  failed=$((failed + $3))
  stages+=("$(printf '%-10s %4d passed, %d failed' "$1" "$2" "$3")")
}
# A stage whose output has one line per check: $1 the stage, $2 its exit
# status, $3 its output file, $4 and $5 the patterns of a passed and a
# failed check. A stage that failed before any check counts once.
record_checks() {
  # Not named passed/failed: record adds to those, and bash would find
  # these locals instead.
  local ok ko
  ok=$(grep -c "$4" "$3" || true)
  ko=$(grep -c "$5" "$3" || true)
  if [ "$2" != 0 ] && [ "$ko" = 0 ]; then ko=1; fi
  record "$1" "$ok" "$ko"
}
# A stage that is one check: passes when the command succeeds.
check() {
  local name=$1
  shift
  log "$name"
  if "$@"; then record "$name" 1 0; else record "$name" 0 1; fi
}

check "format" cargo fmt --all -- --check
check "clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
# The tests build what they spawn themselves; building here first makes a
# broken build one clear failure.
check "build" cargo build --workspace --bins --tests --quiet
# The release build that ships (the image build runs the same script).
check "release" deploy/build-release.sh --quiet

log "rust tests"
cargo test --workspace --quiet --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" "$@" 2>&1 | tee target/test-output.txt
test_status=${PIPESTATUS[0]}
tests_passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
tests_failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
# A test binary that did not build or crashed reports no count: one failure.
if [ "$test_status" != 0 ] && [ "$tests_failed" = 0 ]; then tests_failed=1; fi
record "tests" "$tests_passed" "$tests_failed"

# Contract fuzzing: schemathesis from the API's OpenAPI document against
# the real stack; any 5xx or answer the document does not describe fails.
check "contract" bash -c 'tests/contract/run.sh 2>&1 | tee target/contract-output.txt; exit "${PIPESTATUS[0]}"'

# The deployment files (Docker, Kubernetes with KEDA, systemd), checked
# offline: lint, render, schemas, and the rules the three forms share.
log "deploy files"
tests/deploy/run.sh 2>&1 | tee target/deploy-output.txt
record_checks "deploy" "${PIPESTATUS[0]}" target/deploy-output.txt '^\[pass\]' '^\[FAIL\]'

# The short chaos run: about a minute of kills, an API restart and one
# PostgreSQL restart under load, then checks that it did that work and that
# every invariant holds; each check prints [pass] or [FAIL].
log "chaos (short form)"
cargo run --quiet -p widget-tests --bin chaos -- --duration "${CHAOS_DURATION:-60}" --workers 3 \
  --json target/chaos-summary.json 2>&1 | tee target/chaos-output.txt
record_checks "chaos" "${PIPESTATUS[0]}" target/chaos-output.txt '^  \[pass\]' '^  \[FAIL\]'

# The storefront in headless Chromium against the real stack (installs
# Chromium and playwright-core itself under CI=true). SKIP_BROWSER=1 skips it.
if [ "${SKIP_BROWSER:-0}" = 1 ]; then
  log "browser stage skipped (SKIP_BROWSER=1)"
  : >target/browser-output.txt
  browser_status=0
else
  log "browser (tests/browser/run.sh)"
  tests/browser/run.sh 2>&1 | tee target/browser-output.txt
  browser_status=${PIPESTATUS[0]}
fi
record_checks "browser" "$browser_status" target/browser-output.txt '^\[browser\] PASS' '^\[browser\] FAIL'

echo
for stage in "${stages[@]}"; do echo "  $stage"; done
echo "total: $passed passed, $failed failed"
[ "$failed" = 0 ]
