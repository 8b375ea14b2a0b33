#!/usr/bin/env bash
# Shows that each check of tests/deploy/run.sh can fail: for each one, a
# copy of the tree with one deployment file broken (never the repository's
# own), which that check must refuse. Prints `[caught] <check>: <breakage>`
# or `[MISSED] ...`; exits non-zero when any breakage got through.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
# What the checks read: the deployment files and the Rust sources of the
# binaries' defaults.
TREE_FILES=(deploy .dockerignore api/src worker/src shared/engine/src/config.rs shared/store/src/db.rs)

# check | file | sed expression (no `|` in it) | breakage
BREAKAGES=(
  "dockerfile-lint|deploy/docker/Dockerfile|s#^USER #RUN apt-get update \&\& apt-get install -y curl\nUSER #|apt-get without pinned versions or cleanup"
  "dockerfile-build|deploy/docker/Dockerfile|s#^CMD .*#CMD widget-api#|CMD in shell form"
  "k8s-render|deploy/k8s/base/kustomization.yaml|s#  - api.yaml#  - missing.yaml#|a missing resource"
  "k8s-schemas|deploy/k8s/base/api.yaml|s#revisionHistoryLimit:#revisionHistoryLimits:#|an unknown Deployment field"
  "keda-schema|deploy/k8s/base/worker-scaledobject.yaml|s#targetQueryValue: \"1\"#targetQueryValue: 1#|a trigger setting that is not a string"
  "keda-schema|deploy/k8s/base/worker-scaledobject.yaml|s#pollingInterval:#pollingIntervals:#|an unknown ScaledObject field"
  "keda-query|deploy/k8s/base/kustomization.yaml|/^replacements:/,\$d|the query no longer copied from keda-backlog.sql"
  "keda-query|deploy/k8s/base/config.env|s#WORKER_CONCURRENCY=32#WORKER_CONCURRENCY=16#|WORKER_CONCURRENCY no longer the query's divisor"
  "k8s-lifecycle|deploy/k8s/base/worker.yaml|s#terminationGracePeriodSeconds: 30#terminationGracePeriodSeconds: 5#|worker killed before its drain ends"
  "k8s-security|deploy/k8s/base/worker.yaml|s#readOnlyRootFilesystem: true#readOnlyRootFilesystem: false#|a writable root filesystem"
  "k8s-network|deploy/k8s/base/network-policy.yaml|s#port: 5432#port: 443#|egress beyond PostgreSQL and DNS"
  "compose-config|deploy/docker/compose.yaml|s#stop_grace_period: 30s#stop_grace_periods: 30s#|an unknown compose key"
  "compose-matches-k8s|deploy/docker/compose.yaml|s#\"widget-api\", \"--migrate-only\"#\"widget-api\"#|compose's migrate service not migrating"
  "systemd-verify|deploy/systemd/widget-api.service|s#KillMode=mixed#KillMode=gentle#|an invalid KillMode"
  "systemd-security|deploy/systemd/widget-.service.d/hardening.conf|/^DynamicUser=/d;/^CapabilityBoundingSet=/d;/^SystemCallFilter=/d|root, all capabilities and syscalls"
  "systemd-units|deploy/systemd/widget-worker@.service|s#TimeoutStopSec=30s#TimeoutStopSec=5s#|worker killed before its drain ends"
)

MISSED=0
for entry in "${BREAKAGES[@]}"; do
  IFS='|' read -r check file expression breakage <<<"$entry"
  copy=$(mktemp -d)
  (cd "$REPO" && cp -r --parents "${TREE_FILES[@]}" "$copy/")
  sed -i -e "$expression" "$copy/$file"
  if cmp -s "$REPO/$file" "$copy/$file"; then
    echo "[MISSED] $check: the breakage ($breakage) did not apply"
    MISSED=$((MISSED + 1))
  else
    # run.sh's exit status is its verdict on both checks; its lines say which.
    report=$(DEPLOY_CHECK_ROOT=$copy DEPLOY_CHECK_OUT=$copy/out tests/deploy/run.sh k8s-render "$check" 2>/dev/null)
    if grep -qx "\[FAIL\] $check" <<<"$report"; then
      reason=$(grep -A1 -x "\[FAIL\] $check" <<<"$report" | sed -n '2s/^ *//p')
      echo "[caught] $check: $breakage (${reason:0:100})"
    else
      echo "[MISSED] $check: $breakage"
      MISSED=$((MISSED + 1))
    fi
  fi
  rm -rf "$copy"
done
[ "$MISSED" = 0 ]
