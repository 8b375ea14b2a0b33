"""Checks of the Dockerfile and the systemd units beyond what hadolint and
systemd-analyze judge: how the binaries are built, run and stopped."""

import json
import re

from common import ROOT, rust_default, seconds

DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
SYSTEMD = ROOT / "deploy/systemd"


def instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple((line.split(None, 1) + [""])[:2]) for line in lines if line and not line.startswith("#")]


def dockerfile():
    """Locked release build of both binaries; a pinned, non-root runtime
    whose PID 1 is the binary, stopped by SIGTERM."""
    steps = [(i.upper(), a) for i, a in instructions(DOCKERFILE)]
    problems = []
    stages = [a.split()[0] for i, a in steps if i == "FROM"]
    for image in stages:
        if ":" not in image or image.endswith(":latest"):
            problems.append(f"FROM {image}: pin a tag")
    build = next((s for s in stages if s.startswith("rust:")), "")
    if not re.fullmatch(r"rust:\d+\.\d+\.\d+-(\w+)", build):
        problems.append(f"the build stage {build or '(none)'}: rust:X.Y.Z-<debian release>")
    elif build.rsplit("-", 1)[1] not in stages[-1]:
        problems.append("build and runtime stages on different Debian releases (glibc)")
    runs = " ".join(a for i, a in steps if i == "RUN")
    if "deploy/build-release.sh" not in runs:
        problems.append("the image does not build with deploy/build-release.sh (what CI runs)")
    script = (ROOT / "deploy" / "build-release.sh").read_text()
    for needed in ("SQLX_OFFLINE=true", "--release", "--locked", "--bin widget-api", "--bin widget-worker"):
        if needed not in script:
            problems.append(f"deploy/build-release.sh: the cargo build lacks {needed}")
    final = steps[max(n for n, (i, _) in enumerate(steps) if i == "FROM"):]
    last = {i: a for i, a in final}
    if not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", last.get("USER", "")):
        problems.append("USER: a numeric non-root user")
    if last.get("STOPSIGNAL") != "SIGTERM":
        problems.append("STOPSIGNAL SIGTERM")
    for instruction in ("CMD", "ENTRYPOINT"):
        if instruction in last:
            try:
                json.loads(last[instruction])
            except ValueError:
                problems.append(f"{instruction} in shell form: the binary would not be PID 1")
    if "CMD" not in last and "ENTRYPOINT" not in last:
        problems.append("no CMD")
    if "API_ADDR=0.0.0.0:8080" not in " ".join(a for i, a in final if i == "ENV"):
        problems.append("ENV API_ADDR=0.0.0.0:8080 (the default listens on loopback)")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in ("target", ".local"):
        if path not in ignored:
            problems.append(f".dockerignore: {path} would go into the build context")
    return problems


def unit(path):
    """A unit file as {section: {key: [values]}} (keys may repeat)."""
    sections, current = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_units():
    """Stop, restart, environment and migrations of each unit, and the
    sandbox they share."""
    problems = []
    drain = seconds(rust_default("WORKER_DRAIN_TIMEOUT"))
    request_timeout = seconds(rust_default("REQUEST_TIMEOUT"))
    services = {"widget-api.service": request_timeout, "widget-worker@.service": drain}
    for name, must_exceed in services.items():
        service = unit(SYSTEMD / name)
        s, u = service.get("Service", {}), service.get("Unit", {})
        one = {k: v[-1] for k, v in s.items()}
        if one.get("KillSignal") != "SIGTERM" or one.get("KillMode") != "mixed":
            problems.append(f"{name}: KillSignal=SIGTERM and KillMode=mixed")
        if seconds(one.get("TimeoutStopSec", "90s")) <= must_exceed:
            problems.append(f"{name}: TimeoutStopSec must exceed {must_exceed}s")
        if one.get("Restart") not in ("on-failure", "always") or "StartLimitBurst" not in u:
            problems.append(f"{name}: Restart=on-failure with a StartLimitBurst")
        if "MIGRATIONS=wait" not in s.get("Environment", []):
            problems.append(f"{name}: Environment=MIGRATIONS=wait")
        for key in ("Wants", "After"):
            if "widget-migrate.service" not in " ".join(u.get(key, [])).split():
                problems.append(f"{name}: {key}=widget-migrate.service")
        for file in s.get("EnvironmentFile", []):
            if not file.lstrip("-").startswith("/etc/widget-store/"):
                problems.append(f"{name}: EnvironmentFile outside /etc/widget-store")
    worker = unit(SYSTEMD / "widget-worker@.service")["Service"]
    if "-/etc/widget-store/worker-%i.env" not in worker.get("EnvironmentFile", []):
        problems.append("widget-worker@.service: optional per-instance worker-%i.env")
    migrate = unit(SYSTEMD / "widget-migrate.service")["Service"]
    if migrate.get("Type") != ["oneshot"] or not migrate.get("ExecStart", [""])[0].endswith("--migrate-only"):
        problems.append("widget-migrate.service: a oneshot running widget-api --migrate-only")
    sandbox = unit(SYSTEMD / "widget-.service.d/hardening.conf").get("Service", {})
    required = {
        "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "MemoryDenyWriteExecute": "yes",
    }
    for key, value in required.items():
        if sandbox.get(key, [None])[-1] != value:
            problems.append(f"hardening.conf: {key}={value}")
    if "@system-service" not in sandbox.get("SystemCallFilter", []):
        problems.append("hardening.conf: SystemCallFilter=@system-service")
    return problems
