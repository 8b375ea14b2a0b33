#!/usr/bin/env bash
# Reproduces every figure of docs/benchmarks/: finds or starts PostgreSQL as
# the launcher does, builds release binaries, runs both benchmarks.
#
#   tests/bench.sh [widget-bench options, e.g. --workers 2 --seconds 15]
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/local/postgres.sh
export SQLX_OFFLINE=true
ensure_postgres widget_bench_admin
export WIDGET_TEST_ADMIN_URL="$ADMIN_URL"
log "building release binaries"
cargo build --release --quiet --workspace --bins
log "store benchmark (writes docs/benchmarks/latest.{json,md} and throughput.svg)"
./target/release/widget-bench --out docs/benchmarks "$@"
log "engine benchmark"
./target/release/engine-bench --workflows 5000 --kills 20
