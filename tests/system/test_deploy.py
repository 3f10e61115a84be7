"""The deployment files agree with each other and with the agent's defaults.

The Kubernetes manifests are checked as ``kubectl kustomize`` renders them
(the base and the scale-out overlay), so what is tested is what ``kubectl
apply -k`` would create.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests
import yaml
from helpers import ROOT

from acagent.ac.permits import PASSWORD_ENV
from acagent.cli.options import _OPTIONS, config_from_args, env_name_for
from acagent.config import AgentConfig
from acagent.health import HealthServer
from acagent.metrics import AgentMetrics

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
SCALE_OUT = K8S / "scale-out"


def _default(name: str) -> Any:
    for f in dataclasses.fields(AgentConfig):
        if f.name == name:
            assert f.default is not dataclasses.MISSING
            return f.default
    raise AssertionError(f"AgentConfig has no field {name}")


DEFAULT_SHUTDOWN_TIMEOUT = float(_default("shutdown_timeout"))

#: every environment name the CLI reads (one per flag, the old names, the Redis password)
KNOWN_ENV = (
    {env_name_for(flag) for flag, *_ in _OPTIONS}
    | {name for *_, envs, _ in _OPTIONS for name in envs}
    | {PASSWORD_ENV}
)


def _flag(args: List[str], name: str) -> str:
    """Value of ``--name value`` or ``--name=value`` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


# -- Kubernetes, as kubectl kustomize renders it ------------------------------
def _kubectl() -> str:
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    assert found, "kubectl (1.21 or later: its kustomize reads `patches`) is needed to render deploy/kubernetes"
    return found


@functools.cache
def _rendered_text(folder: Path) -> str:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {folder}: {proc.stderr}"
    return proc.stdout


def _render(folder: Path) -> List[Dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(_rendered_text(folder)) if d is not None]
    assert all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind") for d in docs)
    return docs


def _one(docs: List[Dict[str, Any]], kind: str, name: str) -> Dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)}"
    return found[0]


def _agent(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    return _one(docs, "StatefulSet", "acagent")


def _pod(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    pod: Dict[str, Any] = _agent(docs)["spec"]["template"]["spec"]
    return pod


def _container(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    containers = _pod(docs)["containers"]
    assert len(containers) == 1
    container: Dict[str, Any] = containers[0]
    return container


def _env(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The agent container's environment: name -> literal value, or the env entry
    itself when the value comes from a Secret (``valueFrom``). ``env`` beats ``envFrom``."""
    container = _container(docs)
    env: Dict[str, Any] = {}
    for source in container.get("envFrom", []):
        config = _one(docs, "ConfigMap", source["configMapRef"]["name"])
        env.update({k: str(v) for k, v in config["data"].items()})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            ref = entry["valueFrom"].get("configMapKeyRef")
            if ref:
                env[entry["name"]] = str(_one(docs, "ConfigMap", ref["name"])["data"][ref["key"]])
            else:
                env[entry["name"]] = entry
    return env


def _secret_file(docs: List[Dict[str, Any]], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file ``path`` in the agent container, from its mounts."""
    container, pod = _container(docs), _pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        folder = mount["mountPath"].rstrip("/")
        if path.startswith(folder + "/"):
            secret = volumes[mount["name"]]["secret"]
            assert mount.get("readOnly") is True, mount
            # 0440 with the pod's fsGroup: the agent's group may read it, nobody else
            assert secret["defaultMode"] & 0o037 == 0, oct(secret["defaultMode"])
            assert secret["defaultMode"] & 0o040, "the agent (fsGroup) must be able to read it"
            name = path[len(folder) + 1 :]
            item = next(i for i in secret["items"] if i["path"] == name)
            return secret["secretName"], item["key"]
    raise AssertionError(f"{path} is not in a mounted Secret volume")


def _agent_config(env: Dict[str, Any], tmp_path: Path, args: Optional[List[str]] = None) -> AgentConfig:
    """What the agent makes of this environment (and arguments), through the CLI's own
    parsing. Files the manifests mount are stood in for by files under tmp_path, and
    values from Secrets by placeholders."""
    environ: Dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, dict):  # a secretKeyRef
            ref = value["valueFrom"]["secretKeyRef"]
            assert ref["key"] == "coordination_url", f"only the Redis URL comes from a Secret: {name}"
            environ[name] = "redis://acagent-redis:6379/0"
        elif name.endswith("_FILE") and value.startswith("/run/secrets/"):
            stand_in = tmp_path / value.strip("/").replace("/", "_")
            stand_in.write_text(_stand_in_secret(value) + "\n")
            stand_in.chmod(0o600)
            environ[name] = str(stand_in)
        else:
            environ[name] = value
    # the manifests' folders, under tmp_path: the CLI checks they can work
    for name in ("ACAGENT_SPOOL_DIR", "ACAGENT_LOG_DIR"):
        if name in environ:
            environ[name] = str(tmp_path / environ[name].strip("/"))
    return config_from_args(list(args or []), environ=environ)


def _stand_in_secret(path: str) -> str:
    """The text the tests put in the file a manifest mounts at ``path``."""
    return "secret-of" + re.sub(r"\W", "-", path)


def _quantity(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", str(text))
    assert match, text
    return int(match.group(1)) * (MIB if match.group(2) == "Mi" else 1024 * MIB)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


MIB = 1024 * 1024
#: what fetch-logs zips at most (acagent.logs.zip_logs max_bytes)
LOG_ZIP_MAX = 50 * MIB
#: room the arithmetic leaves for the log files on the data volume
LOG_ALLOWANCE = 256 * MIB


def test_every_kubernetes_file_parses_and_the_overlay_is_outside_its_base() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
    # kustomize refuses an overlay inside its base ("cycle detected")
    overlay = yaml.safe_load((SCALE_OUT / "kustomization.yaml").read_text(encoding="utf-8"))
    for resource in overlay["resources"]:
        target = (SCALE_OUT / resource).resolve()
        assert not _under(str(SCALE_OUT.resolve()), str(target)), resource
    assert (BASE / "kustomization.yaml").is_file()
    assert not (K8S / "kustomization.yaml").exists(), "one base, in base/"


@pytest.mark.parametrize("folder, replicas", [(BASE, 1), (SCALE_OUT, 3)], ids=["base", "scale-out"])
def test_every_agent_pod_gets_its_own_spool_claim(folder: Path, replicas: int) -> None:
    docs = _render(folder)
    agent = _agent(docs)
    spec = agent["spec"]
    assert spec["replicas"] == replicas
    assert [d["kind"] for d in docs].count("StatefulSet") == 1
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "no claim shared by pods"
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    service = _one(docs, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    # the spool and the logs are on the claim template: one claim per pod
    env = _env(docs)
    templates = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    container, pod = _container(docs), _pod(docs)
    mount = next(m for m in container["volumeMounts"] if _under(env["ACAGENT_SPOOL_DIR"], m["mountPath"]))
    assert mount["name"] in templates, "the spool is on a per-pod claim"
    assert mount["name"] not in {v["name"] for v in pod["volumes"]}
    assert _under(env["ACAGENT_LOG_DIR"], mount["mountPath"])
    assert templates[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # no pod volume is a claim every replica would share
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    # the claims outlive a scale-down: their results are re-sent when it scales up
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


@pytest.mark.parametrize("folder", [BASE, SCALE_OUT], ids=["base", "scale-out"])
def test_claim_and_scratch_sizes_fit_the_arithmetic(folder: Path) -> None:
    docs = _render(folder)
    env = _env(docs)
    cap = int(env["ACAGENT_MAX_RESPONSE_BYTES"])
    assert cap > 0, "without a cap nothing bounds the disk"
    threshold = int(env["ACAGENT_RESPONSE_QUEUE_THRESHOLD"])
    pool = int(env["ACAGENT_EXECUTOR_POOL_SIZE"])
    claim = next(iter(_agent(docs)["spec"]["volumeClaimTemplates"]))
    needed = (pool + threshold) * cap + LOG_ALLOWANCE
    assert needed <= _quantity(claim["spec"]["resources"]["requests"]["storage"])
    # scratch: one gzip copy of the body being uploaded and one log zip
    container, pod = _container(docs), _pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert cap + LOG_ZIP_MAX <= _quantity(volumes[tmp["name"]]["emptyDir"]["sizeLimit"])
    assert env["TMPDIR"] == "/tmp"


def test_the_overlay_keeps_every_setting_of_the_base_and_adds_redis() -> None:
    base, scaled = _env(_render(BASE)), _env(_render(SCALE_OUT))
    for name, value in base.items():
        assert scaled.get(name) == value, name
    added = set(scaled) - set(base)
    assert added == {
        "ACAGENT_COORDINATION_URL",
        "ACAGENT_COORDINATION_PASSWORD_FILE",
        "ACAGENT_COORDINATION_LEASE",
    }
    # settings are environment only: no args a patch could replace
    for folder in (BASE, SCALE_OUT):
        container = _container(_render(folder))
        assert "args" not in container and "command" not in container, folder.name
    docs = _render(SCALE_OUT)
    secret, key = _secret_file(docs, scaled["ACAGENT_COORDINATION_PASSWORD_FILE"])
    assert (secret, key) == ("acagent-redis", "password")
    redis_secret = yaml.safe_load((SCALE_OUT / "redis-secret.example.yaml").read_text())
    service = _one(docs, "Service", "acagent-redis")
    assert redis_secret["stringData"]["coordination_url"].startswith(
        f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/"
    )
    assert scaled["ACAGENT_COORDINATION_URL"]["valueFrom"]["secretKeyRef"]["name"] == "acagent-redis"


def test_the_agent_reads_the_overlay_as_meant(tmp_path: Path) -> None:
    """Caps, health port and Redis, through the CLI's own parsing of the rendered env."""
    config = _agent_config(_env(_render(SCALE_OUT)), tmp_path)
    assert config.max_response_bytes == 52428800
    assert config.response_queue_threshold == 20
    assert config.executor_pool_size == 10
    assert config.health_addr == "0.0.0.0:8080"
    assert config.log_format == "json"
    assert config.coordination_url == "redis://acagent-redis:6379/0"
    assert config.coordination_password == _stand_in_secret("/run/secrets/acagent-redis/password")
    assert config.coordination_lease == 10


@pytest.mark.parametrize("folder", [BASE, SCALE_OUT], ids=["base", "scale-out"])
def test_the_api_key_is_a_file_from_the_secret(folder: Path) -> None:
    docs = _render(folder)
    env = _env(docs)
    assert "ACAGENT_API_KEY" not in env and "api_key" not in env
    secret, key = _secret_file(docs, env["ACAGENT_API_KEY_FILE"])
    example = yaml.safe_load((BASE / "secret.example.yaml").read_text(encoding="utf-8"))
    assert (secret, key) == (example["metadata"]["name"], next(iter(example["stringData"])))


@pytest.mark.parametrize("folder", [BASE, SCALE_OUT], ids=["base", "scale-out"])
def test_the_agent_reads_the_key_from_the_mounted_file(folder: Path, tmp_path: Path) -> None:
    config = _agent_config(_env(_render(folder)), tmp_path)
    assert config.api_key == _stand_in_secret("/run/secrets/acagent/api-key")
    assert config.server_url == "https://web-agent.armorcode.com"


@pytest.mark.parametrize("folder", [BASE, SCALE_OUT], ids=["base", "scale-out"])
def test_probes_hit_health_and_readiness_on_the_health_port(folder: Path) -> None:
    docs = _render(folder)
    container = _container(docs)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    _host, _, port = _env(docs)["ACAGENT_HEALTH_ADDR"].rpartition(":")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == int(port)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe_port = container[probe]["httpGet"]["port"]
        assert ports.get(probe_port, probe_port) == int(port), probe
    annotations = _agent(docs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port


def test_grace_period_exceeds_the_shutdown_timeout() -> None:
    docs = _render(BASE)
    grace = _pod(docs)["terminationGracePeriodSeconds"]
    assert grace > float(_env(docs)["ACAGENT_SHUTDOWN_TIMEOUT"])
    assert grace > DEFAULT_SHUTDOWN_TIMEOUT


def test_pod_runs_non_root_read_only_with_writable_tmp() -> None:
    docs = _render(BASE)
    pod, container = _pod(docs), _container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 1) != 0
    assert pod["automountServiceAccountToken"] is False
    csc = container["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


# -- no API key in argv or env, anywhere under deploy/ ------------------------
#: an API key passed as an argument (``--apiKey KEY``, not ``--apiKeyFile``) or set
#: in an environment (``ACAGENT_API_KEY=``, ``-e api_key``, ``name: api_key``)
_KEY_IN_ARGV_OR_ENV = re.compile(
    r"--apiKey(?![A-Za-z])"
    r"|\b(?:ACAGENT_API_KEY|api_key)\b(?!_)\s*[=:]"
    r"|(?:-e|--env)\s+(?:ACAGENT_API_KEY|api_key)\b(?!_)"
    r"|\bname:\s*[\"']?(?:ACAGENT_API_KEY|api_key)\b(?!_)"
)


def key_in_argv_or_env(text: str) -> List[str]:
    """The places in ``text`` that hand the API key over as an argument or a variable."""
    return [m.group(0) for m in _KEY_IN_ARGV_OR_ENV.finditer(text)]


@pytest.mark.parametrize(
    "text, found",
    [
        ("docker run -e ACAGENT_API_KEY=\"$KEY\" acagent", True),
        ("docker run -e ACAGENT_API_KEY acagent", True),
        ("ACAGENT_API_KEY=abc", True),
        ("ExecStart=python -m acagent --apiKey abc", True),
        ("args: [\"--apiKey=abc\"]", True),
        ("- --apiKey\n- abc", True),
        ("- name: api_key\n  valueFrom: {}", True),
        ("env:\n  - {name: ACAGENT_API_KEY, value: x}", True),
        ("api_key: x", True),
        ("--apiKeyFile /run/secrets/api-key", False),
        ("ACAGENT_API_KEY_FILE=/run/secrets/api-key", False),
        ("- name: ACAGENT_API_KEY_FILE\n  value: /run/secrets/acagent/api-key", False),
        ("kubectl create secret generic acagent-secret --from-file=api-key=./api-key", False),
        ("LoadCredential=api-key:/etc/acagent/api-key", False),
    ],
)
def test_the_key_rule(text: str, found: bool) -> None:
    assert bool(key_in_argv_or_env(text)) is found, text


def test_no_manifest_passes_the_api_key_in_argv_or_env() -> None:
    sources = {f"kustomize {f.name}": _rendered_text(f) for f in (BASE, SCALE_OUT)}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            sources[str(path.relative_to(DEPLOY))] = path.read_text(encoding="utf-8")
    assert {"Dockerfile", "systemd/acagent.service", "systemd/acagent.env.example", "README.md"} <= set(sources)
    found = {name: hits for name, text in sources.items() if (hits := key_in_argv_or_env(text))}
    assert not found, found
    # and each one hands over a file instead
    assert "ACAGENT_API_KEY_FILE" in sources["Dockerfile"]
    assert "--apiKeyFile ${CREDENTIALS_DIRECTORY}/" in sources["systemd/acagent.service"]


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
    # the image's settings are ENV, so that arguments add to them (see below)
    assert json.loads([rest for kw, rest in instructions if kw == "CMD"][-1]) == ["run"]
    assert _docker_env()["ACAGENT_HEALTH_ADDR"].endswith(":8080")
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert _resolve_args(froms[-1].split()[0]).startswith("python:3.11.")


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


# -- data survives, disk is bounded, builds are reproducible ------------------


def _docker_args() -> Dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^ARG\s+(\w+)=(\S+)", text, re.M)
    }


def _resolve_args(value: str) -> str:
    args = _docker_args()
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)


def _docker_env() -> Dict[str, str]:
    env: Dict[str, str] = {}
    for kw, rest in _dockerfile_instructions():
        if kw == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def test_docker_image_keeps_the_spool_on_a_volume_and_uses_the_same_cap() -> None:
    instructions = list(_dockerfile_instructions())
    env = _docker_env()
    volumes = [p for kw, rest in instructions if kw == "VOLUME" for p in json.loads(rest)]
    assert any(_under(env["ACAGENT_SPOOL_DIR"], v) for v in volumes)
    assert any(_under(env["ACAGENT_LOG_DIR"], v) for v in volumes)
    example = _docker_run_example()
    assert "--rm" not in example or "-v " in example
    assert any(f":{v}" in example for v in volumes), "the example mounts the data volume"
    assert "ACAGENT_API_KEY_FILE=/run/secrets/" in example, "the example mounts the key file"
    k8s = _env(_render(BASE))
    for name in ("ACAGENT_MAX_RESPONSE_BYTES", "ACAGENT_RESPONSE_QUEUE_THRESHOLD", "ACAGENT_LOG_FORMAT"):
        assert env[name] == k8s[name], name


def _docker_run_example() -> str:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    found = re.search(r"#\s+docker run .*?\sacagent:\S+", text, re.S)  # up to the image
    assert found, "the Dockerfile shows a docker run example"
    return re.sub(r"\\\n#\s*", " ", found.group(0))


def _docker_run(image_args: List[str], tmp_path: Path) -> AgentConfig:
    """The AgentConfig of the Dockerfile's ``docker run`` example with ``image_args``
    after the image: the image's ENV plus the example's ``-e``, ENTRYPOINT plus the
    arguments (or CMD without any), read by the CLI's own parsing."""
    instructions = list(_dockerfile_instructions())
    entrypoint = json.loads([rest for kw, rest in instructions if kw == "ENTRYPOINT"][-1])
    cmd = json.loads([rest for kw, rest in instructions if kw == "CMD"][-1])
    argv = entrypoint + (image_args or cmd)
    assert argv[:3] == ["python", "-m", "acagent"]
    args = argv[3:]
    if args[:1] == ["run"]:  # what acagent.cli.main does with its first word
        args = args[1:]
    example = shlex.split(_docker_run_example().lstrip("# "))
    run_env = dict(example[i + 1].split("=", 1) for i, a in enumerate(example) if a == "-e")
    # the key file is in a folder the example mounts read-only
    mounts = [example[i + 1].split(":") for i, a in enumerate(example) if a == "-v"]
    assert any(m[2:] == ["ro"] and _under(run_env["ACAGENT_API_KEY_FILE"], m[1]) for m in mounts)
    return _agent_config({**_docker_env(), **run_env}, tmp_path, args)


def test_docker_run_arguments_add_to_the_image_settings(tmp_path: Path) -> None:
    plain = _docker_run([], tmp_path)
    more = _docker_run(["--executorPoolSize", "20"], tmp_path)
    assert more.executor_pool_size == 20
    for config in (plain, more):
        assert config.health_addr == "0.0.0.0:8080"
        assert config.log_format == "json"
        assert config.max_response_bytes == 52428800
        assert config.response_queue_threshold == 20
        assert config.api_key == _stand_in_secret("/run/secrets/acagent/api-key")
        assert config.server_url == "https://web-agent.armorcode.com"
    # an argument still beats the image's value
    assert _docker_run(["--maxResponseBytes", "1000"], tmp_path).max_response_bytes == 1000


def _healthcheck() -> List[str]:
    checks = [rest for kw, rest in _dockerfile_instructions() if kw == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK"
    options, _, command = checks[0].partition("CMD ")
    assert re.search(r"--timeout=(\d+)s", options) and re.search(r"--interval=(\d+)s", options)
    argv = json.loads(command)
    assert argv[0] == "python", "exec form with the image's python (a slim image has no curl)"
    return [sys.executable, *argv[1:]]


def test_the_healthcheck_passes_on_a_live_agent_and_fails_otherwise() -> None:
    state = {"alive": True}
    server = HealthServer(
        "127.0.0.1",
        0,
        liveness=lambda: (state["alive"], "ok" if state["alive"] else "stage thread(s) not running"),
        readiness=lambda: (False, "not ready: liveness only"),
        registry=AgentMetrics().registry,
    )
    server.start()
    try:
        env = dict(os.environ, ACAGENT_HEALTH_ADDR=f"0.0.0.0:{server.address[1]}")
        run = functools.partial(subprocess.run, _healthcheck(), env=env, capture_output=True, timeout=30)
        assert run().returncode == 0
        state["alive"] = False
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 503
        assert run().returncode != 0
    finally:
        server.stop()
    assert run().returncode != 0, "nothing listening"


def test_docker_base_image_is_pinned_by_version_and_digest() -> None:
    image = _docker_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", image), image
    froms = [rest for kw, rest in _dockerfile_instructions() if kw == "FROM"]
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)


def _pins() -> Dict[str, str]:
    pins: Dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirement_name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", req, 1)[0]).lower()


def test_constraints_pin_every_runtime_and_build_dependency() -> None:
    text = (DEPLOY.parent / "pyproject.toml").read_text(encoding="utf-8")
    needed: List[str] = []
    for key in ("dependencies", "requires"):  # [project] and [build-system]
        block = re.search(rf"^{key} = \[(.*?)\]\s*$", text, re.S | re.M)
        assert block, key
        needed += re.findall(r'"([^"]+)"', block.group(1))
    pins = _pins()
    missing = [req for req in needed if _requirement_name(req) not in pins]
    assert not missing, f"add exact pins to deploy/constraints.txt for {missing}"
    env = _docker_env()
    assert env.get("PIP_CONSTRAINT", "").endswith("deploy/constraints.txt")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    assert "!deploy/constraints.txt" in ignore.splitlines()


def test_systemd_keeps_the_spool_in_the_state_folder_and_installs_with_install_d() -> None:
    service = _unit()["Service"]
    environment = dict(e.split("=", 1) for e in service["Environment"])
    state = "/var/lib/" + service["StateDirectory"][-1]
    assert _under(environment["ACAGENT_SPOOL_DIR"], state)
    assert _under(environment["ACAGENT_LOG_DIR"], state)
    assert any(_under(state, p) for p in service["ReadWritePaths"])
    k8s = _env(_render(BASE))
    for name in ("ACAGENT_MAX_RESPONSE_BYTES", "ACAGENT_RESPONSE_QUEUE_THRESHOLD"):
        assert environment[name] == k8s[name], name
    assert float(environment["ACAGENT_SHUTDOWN_TIMEOUT"]) < _seconds(service["TimeoutStopSec"][-1])
    text = (DEPLOY / "systemd" / "acagent.service").read_text(encoding="utf-8")
    installs = [line for line in text.splitlines() if re.search(r"\bsudo install\s", line)]
    assert installs and all(" -D " in line for line in installs), installs
    assert "/etc/acagent/" in " ".join(installs)


def test_systemd_hands_the_key_over_as_a_credential_file(tmp_path: Path) -> None:
    service = _unit()["Service"]
    (credential,) = service["LoadCredential"]
    name, _, source = credential.partition(":")
    assert source.startswith("/etc/acagent/")
    text = (DEPLOY / "systemd" / "acagent.service").read_text(encoding="utf-8")
    install = next(line for line in text.splitlines() if f" {source}" in line and "install" in line)
    assert "-m 0600 -o root" in install, install
    exec_start = shlex.split(service["ExecStart"][-1])
    assert _flag(exec_start, "--apiKeyFile") == "${CREDENTIALS_DIRECTORY}/" + name
    # what systemd starts: $CREDENTIALS_DIRECTORY set, the Environment= lines, then the file's
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / name).write_text("key-from-the-credential\n")
    args = [a.replace("${CREDENTIALS_DIRECTORY}", str(credentials)) for a in exec_start[3:]]
    env = dict(e.split("=", 1) for e in service["Environment"])
    env.update(_env_file(DEPLOY / "systemd" / "acagent.env.example"))
    for folder in ("ACAGENT_SPOOL_DIR", "ACAGENT_LOG_DIR"):
        env[folder] = str(tmp_path / env[folder].strip("/"))
    config = config_from_args(args, environ=env)
    assert config.api_key == "key-from-the-credential"
    assert config.health_addr == "127.0.0.1:8080"
    assert config.max_response_bytes == 52428800


def _env_file(path: Path) -> Dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines()
             if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


#: variables of the process, not of the agent's settings
PROCESS_ENV = frozenset(
    {"TMPDIR", "NO_PROXY", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
     "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_CONSTRAINT"}
)


def _environment_names() -> Dict[str, List[str]]:
    """The names each deploy file sets (examples commented out included)."""
    example = (DEPLOY / "systemd" / "acagent.env.example").read_text(encoding="utf-8")
    return {
        "kustomize base": list(_env(_render(BASE))),
        "kustomize scale-out": list(_env(_render(SCALE_OUT))),
        "Dockerfile ENV": list(_docker_env()),
        "systemd Environment=": [e.split("=", 1)[0] for e in _unit()["Service"]["Environment"]],
        "acagent.env.example": [
            m.group(1) for m in re.finditer(r"^#?\s*([A-Za-z_]\w*)=", example, re.M)
        ],
    }


def test_every_environment_name_is_an_acagent_one_the_cli_reads() -> None:
    found = _environment_names()
    assert all(found.values()), found
    for source, names in found.items():
        # ACAGENT_* only: the old names (server_url, EXECUTOR_POOL_SIZE, ...) are gone
        unknown = [n for n in names if n not in PROCESS_ENV and n not in KNOWN_ENV]
        old = [n for n in names if n not in PROCESS_ENV and not n.startswith("ACAGENT_")]
        assert not unknown and not old, (source, unknown, old)


# -- the image's install steps, run without Docker ----------------------------
def _stages() -> List[Dict[str, Any]]:
    stages: List[Dict[str, Any]] = []
    for kw, rest in _dockerfile_instructions():
        if kw == "FROM":
            stages.append({"from": rest, "steps": []})
        elif stages:
            stages[-1]["steps"].append((kw, rest))
    return stages


def test_the_image_install_steps_build_and_install_the_pinned_agent(tmp_path: Path) -> None:
    """Replays the Dockerfile's COPY/ENV/WORKDIR/RUN pip steps in folders under tmp_path.

    Each stage gets a fresh virtualenv standing in for the base image's
    python. Steps that need root or change the host (creating the user,
    chown) are not run; the test checks what they create is the VOLUME.
    """
    import subprocess
    import sys

    repo = DEPLOY.parent
    root = tmp_path / "image"
    mapped: Dict[str, Path] = {"/src": root / "src", "/wheels": root / "wheels"}

    def host_path(path: str) -> str:
        for image_path, real in mapped.items():
            if _under(path, image_path):
                return str(real) + path[len(image_path):]
        return path

    # the base image's Python minor version: the pins are for it
    minor = re.search(r"python:(3\.\d+)", _docker_args()["PYTHON_IMAGE"])
    assert minor
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == minor.group(1):
        base_python = sys.executable
    else:
        found = shutil.which(f"python{minor.group(1)}")
        assert found, f"python{minor.group(1)} (the image's Python) is needed on PATH"
        base_python = found

    def make_python(name: str) -> str:
        target = tmp_path / name
        subprocess.run([base_python, "-m", "venv", str(target)], check=True, timeout=300)
        return str(target / "bin" / "python")

    stages = _stages()
    assert len(stages) == 2
    runtime_python = ""
    skipped: List[str] = []
    for index, stage in enumerate(stages):
        python = make_python(f"stage{index}")
        if index == len(stages) - 1:
            runtime_python = python
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "ACAGENT_"))}
        workdir = root
        for kw, rest in stage["steps"]:
            if kw == "ENV":
                for token in shlex.split(rest):
                    key, _, value = token.partition("=")
                    env[key] = host_path(value)
            elif kw == "WORKDIR":
                workdir = Path(host_path(rest))
                workdir.mkdir(parents=True, exist_ok=True)
            elif kw == "COPY":
                parts = rest.split()
                if parts[0].startswith("--from="):
                    continue  # same mapped folder in both stages
                *sources, dest = parts
                for source in sources:
                    src = repo / source
                    if dest in ("./", "."):
                        target = workdir / src.name
                    else:
                        target = Path(host_path(dest)) if dest.startswith("/") else workdir / dest
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if src.is_dir():
                        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        shutil.copy2(src, target)
            elif kw == "RUN":
                if "pip" not in rest:
                    skipped.append(rest)
                    continue
                command = rest.replace("python -m pip", f"{python} -m pip")
                for image_path in mapped:
                    command = command.replace(image_path, host_path(image_path))
                proc = subprocess.run(
                    ["bash", "-ec", command],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    # what was not run: creating the user and the data folder, which is the VOLUME
    assert len(skipped) == 1 and "useradd" in skipped[0]
    volume = json.loads([r for k, r in _dockerfile_instructions() if k == "VOLUME"][-1])[0]
    assert f"install -d -m 0700 -o 10001 -g 10001 {volume}" in skipped[0]
    # the runtime python has the agent with exactly the pinned dependencies
    freeze = subprocess.run(
        [runtime_python, "-m", "pip", "freeze", "--all"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    installed = {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line.split("==")[1]
        for line in freeze.splitlines()
        if "==" in line
    }
    pins = _pins()
    for name in ("requests", "urllib3", "tenacity", "typing-extensions", "certifi", "idna"):
        assert installed.get(name) == pins[name], name
    assert "acagent" in installed
    assert not (root / "wheels").exists(), "the wheel folder is removed after install"
    proc = subprocess.run(
        [runtime_python, "-m", "acagent", "--help"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0 and "ACAGENT_SERVER_URL" in proc.stdout
