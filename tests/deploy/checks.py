"""Runs one deploy check by name (tests/deploy/run.sh calls it): prints
the problems found and exits 1 when there are any."""

import sys

import compose_checks
import file_checks
import k8s_checks

CHECKS = {
    "dockerfile-build": file_checks.dockerfile,
    "k8s-schemas": k8s_checks.schemas,
    "keda-schema": k8s_checks.keda_schema,
    "keda-query": k8s_checks.keda_query,
    "k8s-lifecycle": k8s_checks.lifecycle,
    "k8s-security": k8s_checks.security,
    "k8s-network": k8s_checks.network,
    "compose-schema": compose_checks.schema,
    "compose-matches-k8s": compose_checks.matches_k8s,
    "systemd-units": file_checks.systemd_units,
}


def main(name):
    try:
        problems = CHECKS[name]()
    except Exception as e:  # a file missing or malformed is a failure too
        problems = [f"{type(e).__name__}: {e}"]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
