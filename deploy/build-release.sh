#!/usr/bin/env bash
# The release build of both binaries from the locked dependencies. The image
# build (deploy/docker/Dockerfile), the launcher (deploy/local/run.sh) and
# CI (tests/run.sh) all run this script, so CI builds what ships.
#
#   deploy/build-release.sh [extra cargo build args, e.g. --quiet]
set -euo pipefail
cd "$(dirname "$0")/.."
# sqlx's macros (ours and apalis-postgres') check their SQL against the
# committed offline data, not a database.
export SQLX_OFFLINE=true
exec cargo build --release --locked --bin widget-api --bin widget-worker "$@"
