#!/usr/bin/env bash
# Runs the whole store locally: PostgreSQL (found or private), one API and N
# workers, restarting any worker that dies. Ctrl-C stops everything.
#
#   deploy/local/run.sh [--workers N] [--port P] [--no-chaos] [--debug]
#
# --debug runs debug builds (target/debug, as tests/run.sh builds them)
# instead of building release binaries.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/postgres.sh
# sqlx macros (ours and apalis-postgres') would check their SQL against
# DATABASE_URL at compile time; build from the committed offline data.
export SQLX_OFFLINE=true

WORKERS=2
PORT=8080
CHAOS=true
PROFILE=release
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --no-chaos) CHAOS=false; shift ;;
    --debug) PROFILE=debug; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

ensure_postgres "${WIDGET_DB:-widget_store}"
if [ "$PROFILE" = release ]; then
  log "building release binaries (first time takes a few minutes)"
  deploy/build-release.sh --quiet
else
  log "building debug binaries"
  cargo build --quiet --bin widget-api --bin widget-worker
fi
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
export CHAOS
# The storefront page plays the payment provider through the demo's
# unsigned route: on unless DEMO_PAYMENTS=false is set.
export DEMO_PAYMENTS="${DEMO_PAYMENTS:-true}"
# A secret the processes need: the variable $1 when set, else the content
# of .local/$2, made once (owner-only) as printf "$3" of 32 random bytes in
# base64; $4 tells where it is.
keep_secret() {
  local var="$1" file=".local/$2" format="$3" where="$4"
  if [ -z "${!var:-}" ]; then
    mkdir -p .local
    if [ ! -s "$file" ]; then
      (umask 077; printf "$format\n" "$(head -c 32 /dev/urandom | base64 -w0)" > "$file")
    fi
    printf -v "$var" '%s' "$(cat "$file")"
    log "$where"
  fi
  export "${var?}"
}
# Signed provider webhooks, and the admin API and page.
keep_secret PAYMENT_WEBHOOK_SECRETS webhook_secret 'whsec_%s' \
  "signed payment webhooks: the secret is in .local/webhook_secret"
keep_secret ADMIN_TOKEN admin_token 'local=%s' \
  "admin page: http://127.0.0.1:$PORT/admin/ (its token is after 'local=' in .local/admin_token)"

PIDS=()
cleanup() {
  trap - INT TERM EXIT
  log "stopping"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # the supervisors forward TERM to their worker and wait for its drain
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

# The first port from $1 up that nothing listens on.
free_port_from() {
  local port="$1"
  while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
  echo "$port"
}

# Keeps one worker alive: restarts it a second after it dies. Its metrics
# are at 127.0.0.1:$2/metrics.
supervise_worker() {
  local n="$1" metrics_port="$2" child=0
  trap '[ "$child" != 0 ] && kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; exit 0' TERM INT
  while true; do
    WORKER_METRICS_ADDR="127.0.0.1:$metrics_port" "$BIN/widget-worker" &
    child=$!
    wait "$child" && status=0 || status=$?
    log "worker $n exited with status $status; restarting in 1 s"
    sleep 1
  done
}

API_ADDR="127.0.0.1:$PORT" "$BIN/widget-api" &
PIDS+=($!)
METRICS_PORT=$((PORT + 1))
METRICS_PORTS=()
for n in $(seq 1 "$WORKERS"); do
  METRICS_PORT=$(free_port_from "$METRICS_PORT")
  METRICS_PORTS+=("$METRICS_PORT")
  supervise_worker "$n" "$METRICS_PORT" &
  PIDS+=($!)
  METRICS_PORT=$((METRICS_PORT + 1))
done

for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
log "Widget Store is up: http://127.0.0.1:$PORT  ($WORKERS workers, chaos=$CHAOS; Ctrl-C stops)"
log "metrics: http://127.0.0.1:$PORT/metrics (API), workers at 127.0.0.1:{$(IFS=,; echo "${METRICS_PORTS[*]}")}/metrics"
wait "${PIDS[0]}"
