"""What the deploy checks share: the tree they read, the rendered
Kubernetes objects, the binaries' defaults (read from their Rust sources,
so a changed default is seen here), durations and environments."""

import os
import pathlib
import re

import yaml

HERE = pathlib.Path(__file__).resolve().parent
# The tree under check: the repository, or a broken copy of it
# (tests/deploy/can-fail.sh).
ROOT = pathlib.Path(os.environ.get("DEPLOY_CHECK_ROOT") or HERE.parents[1])
OUT = pathlib.Path(os.environ.get("DEPLOY_CHECK_OUT") or ROOT / "target/deploy-checks")

SECRET_KEYS = ("DATABASE_URL", "PAYMENT_WEBHOOK_SECRETS", "ADMIN_TOKEN")
RUST_CONFIG_SOURCES = (
    "api/src/lib.rs",
    "api/src/limits.rs",
    "worker/src/lib.rs",
    "shared/engine/src/config.rs",
    "shared/store/src/db.rs",
)


def load_yaml(path):
    return yaml.safe_load(pathlib.Path(path).read_text())


def rendered():
    """The objects `kubectl kustomize` made of the example overlay."""
    text = (OUT / "rendered.yaml").read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def rust_default(variable):
    """The default the binaries' clap flags give `variable`, as text."""
    for source in RUST_CONFIG_SOURCES:
        text = (ROOT / source).read_text()
        found = text.find(f'env = "{variable}"')
        if found < 0:
            continue
        start = text.rfind("#[arg(", 0, found)
        attribute = text[start : text.find(")]", found)]
        value = re.search(r"default_value(?:_t)?\s*=\s*([^,\n]+)", attribute)
        if not value:
            return None
        value = value.group(1).strip()
        if value.startswith('"'):
            return value.strip('"')
        constant = value.split("::")[-1]
        defined = re.search(rf"const {constant}: [^=]+=\s*([^;]+);", text)
        return defined.group(1).strip().strip('"') if defined else value
    raise LookupError(f"{variable}: no clap flag reads it")


def seconds(duration):
    """`10s`, `2m`, `200ms`, `1m30s` (humantime's and compose's) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    if not parts or "".join(n + u for n, u in parts) != str(duration):
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def named(docs, kind, name):
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"].get("labels", {})


def container_env(container, docs):
    """A container's environment: name -> ("value", text) or
    ("secret", secret name) or ("configMap", config map name)."""
    env = {}
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            for key, value in config_maps.get(name, {}).items():
                env[key] = ("value", value)
        if "secretRef" in source:
            raise ValueError("envFrom a Secret: name each secret key instead")
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = ("value", item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = ("secret", item["valueFrom"]["secretKeyRef"]["name"])
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = ("configMap", item["valueFrom"]["configMapKeyRef"]["name"])
    return env


def setting(env, variable):
    """The value a process gets for `variable`: set, or the binary's default."""
    kind, value = env.get(variable, ("value", None))
    if kind != "value":
        raise ValueError(f"{variable} is not a plain value")
    return value if value is not None else rust_default(variable)


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])
