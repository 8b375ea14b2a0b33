#!/usr/bin/env bash
# Contract fuzzing: schemathesis (PyPI, pinned) generates requests from the
# API's own OpenAPI document (GET /openapi.json) and sends them to the real
# stack (API with the admin token and demo payments, one worker, a fresh
# database); it fails on any 5xx and on any answer whose status, content
# type or body the document does not describe.
#
#   tests/contract/run.sh            (CONTRACT_EXAMPLES=N per operation, 50)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
source deploy/local/postgres.sh
export SQLX_OFFLINE=true
SCHEMATHESIS_VERSION=4.32.5
VENV="$ROOT/target/contract-venv"
ARTIFACTS="$ROOT/target/contract"
mkdir -p "$ARTIFACTS"

if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  log "installing schemathesis $SCHEMATHESIS_VERSION (PyPI) into target/contract-venv"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
[ -x target/debug/widget-api ] && [ -x target/debug/widget-worker ] \
  || cargo build --quiet --bin widget-api --bin widget-worker

ensure_postgres widget_test_admin
DB_NAME="widget_t_contract_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
psql "$ADMIN_URL" -XqAc "CREATE DATABASE \"$DB_NAME\"" >/dev/null
export DATABASE_URL="$(database_url "$ADMIN_URL" "$DB_NAME")"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$ADMIN_URL" -XqAc "DROP DATABASE IF EXISTS \"$DB_NAME\" WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

TOKEN="contract-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Every route on (demo payments, admin); chaos off (a fuzzed crash would
# kill the worker: its 403 is what is checked); no per-client limits (all
# requests come from here); short waits so a fuzzed checkout answers soon.
export DEMO_PAYMENTS=true CHAOS=false CHECKOUT_RATE=0 MAX_PENDING_CHECKOUTS=0 \
  ADMIN_TOKEN="contract=$TOKEN" EVENT_WAIT=2s PAYMENT_TIMEOUT=2s DISPATCH_INTERVAL=20ms \
  PAYMENT_WEBHOOK_SECRETS="whsec_$(head -c 32 /dev/urandom | base64 -w0)" \
  RUST_LOG=warn
API_ADDR="127.0.0.1:$PORT" target/debug/widget-api >"$ARTIFACTS/api.log" 2>&1 &
PIDS+=($!)
target/debug/widget-worker >"$ARTIFACTS/worker.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 150); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done

log "schemathesis against http://127.0.0.1:$PORT/openapi.json"
"$VENV/bin/st" run "http://127.0.0.1:$PORT/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --header "Authorization: Bearer $TOKEN" \
  --max-examples "${CONTRACT_EXAMPLES:-50}" \
  --request-timeout 10 \
  --seed "${CONTRACT_SEED:-20261204}" \
  --no-color
