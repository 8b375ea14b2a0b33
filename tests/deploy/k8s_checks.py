"""Checks of the rendered Kubernetes objects (deploy/k8s/overlays/example).
Each returns the problems it found; none is a pass."""

import json
import os
import re
import subprocess

import kubernetes_validate

from common import (
    HERE, ROOT, SECRET_KEYS, by_kind, container_env, named, pod_labels,
    pod_spec, port_of, rendered, seconds, setting,
)

# The oldest Kubernetes the manifests promise to fit, and the newest the
# pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
WORKLOAD_KINDS = ("Deployment", "Job")


def workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def schemas():
    """Every object but KEDA's against Kubernetes' own schemas, refusing
    unknown fields."""
    problems = []
    for doc in rendered():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{doc['kind']} {doc['metadata']['name']} ({version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{doc['kind']} {doc['metadata']['name']}: {e.message}")
    return problems


def keda_schema():
    """The ScaledObject against KEDA's CRD schema: the validator npm's
    @kubernetes-models/keda compiles from it (run.sh installs it), driven by
    keda-validate.cjs, which also refuses fields the CRD does not name, as
    the API server's strict field validation does."""
    scaled = by_kind(rendered(), "ScaledObject")
    problems = [] if scaled else ["no ScaledObject rendered"]
    for doc in scaled:
        if doc["apiVersion"] != "keda.sh/v1alpha1":
            problems.append(f"ScaledObject apiVersion {doc['apiVersion']}, not keda.sh/v1alpha1")
    if not os.environ.get("DEPLOY_KEDA_TOOLS"):
        return problems + ["DEPLOY_KEDA_TOOLS is not set (tests/deploy/run.sh sets it)"]
    result = subprocess.run(
        ["node", str(HERE / "keda-validate.cjs")],
        input=json.dumps(scaled), capture_output=True, text=True, check=False,
    )
    problems += result.stdout.splitlines()
    if result.returncode != 0 and not result.stdout.strip():
        problems.append(f"keda-validate.cjs exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return problems


def keda_query():
    """The ScaledObject scales the worker Deployment with keda-backlog.sql,
    word for word, divided by the workers' WORKER_CONCURRENCY, through a
    connection the worker container has from the Secret."""
    docs = rendered()
    problems = []
    sql = (ROOT / "deploy/k8s/base/keda-backlog.sql").read_text()
    scaled = by_kind(docs, "ScaledObject")
    if len(scaled) != 1:
        return [f"expected one ScaledObject, found {len(scaled)}"]
    spec = scaled[0]["spec"]
    target = spec["scaleTargetRef"]
    if target.get("kind", "Deployment") != "Deployment":
        problems.append("scaleTargetRef is not a Deployment")
    worker = named(docs, "Deployment", target["name"])
    containers = pod_spec(worker)["containers"]
    container = next((c for c in containers if c["name"] == target.get("envSourceContainerName")), containers[0])
    if container.get("command", [None])[0] != "widget-worker":
        problems.append(f"the ScaledObject scales {target['name']}, which does not run widget-worker")
    triggers = [t for t in spec["triggers"] if t["type"] == "postgresql"]
    if len(triggers) != 1 or len(spec["triggers"]) != 1:
        return problems + ["expected exactly one trigger, of type postgresql"]
    meta = triggers[0]["metadata"]
    if meta.get("query", "").strip() != sql.strip():
        problems.append("the trigger's query differs from deploy/k8s/base/keda-backlog.sql")
    env = container_env(container, docs)
    if env.get(meta.get("connectionFromEnv"), (None,))[0] != "secret":
        problems.append(f"connectionFromEnv {meta.get('connectionFromEnv')} is not a Secret-backed env var of the worker")
    divisors = re.findall(r"/\s*(\d+)(?:\.0)?\b", sql)
    concurrency = setting(env, "WORKER_CONCURRENCY")
    if divisors != [str(concurrency)]:
        problems.append(f"keda-backlog.sql divides by {divisors}, the workers run WORKER_CONCURRENCY={concurrency}")
    if meta.get("targetQueryValue") != "1":
        problems.append("targetQueryValue must be 1: the query counts workers")
    if spec.get("minReplicaCount", 0) < 1:
        problems.append("minReplicaCount below 1: parked checkouts' wake-ups need a worker")
    if spec.get("maxReplicaCount", 100) < spec.get("minReplicaCount", 0):
        problems.append("maxReplicaCount below minReplicaCount")
    if "replicas" in worker["spec"]:
        problems.append("the worker Deployment sets replicas: every apply would undo KEDA's count")
    if by_kind(docs, "HorizontalPodAutoscaler"):
        problems.append("an HPA besides KEDA's")
    return problems


def probe_path(container, probe):
    return container.get(probe, {}).get("httpGet", {}).get("path")


def lifecycle():
    """Probes, shutdown times and who migrates."""
    docs = rendered()
    problems = []
    api = named(docs, "Deployment", "widget-api")
    worker = named(docs, "Deployment", "widget-worker")
    job = named(docs, "Job", "widget-migrate")
    api_c, worker_c, job_c = (pod_spec(w)["containers"][0] for w in (api, worker, job))
    api_env, worker_env = container_env(api_c, docs), container_env(worker_c, docs)

    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        if probe_path(api_c, probe) != path:
            problems.append(f"widget-api {probe} is not GET {path}")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe_path(worker_c, probe) != "/metrics":
            problems.append(f"widget-worker {probe} is not GET /metrics")
    ports = {p["name"]: p["containerPort"] for p in api_c["ports"]}
    if ports.get("http") != port_of(setting(api_env, "API_ADDR")):
        problems.append("widget-api's port http is not API_ADDR's")
    if setting(api_env, "API_ADDR").startswith("127."):
        problems.append("widget-api listens on loopback only")
    ports = {p["name"]: p["containerPort"] for p in worker_c["ports"]}
    if ports.get("metrics") != port_of(setting(worker_env, "WORKER_METRICS_ADDR") or ":0"):
        problems.append("widget-worker's port metrics is not WORKER_METRICS_ADDR's")

    drain = seconds(setting(worker_env, "WORKER_DRAIN_TIMEOUT"))
    grace = pod_spec(worker).get("terminationGracePeriodSeconds", 30)
    if grace <= drain:
        problems.append(f"worker terminationGracePeriodSeconds {grace} does not exceed WORKER_DRAIN_TIMEOUT {drain}s")
    request_timeout = seconds(setting(api_env, "REQUEST_TIMEOUT"))
    if pod_spec(api).get("terminationGracePeriodSeconds", 30) <= request_timeout:
        problems.append(f"API terminationGracePeriodSeconds does not exceed REQUEST_TIMEOUT {request_timeout}s")

    for workload, env in ((api, api_env), (worker, worker_env)):
        if env.get("MIGRATIONS") != ("value", "wait"):
            problems.append(f"{workload['metadata']['name']} does not set MIGRATIONS=wait")
    if job_c.get("command") != ["widget-api", "--migrate-only"]:
        problems.append("the Job does not run widget-api --migrate-only")
    if "MIGRATIONS" in container_env(job_c, docs):
        problems.append("the migration Job sets MIGRATIONS")
    if pod_spec(job).get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("the Job's restartPolicy")

    pdbs = by_kind(docs, "PodDisruptionBudget")
    for workload in (api, worker):
        labels = pod_labels(workload)
        if not any(selects(p["spec"]["selector"], labels) for p in pdbs):
            problems.append(f"no PodDisruptionBudget for {workload['metadata']['name']}")
    api_pdb = next(p for p in pdbs if selects(p["spec"]["selector"], pod_labels(api)))
    if api_pdb["spec"].get("minAvailable", 0) >= api["spec"].get("replicas", 1):
        problems.append("the API's PodDisruptionBudget blocks every eviction")
    return problems


def selects(selector, labels):
    if selector.get("matchExpressions"):
        raise ValueError("matchExpressions: not understood by these checks")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def security():
    """Pods locked down, sized, and secrets only from Secrets."""
    docs = rendered()
    problems = []
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod_ctx = spec.get("securityContext", {})
        if pod_ctx.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken must be false")
        for c in spec.get("initContainers", []) + spec["containers"]:
            ctx = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile RuntimeDefault")
            if ctx.get("runAsUser", pod_ctx.get("runAsUser")) in (0, None):
                problems.append(f"{where}: a numeric non-root runAsUser")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation false")
            if ctx.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem")
            caps = ctx.get("capabilities", {})
            if caps.get("drop") != ["ALL"] or caps.get("add"):
                problems.append(f"{where}: capabilities drop ALL, add none")
            if ctx.get("privileged"):
                problems.append(f"{where}: privileged")
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in c.get("resources", {}).get(kind, {}):
                        problems.append(f"{where}: resources.{kind}.{resource}")
            for key, (source, _) in container_env(c, docs).items():
                if key in SECRET_KEYS and source != "secret":
                    problems.append(f"{where}: {key} from a {source}, not a Secret")
    for config in by_kind(docs, "ConfigMap"):
        for key, value in config.get("data", {}).items():
            if key in SECRET_KEYS or "whsec_" in value or re.search(r"://[^/@\s]+:[^/@\s]+@", value):
                problems.append(f"ConfigMap {config['metadata']['name']}: {key} looks secret")
    return problems


def network():
    """Default deny in and out; out only to PostgreSQL and DNS; in only the
    API's port, and the workers' metrics from the monitoring namespace."""
    docs = rendered()
    policies = by_kind(docs, "NetworkPolicy")
    allowed_out = {("TCP", 5432), ("UDP", 53), ("TCP", 53)}
    problems = []
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        labels = pod_labels(workload)
        mine = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], labels)]
        for direction in ("Ingress", "Egress"):
            if not any(direction in p.get("policyTypes", []) for p in mine):
                problems.append(f"{name}: no {direction} policy (everything allowed)")
        for p in mine:
            for rule in p.get("egress", []):
                ports = {(q.get("protocol", "TCP"), q.get("port")) for q in rule.get("ports", [])}
                if not ports or not ports <= allowed_out:
                    problems.append(f"{name}: egress beyond PostgreSQL and DNS: {sorted(ports) or 'all ports'}")
            for rule in p.get("ingress", []):
                ports = {q.get("port") for q in rule.get("ports", [])}
                container = pod_spec(workload)["containers"][0]
                command = container.get("command", [""])[0]
                own = {x["containerPort"] for x in container.get("ports", [])}
                if workload["kind"] == "Job":
                    problems.append(f"{name}: the migration Job accepts connections")
                elif not ports or not ports <= own:
                    problems.append(f"{name}: ingress to ports {sorted(ports) or 'all'}, not only its own")
                elif command == "widget-worker" and not all("namespaceSelector" in f for f in rule.get("from", [{}])):
                    problems.append(f"{name}: worker metrics open beyond a monitoring namespace")
    return problems
