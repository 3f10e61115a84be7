"""The deployment files agree with each other and with the agent's defaults."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
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
    """The single-agent Deployment of deployment.yaml (other files may add set-ups)."""
    deployments = [d for d in _of_kind("Deployment") if d["__file__"] == "deployment.yaml"]
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
    # one agent per API key without a shared budget (the multi-replica set-up is separate)
    assert spec["replicas"] == 1
    # the spool claim is ReadWriteOnce: the old pod must let go before the new one starts
    assert spec["strategy"]["type"] == "Recreate"
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
MIB = 1024 * 1024
#: what fetch-logs zips at most (acagent.logs.zip_logs max_bytes)
LOG_ZIP_MAX = 50 * MIB
#: room the arithmetic leaves for the log files on the data volume
LOG_ALLOWANCE = 256 * MIB


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


def _quantity(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", str(text))
    assert match, text
    return int(match.group(1)) * (MIB if match.group(2) == "Mi" else 1024 * MIB)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def test_kubernetes_keeps_the_spool_on_a_claim_and_its_size_fits_the_arithmetic() -> None:
    container = _container()
    env = {e["name"]: e for e in container["env"]}
    spool = env["ACAGENT_SPOOL_DIR"]["value"]
    pod = _deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if _under(spool, m["mountPath"]))
    claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    claims = {d["metadata"]["name"]: d for d in _of_kind("PersistentVolumeClaim")}
    claim = claims[claim_name]
    assert _under(env["ACAGENT_LOG_DIR"]["value"], mount["mountPath"])
    # (executor threads + results waiting) bodies of at most the cap, plus the logs
    args = _args()
    cap = int(_flag(args, "--maxResponseBytes"))
    assert cap > 0, "without a cap nothing bounds the disk"
    threshold = int(_flag(args, "--responseQueueThreshold"))
    pool_ref = env["EXECUTOR_POOL_SIZE"]["valueFrom"]["configMapKeyRef"]
    config = next(d for d in _of_kind("ConfigMap") if d["metadata"]["name"] == pool_ref["name"])
    pool = int(config["data"][pool_ref["key"]])
    needed = (pool + threshold) * cap + LOG_ALLOWANCE
    assert needed <= _quantity(claim["spec"]["resources"]["requests"]["storage"])
    # scratch: one gzip copy of the body being uploaded and one log zip
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert cap + LOG_ZIP_MAX <= _quantity(volumes[tmp["name"]]["emptyDir"]["sizeLimit"])
    assert "pvc.yaml" in (K8S / "kustomization.yaml").read_text(encoding="utf-8")


def test_docker_image_keeps_the_spool_on_a_volume_and_uses_the_same_cap() -> None:
    instructions = list(_dockerfile_instructions())
    env = _docker_env()
    volumes = [p for kw, rest in instructions if kw == "VOLUME" for p in json.loads(rest)]
    assert any(_under(env["ACAGENT_SPOOL_DIR"], v) for v in volumes)
    assert any(_under(env["ACAGENT_LOG_DIR"], v) for v in volumes)
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    run_example = re.search(r"#\s+docker run .*?acagent:\S+", text, re.S)
    assert run_example, "the Dockerfile shows a docker run example"
    example = run_example.group(0)
    assert "--rm" not in example or "-v " in example
    assert any(f":{v}" in example for v in volumes), "the example mounts the data volume"
    cmd = json.loads([rest for kw, rest in instructions if kw == "CMD"][-1])
    k8s = _args()
    for flag in ("--maxResponseBytes", "--responseQueueThreshold"):
        assert _flag(cmd, flag) == _flag(k8s, flag), flag


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
    exec_start = shlex.split(service["ExecStart"][-1])
    k8s = _args()
    for flag in ("--maxResponseBytes", "--responseQueueThreshold"):
        assert _flag(exec_start, flag) == _flag(k8s, flag), flag
    text = (DEPLOY / "systemd" / "acagent.service").read_text(encoding="utf-8")
    installs = [line for line in text.splitlines() if re.search(r"\bsudo install\s", line)]
    assert installs and all(" -D " in line for line in installs), installs
    assert "/etc/acagent/" in " ".join(installs)


def test_example_env_file_uses_names_the_cli_knows() -> None:
    from acagent.cli import _OPTIONS, env_name_for

    known = {env_name_for(flag) for flag, *_ in _OPTIONS}
    text = (DEPLOY / "systemd" / "acagent.env.example").read_text(encoding="utf-8")
    for line in text.splitlines():
        name = line.lstrip("# ").split("=", 1)[0]
        if name.startswith("ACAGENT_"):
            assert name in known, name


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
