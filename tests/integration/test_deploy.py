"""The deployment files (deploy/): the configurations they embed pass the proxy's own
loader and chain builder, and the image, compose, Kubernetes and systemd files agree
with one another and with the proxy on ports, probes, paths and shutdown timing.

No container engine is needed: the Dockerfile and the unit are parsed, the YAML files
are loaded with PyYAML, and the image's HEALTHCHECK command is run against a real
proxy."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from yarl import URL

from proxy.app import build_app
from proxy.chain import BuildContext, build_chain
from proxy.config import ConfigError, LoadedConfig
from proxy.loader import load_text
from tests.fixtures import Backend, json_handler

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd" / "chat-proxy.service"

# `${VAR}` / `${VAR:-default}` as the proxy's loader reads them
_PROXY_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
# compose's forms: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------- helpers


def check_config(text: str, env: dict[str, str]) -> LoadedConfig:
    """What `chat-proxy check` does: load, validate, and build every middleware."""
    config = load_text(text, env=env)
    build_chain(BuildContext(config=config))
    return config


def required_vars(text: str) -> set[str]:
    """The variables a configuration reads without a default, comments excluded."""
    names: set[str] = set()
    for line in text.splitlines():
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        names.update(m.group(1) for m in _PROXY_VAR.finditer(code) if m.group(2) is None)
    return names


def compose_value(value: str) -> str:
    """A compose string as compose resolves it with an empty environment, except that a
    required variable (`:?`) takes a stand-in value."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if op in (":?", "?"):
            return f"test-{name.lower()}"
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"{name} has neither a default nor an error message")

    return _COMPOSE_VAR.sub(sub, value)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {args!r}: use the KEY=value form"
            env[key] = value
    return env


def image_port() -> int:
    (expose,) = instructions("EXPOSE")
    return int(expose.split("/")[0])


def image_uid() -> int:
    user = instructions("USER")[-1]
    return int(user.split(":")[0])


def dockerignore_excludes(path: str) -> bool:
    """Whether the root .dockerignore leaves `path` out of the build context (the last
    matching pattern wins; a pattern that matches a parent directory matches its
    files)."""
    ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        return False
    excluded = False
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in ignore.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object of deploy/k8s/*.yaml by kind (each kind appears once)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def pod_containers() -> dict[str, dict[str, Any]]:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def k8s_env(container: dict[str, Any], secret: dict[str, Any]) -> dict[str, str]:
    """The container's environment, each secretKeyRef checked against the Secret and
    given a stand-in value."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"], f"the Secret has no {ref['key']}"
        # an optional value is used as shipped (empty: the configuration's default)
        if ref.get("optional"):
            env[item["name"]] = str(secret["stringData"][ref["key"]])
        else:
            env[item["name"]] = f"test-{ref['key'].lower()}"
    return env


def k8s_config_text() -> str:
    cm = k8s_objects()["ConfigMap"]
    (text,) = cm["data"].values()
    assert isinstance(text, str)
    return text


def k8s_proxy_config() -> LoadedConfig:
    objs = k8s_objects()
    env = k8s_env(pod_containers()["chat-proxy"], objs["Secret"])
    return check_config(k8s_config_text(), env)


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert isinstance(match, int)
    return match


def prestop_sleep(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def unit() -> dict[str, list[tuple[str, str]]]:
    """The unit's sections, each a list of (key, value): keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{line!r} is not KEY=value"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: str, key: str) -> list[str]:
    return [v for k, v in unit()[section] if k == key]


def unit_value(section: str, key: str) -> str:
    values = unit_values(section, key)
    assert len(values) == 1, f"{key}= appears {len(values)} times in [{section}]"
    return values[0]


def route_paths(config: LoadedConfig) -> set[str]:
    app = build_app(config)
    return {r.canonical for r in app.router.resources()}


# ---------------------------------------------------------------- Dockerfile


def test_image_is_built_in_two_stages_from_python_slim() -> None:
    froms = instructions("FROM")
    assert len(froms) >= 2
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    stage = froms[0].split()
    assert stage[1].upper() == "AS"
    # the runtime stage takes the installed package from the build stage, not the source
    copies = instructions("COPY")
    assert any(c.startswith(f"--from={stage[2]} ") for c in copies)
    assert all("pip install" not in r or "--no-cache-dir" in r for r in instructions("RUN"))


def test_image_copies_what_the_package_build_needs_and_the_context_holds() -> None:
    sources: list[str] = []
    for args in instructions("COPY"):
        words = args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        sources.extend(w for w in words[:-1] if not w.startswith("--"))
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert not dockerignore_excludes(src), f"COPY {src}: .dockerignore leaves it out"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # setuptools reads the readme, and the packages come from proxy/
    assert project["readme"] in sources
    assert "proxy" in [s.rstrip("/") for s in sources]
    assert "pyproject.toml" in sources
    # the rest of the repository stays out of the context
    assert dockerignore_excludes("tests/conftest.py")
    assert dockerignore_excludes(".venv/bin/python")
    assert dockerignore_excludes("proxy/__pycache__/app.cpython-311.pyc")
    assert not dockerignore_excludes("proxy/middleware/auth.py")


def test_image_runs_as_a_fixed_non_root_uid() -> None:
    assert image_uid() != 0
    run = " ".join(instructions("RUN"))
    assert f"--uid {image_uid()}" in run


def test_image_entrypoint_serves_on_all_interfaces_with_the_mounted_config() -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: the proxy is PID 1 and gets SIGTERM
    assert argv == ["chat-proxy", "serve", "--host", "0.0.0.0"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts
    env = image_env()
    assert env["CHAT_PROXY_CONFIG"] == "/etc/chat-proxy/config.yaml"
    assert int(env["CHAT_PROXY_PORT"]) == image_port() == 8080
    assert instructions("STOPSIGNAL") in ([], ["SIGTERM"])


def healthcheck_argv() -> list[str]:
    (health,) = instructions("HEALTHCHECK")
    _, _, cmd = health.partition("CMD ")
    argv = json.loads(cmd)
    assert isinstance(argv, list)
    assert argv[0] == "python", "slim images have no curl: the check uses Python"
    return [sys.executable, *argv[1:]]


async def run_healthcheck(port: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        *healthcheck_argv(),
        env={**os.environ, "CHAT_PROXY_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 20)


async def test_healthcheck_passes_on_a_live_proxy(aiohttp_client: Any) -> None:
    code = healthcheck_argv()[-1]
    assert "/healthz" in code
    assert f"'CHAT_PROXY_PORT', '{image_port()}'" in code  # the EXPOSEd port by default
    config = load_text("upstreams: [{name: echo, url: 'echo:'}]\n", env={})
    client = await aiohttp_client(build_app(config))
    assert await run_healthcheck(client.server.port) == 0


async def test_healthcheck_fails_on_an_unhealthy_answer(backend: Backend) -> None:
    backend.on("GET", "/healthz", json_handler({"status": "down"}, 503))
    assert backend.server is not None and backend.server.port is not None
    assert await run_healthcheck(backend.server.port) != 0
    assert [s.path for s in backend.seen] == ["/healthz"]


# ---------------------------------------------------------------- compose


def compose_proxy() -> dict[str, Any]:
    service = compose()["services"]["chat-proxy"]
    assert isinstance(service, dict)
    return service


def compose_config() -> tuple[str, LoadedConfig]:
    service = compose_proxy()
    mounts = [v.split(":") for v in service["volumes"]]
    (mount,) = [m for m in mounts if m[1] == image_env()["CHAT_PROXY_CONFIG"]]
    assert mount[2:] == ["ro"]
    text = (DEPLOY / mount[0]).read_text()
    env = {k: compose_value(str(v)) for k, v in service["environment"].items()}
    missing = required_vars(text) - set(env)
    assert not missing, f"compose does not pass {sorted(missing)} to the proxy"
    return text, check_config(text, env)


def test_compose_config_passes_the_proxy_check() -> None:
    _, config = compose_config()
    names = set(compose()["services"])
    assert config.store.backend == "redis"
    assert URL(config.store.url).host == "redis" and "redis" in names
    hosts = {URL(u.url).host for u in config.upstreams}
    assert hosts <= names, "every upstream is a compose service"
    assert "ollama" in hosts
    depends = set(compose_proxy()["depends_on"])
    assert {"redis", *hosts} <= depends


def test_compose_publishes_the_proxy_port_only() -> None:
    _, config = compose_config()
    service = compose_proxy()
    (mapping,) = service["ports"]
    host_port, container_port = str(mapping).rsplit(":", 1)
    assert int(container_port) == config.server.port == image_port()
    assert int(host_port.split(":")[-1]) == image_port()
    # the observability profile's UIs are bound to the host's loopback
    # (tests/unit/test_dashboard.py); the backends publish nothing
    others = {
        n: s
        for n, s in compose()["services"].items()
        if n not in PROFILE_PROXIES
        and n != "chat-proxy"
        and "observability" not in s.get("profiles", [])
    }
    assert all("ports" not in s for s in others.values()), "the backends stay private"
    # each profile's proxy publishes the same container port on a host port of its own
    host_ports = {image_port()}
    for name in PROFILE_PROXIES:
        (mapping,) = compose()["services"][name]["ports"]
        host, container = str(mapping).rsplit(":", 1)
        assert int(container) == image_port()
        assert int(host) not in host_ports, f"{name}: host port {host} is taken"
        host_ports.add(int(host))
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_stop_grace_covers_the_drain() -> None:
    _, config = compose_config()
    grace = compose_proxy()["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace)
    assert int(grace[:-1]) > config.server.drain_seconds


def test_compose_pulls_the_model_the_proxy_defaults_to() -> None:
    _, config = compose_config()
    (override,) = [e for e in config.chain if e.type == "model_override"]
    pull = compose()["services"]["ollama-pull"]
    argv = [compose_value(a) for a in pull["entrypoint"]]
    assert argv[:2] == ["ollama", "pull"]
    assert argv[2] == override.options.default
    assert URL(pull["environment"]["OLLAMA_HOST"]).host == "ollama"


# ---------------------------------------------------------------- compose profiles

# the proxy service of each store profile, and the file it mounts as its configuration
PROFILE_PROXIES = {"chat-proxy-sentinel": "sentinel", "chat-proxy-postgres": "postgres"}


def profile_config(name: str) -> tuple[dict[str, Any], str, LoadedConfig]:
    service = compose()["services"][name]
    assert service["profiles"] == [PROFILE_PROXIES[name]]
    mounts = [v.split(":") for v in service["volumes"]]
    (mount,) = [m for m in mounts if m[1] == image_env()["CHAT_PROXY_CONFIG"]]
    assert mount[2:] == ["ro"]
    assert mount[0] == f"./compose/{PROFILE_PROXIES[name]}.yaml"
    text = (DEPLOY / mount[0]).read_text()
    env = {k: compose_value(str(v)) for k, v in service["environment"].items()}
    missing = required_vars(text) - set(env)
    assert not missing, f"compose does not pass {sorted(missing)} to {name}"
    return service, text, check_config(text, env)


@pytest.mark.parametrize("name", sorted(PROFILE_PROXIES))
def test_profile_proxy_is_the_default_one_on_another_store(name: str) -> None:
    service, text, _ = profile_config(name)
    default_text, _ = compose_config()
    # the same proxy: only the `store:` block of its configuration differs
    mine, default = yaml.safe_load(text), yaml.safe_load(default_text)
    assert mine.pop("store") != default.pop("store")
    assert mine == default
    base = compose_proxy()
    for key in ("image", "build", "read_only", "cap_drop", "security_opt", "stop_grace_period"):
        assert service[key] == base[key], key
    assert base["environment"].items() <= service["environment"].items()
    assert "ollama" in service["depends_on"]


def test_sentinel_profile_has_a_master_a_replica_and_three_sentinels() -> None:
    service, _, config = profile_config("chat-proxy-sentinel")
    services = compose()["services"]
    profiled = {n for n, s in services.items() if "sentinel" in s.get("profiles", [])}
    sentinels = {n for n in profiled if n.startswith("sentinel-")}
    assert profiled == {"chat-proxy-sentinel", "redis-master", "redis-replica", *sentinels}
    assert len(sentinels) == 3
    store = config.store
    assert store.backend == "redis" and store.sentinel is not None and not store.cluster
    assert {h for h, _ in store.sentinel.addresses()} == sentinels
    assert {p for _, p in store.sentinel.addresses()} == {26379}
    assert sentinels <= set(service["depends_on"])
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis-master", "6379"]
    for name in ("redis-master", "redis-replica"):
        cmd = services[name]["command"]
        assert cmd[cmd.index("--replica-announce-ip") + 1] == name
        assert services[name]["image"].startswith("redis:")
    for name in sentinels:
        script = services[name]["command"][0]
        monitor = re.search(r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", script)
        assert monitor, f"{name} monitors no master"
        assert monitor.group(1) == store.sentinel.service
        assert (monitor.group(2), monitor.group(3)) == ("redis-master", "6379")
        assert int(monitor.group(4)) == 2, "a quorum of two of the three"
        assert "announce-hostnames yes" in script and "resolve-hostnames yes" in script
        assert "port 26379" in script
        # Sentinel rewrites its file: each one has a volume of its own
        (volume,) = services[name]["volumes"]
        assert (
            volume.split(":")[0] == f"{name}-data" and volume.split(":")[0] in compose()["volumes"]
        )


def test_postgres_profile_migrates_its_own_database() -> None:
    service, _, config = profile_config("chat-proxy-postgres")
    services = compose()["services"]
    profiled = {n for n, s in services.items() if "postgres" in s.get("profiles", [])}
    assert profiled == {"chat-proxy-postgres", "postgres"}
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:") and not pg["image"].endswith(":latest")
    assert config.store.backend == "postgres"
    dsn = URL(config.store.dsn)
    assert dsn.host == "postgres" and dsn.port == 5432
    assert dsn.user == pg["environment"]["POSTGRES_USER"]
    assert dsn.path.lstrip("/") == pg["environment"]["POSTGRES_DB"]
    # the proxy and the server read the same password, with the same default
    assert dsn.password == compose_value(pg["environment"]["POSTGRES_PASSWORD"])
    assert service["environment"]["POSTGRES_PASSWORD"] == pg["environment"]["POSTGRES_PASSWORD"]
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in pg["healthcheck"]["test"]


# ---------------------------------------------------------------- Kubernetes


def test_k8s_files_hold_a_configmap_deployment_service_and_secret() -> None:
    assert set(k8s_objects()) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "Secret",
        "PodDisruptionBudget",
    }
    assert set(pod_containers()) == {"chat-proxy", "vllm"}
    assert pod_containers()["vllm"]["image"].startswith("vllm/vllm-openai:")


def test_k8s_config_passes_the_proxy_check_with_the_secret_keys() -> None:
    text = k8s_config_text()
    container = pod_containers()["chat-proxy"]
    env = k8s_env(container, k8s_objects()["Secret"])
    assert required_vars(text) <= set(env)
    assert {"WEB_APP_KEY", "VOICE_AGENT_KEY"} <= required_vars(text)
    refs = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert {"WEB_APP_KEY", "VOICE_AGENT_KEY"} <= refs
    config = check_config(text, env)
    assert [e.type for e in config.chain] == [
        "auth",
        "rate_limit",
        "validate",
        "session",
        "model_override",
    ]


def test_k8s_three_replicas_share_one_store() -> None:
    config = k8s_proxy_config()
    objs = k8s_objects()
    deployment = objs["Deployment"]["spec"]
    assert deployment["replicas"] == 3
    # a store every replica reaches: a Service's name, not a file or the pod's memory
    assert config.store.backend in ("redis", "postgres")
    where = URL(config.store.url if config.store.backend == "redis" else config.store.dsn)
    assert where.host == "chat-proxy-redis" or where.host == "chat-proxy-postgres"
    # one pod down at a time on a rollout, and no surge (each pod holds a GPU)
    rolling = deployment["strategy"]["rollingUpdate"]
    assert (rolling["maxUnavailable"], rolling["maxSurge"]) == (1, 0)
    labels = deployment["template"]["metadata"]["labels"]
    pdb = objs["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < deployment["replicas"]
    (spread,) = deployment["template"]["spec"]["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_k8s_upstream_is_the_vllm_container_on_the_pod_loopback() -> None:
    config = k8s_proxy_config()
    (up,) = config.upstreams
    assert up.url == "http://127.0.0.1:8000/v1"
    vllm = pod_containers()["vllm"]
    args = vllm["args"]
    assert "--host=127.0.0.1" in args and "--port=8000" in args
    assert "ports" not in vllm, "vLLM is reached through the proxy only"
    (override,) = [e for e in config.chain if e.type == "model_override"]
    assert override.options.model == args[0], "the proxy forces the model vLLM serves"


def test_k8s_ports_and_probes_agree() -> None:
    config = k8s_proxy_config()
    objs = k8s_objects()
    proxy = pod_containers()["chat-proxy"]
    env = k8s_env(proxy, objs["Secret"])
    (port,) = proxy["ports"]
    assert port["containerPort"] == config.server.port == image_port()
    assert env["CHAT_PROXY_CONFIG"] == image_env()["CHAT_PROXY_CONFIG"]
    (service_port,) = objs["Service"]["spec"]["ports"]
    assert named_port(proxy, service_port["targetPort"]) == config.server.port
    selector = objs["Service"]["spec"]["selector"]
    labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    live, ready = proxy["livenessProbe"]["httpGet"], proxy["readinessProbe"]["httpGet"]
    assert (live["path"], ready["path"]) == ("/healthz", "/readyz")
    assert (
        named_port(proxy, live["port"]) == named_port(proxy, ready["port"]) == port["containerPort"]
    )
    assert {"/healthz", "/readyz"} <= route_paths(config)


def test_k8s_shutdown_outlasts_the_drain() -> None:
    config = k8s_proxy_config()
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    proxy, vllm = pod_containers()["chat-proxy"], pod_containers()["vllm"]
    proxy_done = prestop_sleep(proxy) + config.server.drain_seconds
    # vLLM serves the streams the proxy drains, so it stops after the proxy
    assert proxy_done < prestop_sleep(vllm) < pod["terminationGracePeriodSeconds"]
    assert proxy_done + 5 <= pod["terminationGracePeriodSeconds"]


def test_k8s_proxy_runs_non_root_on_a_read_only_root() -> None:
    config = k8s_proxy_config()
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    proxy = pod_containers()["chat-proxy"]
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == image_uid()
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["enableServiceLinks"] is False  # else CHAT_PROXY_PORT=tcp://... is injected
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the ConfigMap is mounted where the image looks for the configuration
    conf = PurePosixPath(image_env()["CHAT_PROXY_CONFIG"])
    cm_volume = volumes[mounts[str(conf.parent)]]
    assert cm_volume["configMap"]["name"] == k8s_objects()["ConfigMap"]["metadata"]["name"]
    assert conf.name in k8s_objects()["ConfigMap"]["data"]
    # the SQLite store writes into a mounted volume, not the read-only root
    if config.store.backend == "sqlite":
        db = PurePosixPath(config.store.path)
        assert db.is_absolute()
        assert any(str(db).startswith(m + "/") for m in mounts if mounts[m] != "config")


def test_k8s_secret_as_shipped_does_not_start_an_open_proxy() -> None:
    objs = k8s_objects()
    secret = objs["Secret"]
    env = {
        e["name"]: secret["stringData"].get(e["valueFrom"]["secretKeyRef"]["key"], "")
        if "valueFrom" in e
        else str(e["value"])
        for e in pod_containers()["chat-proxy"]["env"]
    }
    with pytest.raises(ConfigError) as info:
        load_text(k8s_config_text(), env=env)
    assert any(line.endswith("key: must not be empty") for line in info.value.errors)


def test_k8s_config_passes_chat_proxy_check_named_by_the_environment(tmp_path: Path) -> None:
    # as in the image: no --config, CHAT_PROXY_CONFIG names the file
    path = tmp_path / "config.yaml"
    path.write_text(k8s_config_text())
    env = k8s_env(pod_containers()["chat-proxy"], k8s_objects()["Secret"])
    env["CHAT_PROXY_CONFIG"] = str(path)
    exe = Path(sys.executable).parent / "chat-proxy"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "proxy"]
    result = subprocess.run(
        [*argv, "check"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"{path}: ok" in result.stdout
    assert "test-web_app_key" not in result.stdout


# ---------------------------------------------------------------- systemd


def test_unit_serves_the_config_in_etc_with_secrets_from_a_file() -> None:
    start = shlex.split(unit_value("Service", "ExecStart"))
    assert start[0].startswith("/") and start[0].endswith("/chat-proxy")
    assert start[1] == "serve"
    config = start[start.index("--config") + 1]
    assert config == "/etc/chat-proxy/config.yaml"
    envs = dict(e.split("=", 1) for e in unit_values("Service", "Environment"))
    assert envs["CHAT_PROXY_CONFIG"] == config
    assert unit_value("Service", "EnvironmentFile").lstrip("-").startswith("/etc/chat-proxy/")
    assert unit_value("Service", "DynamicUser") == "yes"
    assert unit_value("Service", "WorkingDirectory") == "/var/lib/" + unit_value(
        "Service", "StateDirectory"
    )
    # the configuration is checked before each start and each reload
    for key in ("ExecStartPre", "ExecReload"):
        checks = [shlex.split(v) for v in unit_values("Service", key)]
        assert [start[0], "check", "--config", config] in checks


def test_unit_reloads_on_sighup_and_drains_on_sigterm() -> None:
    reload = unit_values("Service", "ExecReload")[-1]
    assert re.fullmatch(r"/(usr/)?bin/kill -HUP \$MAINPID", reload)
    assert unit_value("Service", "KillSignal") == "SIGTERM"
    assert unit_value("Service", "Restart") == "on-failure"
    assert unit_value("Service", "RestartPreventExitStatus") == "2"
    # the unit's comments point at config/proxy.yaml as the file to install
    template = yaml.safe_load((ROOT / "config" / "proxy.yaml").read_text())
    drain = float(template["server"]["drain_seconds"])
    assert float(unit_value("Service", "TimeoutStopSec")) > drain


def test_unit_is_hardened() -> None:
    service = dict(unit()["Service"])
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert service.get(key) == value, key
    assert unit_value("Install", "WantedBy") == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # the unit as installed, with the proxy at this checkout's virtualenv
    exe = Path(sys.executable).parent / "chat-proxy"
    if not exe.exists():
        pytest.skip("chat-proxy is not installed in this environment")
    text = UNIT.read_text().replace("/opt/chat-proxy/bin/chat-proxy", str(exe))
    copy = tmp_path / "chat-proxy.service"
    copy.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
