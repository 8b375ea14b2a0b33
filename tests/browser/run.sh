#!/usr/bin/env bash
# The storefront and the admin page in a real browser: starts the real
# stack through the launcher (deploy/local/run.sh: API + 3 supervised
# workers, chaos on, debug builds, an admin token of its own) on a free port
# against a fresh database of its own, then drives the storefront with
# headless Chromium (Debian's /usr/bin/chromium, through playwright-core
# from npm) as a shopper would (storefront.test.mjs), then /admin/ as an
# operator would (admin.test.mjs). Prints one PASS/FAIL line per scenario
# and `browser: N passed, M failed` over both; exits 1 on any failure.
# Screenshots and logs go to tests/artifacts/browser/ (git-ignored).
#
#   tests/browser/run.sh
#
# Under CI=true it installs what it needs (apt-get install chromium; npm ci).
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/postgres.sh
export SQLX_OFFLINE=true

ARTIFACTS="$ROOT/tests/artifacts/browser"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
mkdir -p "$ARTIFACTS"
rm -f "$ARTIFACTS"/*.png

if [ ! -x "$CHROMIUM" ]; then
  if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Chromium from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "No Chromium at $CHROMIUM. Install it (Debian: apt-get install chromium) or set CHROMIUM;" >&2
    echo "under CI=true this script installs it." >&2
    exit 1
  fi
fi
command -v node >/dev/null || { echo "node (v20 or newer) and npm are needed" >&2; exit 1; }
want=$(cd tests/browser && node -p 'require("./package.json").dependencies["playwright-core"]')
have=$(cd tests/browser && node -p 'try { require("./node_modules/playwright-core/package.json").version } catch (_) { "" }')
if [ "$want" != "$have" ]; then
  log "npm ci (tests/browser: playwright-core $want)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

# A fresh database of our own on the server the other tests use. The
# `widget_t_` prefix lets tests/run.sh drop one left by an interrupted run.
ensure_postgres widget_test_admin
DB_NAME="widget_t_browser_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
psql "$ADMIN_URL" -XqAc "CREATE DATABASE \"$DB_NAME\"" >/dev/null
export DATABASE_URL="$(database_url "$ADMIN_URL" "$DB_NAME")"
PORT=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
BASE_URL="http://127.0.0.1:$PORT"

# The admin page's token (`label=token`), for this run only.
ADMIN_SECRET="browser-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

LAUNCHER=0
API_PID=0
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ "$API_PID" != 0 ]; then kill -CONT "$API_PID" 2>/dev/null || true; fi
  if [ "$LAUNCHER" != 0 ] && kill -0 "$LAUNCHER" 2>/dev/null; then
    kill -TERM "$LAUNCHER" 2>/dev/null || true
    # Workers drain for up to 10 s; then whatever is left of the launcher's
    # own process group (it runs in a session of its own) is killed.
    for _ in $(seq 1 100); do kill -0 "$LAUNCHER" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$LAUNCHER" 2>/dev/null || true
  fi
  psql "$ADMIN_URL" -XqAc "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" >/dev/null 2>&1 || true
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting the stack on $BASE_URL (database $DB_NAME); log in $ARTIFACTS/stack.log"
started=$(date +%s)
# Small pools: the server may be shared with other test runs (100
# connections by default), and one shopper needs few.
ADMIN_TOKEN="browser=$ADMIN_SECRET" \
DB_MAX_CONNECTIONS="${DB_MAX_CONNECTIONS:-5}" \
RUST_LOG="${RUST_LOG:-info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_postgres=warn}" \
  setsid deploy/local/run.sh --workers 3 --port "$PORT" --debug >"$ARTIFACTS/stack.log" 2>&1 &
LAUNCHER=$!
deadline=$(( $(date +%s) + 900 ))
until curl -fsS "$BASE_URL/readyz" >/dev/null 2>&1; do
  if ! kill -0 "$LAUNCHER" 2>/dev/null; then
    echo "the launcher exited before the API was ready; see $ARTIFACTS/stack.log" >&2
    tail -20 "$ARTIFACTS/stack.log" >&2
    exit 1
  fi
  [ "$(date +%s)" -lt "$deadline" ] || { echo "API not ready within 900 s" >&2; exit 1; }
  sleep 0.2
done
# The launcher's widget-api child (read from /proc: no procps needed).
for stat in /proc/[0-9]*/stat; do
  read -r pid comm _ ppid _ <"$stat" 2>/dev/null || continue
  if [ "$ppid" = "$LAUNCHER" ] && [ "$comm" = "(widget-api)" ]; then API_PID=$pid; break; fi
done
[ "$API_PID" != 0 ] || { echo "cannot find the launcher's widget-api process" >&2; exit 1; }
log "stack up in $(( $(date +%s) - started )) s (API pid $API_PID)"

# The storefront first (its scenarios stop the API and crash workers), then
# the admin page; both run even when the first fails.
status=0
BASE_URL="$BASE_URL" API_PID="$API_PID" ARTIFACTS="$ARTIFACTS" CHROMIUM="$CHROMIUM" \
  node tests/browser/storefront.test.mjs | tee "$ARTIFACTS/storefront.out" || status=1
BASE_URL="$BASE_URL" ADMIN_TOKEN="$ADMIN_SECRET" ARTIFACTS="$ARTIFACTS" CHROMIUM="$CHROMIUM" \
  node tests/browser/admin.test.mjs | tee "$ARTIFACTS/admin.out" || status=1
passed=$(cat "$ARTIFACTS/storefront.out" "$ARTIFACTS/admin.out" | grep -c '^\[browser\] PASS' || true)
failed=$(cat "$ARTIFACTS/storefront.out" "$ARTIFACTS/admin.out" | grep -c '^\[browser\] FAIL' || true)
echo "browser: $passed passed, $failed failed"
exit "$status"
