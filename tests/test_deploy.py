"""The deployment files agree with each other and with the agent's defaults."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from acagent.config import AgentConfig

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"


def _default(name: str) -> Any:
    for f in dataclasses.fields(AgentConfig):
        if f.name == name:
            assert f.default is not dataclasses.MISSING
            return f.default
    raise AssertionError(f"AgentConfig has no field {name}")


DEFAULT_SHUTDOWN_TIMEOUT = float(_default("shutdown_timeout"))


def _docs() -> List[Dict[str, Any]]:
    docs: List[Dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                assert isinstance(doc, dict), path
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def _of_kind(kind: str) -> List[Dict[str, Any]]:
    return [d for d in _docs() if d.get("kind") == kind]


def _deployment() -> Dict[str, Any]:
    deployments = _of_kind("Deployment")
    assert len(deployments) == 1
    return deployments[0]


def _container() -> Dict[str, Any]:
    containers = _deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Dict[str, Any] = containers[0]
    return container


def _flag(args: List[str], name: str) -> str:
    """Value of ``--name value`` or ``--name=value`` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def _args() -> List[str]:
    return [str(a) for a in _container().get("command", []) + _container().get("args", [])]


def test_all_yaml_parses_and_has_kind() -> None:
    docs = _docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap", "Secret"} <= kinds
    for doc in docs:
        assert doc.get("apiVersion"), doc["__file__"]


def test_deployment_shape() -> None:
    spec = _deployment()["spec"]
    assert spec["replicas"] == 3
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_probes_hit_health_and_readiness_on_the_health_port() -> None:
    container = _container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    _host, _, port = _flag(_args(), "--healthAddr").rpartition(":")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == int(port)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe not in container:
            continue
        probe_port = container[probe]["httpGet"]["port"]
        assert ports.get(probe_port, probe_port) == int(port), probe


def test_grace_period_exceeds_the_shutdown_timeout() -> None:
    grace = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(_flag(_args(), "--shutdownTimeout"))
    assert grace > DEFAULT_SHUTDOWN_TIMEOUT


def test_secrets_come_from_secret_refs() -> None:
    env = {e["name"]: e for e in _container()["env"]}
    assert "secretKeyRef" in env["api_key"]["valueFrom"]
    assert "value" not in env["api_key"]
    server_url = env["server_url"]
    assert "value" in server_url or "configMapKeyRef" in server_url.get("valueFrom", {})
    secret_names = {d["metadata"]["name"] for d in _of_kind("Secret")}
    assert env["api_key"]["valueFrom"]["secretKeyRef"]["name"] in secret_names
    config_names = {d["metadata"]["name"] for d in _of_kind("ConfigMap")}
    for entry in env.values():
        ref = entry.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["name"] in config_names
    # no literal secret anywhere in the container spec
    assert "api_key" not in " ".join(_args()).lower().replace("--", "")
    assert not any("apikey" in a.lower() for a in _args())


def test_pod_runs_non_root_read_only_with_writable_tmp() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    container = _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 1) != 0
    csc = container["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_args_use_flags_the_config_knows() -> None:
    args = _args()
    assert _flag(args, "--logFormat") == "json"
    fields = {f.name for f in dataclasses.fields(AgentConfig)}
    for arg in args:
        if arg.startswith("--"):
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", arg[2:].split("=", 1)[0]).lower()
            assert snake in fields, arg


# -- Dockerfile ---------------------------------------------------------------
def _dockerfile_instructions() -> Iterator[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        yield keyword.upper(), rest.strip()


def test_dockerfile_exec_form_entrypoint_and_non_root_user() -> None:
    instructions = list(_dockerfile_instructions())
    entrypoints = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    entrypoint = json.loads(entrypoints[-1])  # exec form is a JSON array
    assert entrypoint == ["python", "-m", "acagent"]
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # USER comes after the last RUN (the image runs as that user)
    kws = [kw for kw, _ in instructions]
    last_run = max(i for i, kw in enumerate(kws) if kw == "RUN")
    last_user = max(i for i, kw in enumerate(kws) if kw == "USER")
    assert last_user > last_run
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    assert any(kw == "EXPOSE" and "8080" in rest.split() for kw, rest in instructions)
    cmd = json.loads([rest for kw, rest in instructions if kw == "CMD"][-1])
    assert _flag(cmd, "--healthAddr").endswith(":8080")
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert froms[-1].split()[0].startswith("python:3.11-slim")


# -- systemd ------------------------------------------------------------------
def _unit() -> Dict[str, Dict[str, List[str]]]:
    sections: Dict[str, Dict[str, List[str]]] = {}
    current = ""
    text = (DEPLOY / "systemd" / "acagent.service").read_text(encoding="utf-8")
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, {})
            continue
        key, _, value = line.partition("=")
        sections[current].setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match, value
    number = float(match.group(1))
    return number * 60 if match.group(2) in ("min", "m") else number


def test_systemd_unit_stops_gracefully_and_is_hardened() -> None:
    service = _unit()["Service"]
    stop = _seconds(service["TimeoutStopSec"][-1])
    assert stop > DEFAULT_SHUTDOWN_TIMEOUT
    exec_start = shlex.split(service["ExecStart"][-1])
    assert exec_start[1:3] == ["-m", "acagent"]
    if "--shutdownTimeout" in exec_start:
        assert stop > float(_flag(exec_start, "--shutdownTimeout"))
    assert service["Restart"] == ["on-failure"]
    assert _seconds(service["RestartSec"][-1]) > 0
    assert service["EnvironmentFile"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["PrivateTmp"] == ["yes"]
    assert service["ReadWritePaths"]
    assert service.get("User", ["root"])[-1] != "root"
