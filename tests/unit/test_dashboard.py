"""The Grafana dashboard (deploy/grafana/) and the `observability` profile of
deploy/compose.yaml.

The dashboard is a Grafana JSON model whose panels read the proxy's Prometheus
metrics. The test that matters: every metric name in every PromQL expression of it
is one the proxy really exposes on GET /metrics, read from a proxy started here with
every middleware and a fleet that register metrics, with the suffixes prometheus_client
writes (_total for counters; _bucket, _sum and _count for histograms), each read the
way its type allows (counters through rate(), gauges as they are), and grouped only
by labels the metric has.

No container engine is needed: the compose file, the Prometheus configuration and
Grafana's provisioning files are checked as YAML against one another and against the
files of the repository.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

import proxy.gcwatch  # noqa: F401  (its metrics: registered by `serve`, via proxy/server.py)
from proxy.loader import load_text
from tests.fixtures import Backend, ProxyFactory, completion, json_handler

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "chat-proxy.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PROFILE = "observability"

# labels Prometheus adds to every series it scrapes
TARGET_LABELS = {"job", "instance"}
# words of PromQL that are not metric names
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "start",
    "end",
}
RANGE_FUNCTIONS = ("rate", "irate", "increase")


# ---------------------------------------------------------------- the dashboard


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries() -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) of every panel target and every query variable."""
    doc = dashboard()
    out: list[tuple[str, str, str]] = []
    for panel in all_panels(doc["panels"]):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            out.append((where, target["expr"], target.get("legendFormat", "")))
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
            assert match, f"variable {var['name']}: {text!r} is not label_values(selector, label)"
            out.append((f"variable {var['name']}", match.group(1), "{{" + match.group(2) + "}}"))
    return out


def _strip(expr: str) -> str:
    """The expression without string literals, label matchers, ranges, grouping
    clauses and Grafana's variables: what is left names functions and metrics."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return re.sub(r"\$\{?\w+\}?", " ", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (functions and keywords left out)."""
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", _strip(expr)):
        word = match.group(1)
        if word.lower() not in KEYWORDS:
            names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    """The labels of every `by (...)` / `without (...)` clause."""
    labels: set[str] = set()
    for match in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in match.group(1).split(",") if x.strip())
    return labels


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, the label names its matchers use) of each selector with matchers."""
    out = []
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr):
        names = {m.group(1) for m in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2))}
        out.append((match.group(1), names))
    return out


def read_raw(expr: str, name: str) -> bool:
    """Whether `name` is read anywhere outside rate()/irate()/increase()."""
    inside = rf"\b(?:{'|'.join(RANGE_FUNCTIONS)})\s*\(\s*{re.escape(name)}\s*(?:\{{[^}}]*\}})?\s*\["
    total = len(re.findall(rf"(?<![\w:]){re.escape(name)}(?![\w:])", expr))
    return total > len(re.findall(inside, expr))


def test_the_metric_name_reader_sees_through_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, upstream) (rate(a_seconds_bucket{job=~"$job", '
        'state="running"}[$__rate_interval]))) / on (job) group_left sum without (x) '
        "(b_total offset 5m) + 1e3 * c + max(rate(d_total[5m] @ end()))"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d_total"}
    assert grouping_labels(expr) == {"le", "upstream", "x"}
    assert selectors(expr) == [("a_seconds_bucket", {"job", "state"})]
    assert not read_raw(expr, "a_seconds_bucket") and read_raw(expr, "b_total")
    assert metric_names('chat_proxy_requests_total{job=~"$job", route="a b"}') == {
        "chat_proxy_requests_total"
    }


def test_dashboard_is_a_grafana_json_model() -> None:
    doc = dashboard()
    assert doc["uid"] == "chat-proxy" and doc["title"]
    assert isinstance(doc["schemaVersion"], int) and doc["schemaVersion"] >= 39
    assert doc["time"]["from"].startswith("now-")
    panels = list(all_panels(doc["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert all(isinstance(i, int) for i in ids)
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in panels:
        grid = panel["gridPos"]
        assert {k: type(v) for k, v in grid.items()} == dict.fromkeys("hwxy", int), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
    for panel in graphs:
        assert panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table")
        assert panel["title"] and panel.get("description"), panel["id"]
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs))
        assert all(t["expr"].strip() for t in targets)


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard()["panels"]):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_picks_its_prometheus_by_a_variable() -> None:
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for panel in all_panels(doc["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        assert all(t["datasource"] == wanted for t in panel["targets"]), panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == wanted

    # no data source uid written anywhere: only the variable, and Grafana's own
    def uids(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"].get("uid", "")
            for value in node.values():
                yield from uids(value)
        elif isinstance(node, list):
            for value in node:
                yield from uids(value)

    assert set(uids(doc)) <= {"${datasource}", "-- Grafana --"}
    # every query follows the job variable, so two deployments can share a Prometheus
    for where, expr, _ in queries():
        if where.startswith("panel"):
            assert 'job=~"$job"' in expr, where


def test_dashboard_shows_what_operators_look_at() -> None:
    read: set[str] = set()
    for _, expr, _ in queries():
        read |= metric_names(expr)
    wanted = {
        "chat_proxy_requests_total",
        "chat_proxy_request_duration_seconds_bucket",
        "chat_proxy_time_to_first_byte_seconds_bucket",
        "chat_proxy_time_to_first_token_seconds_bucket",
        "chat_proxy_tokens_total",
        "chat_proxy_upstream_errors_total",
        "chat_proxy_streams_in_flight",
        "chat_proxy_rate_limit_refusals_total",
        "chat_proxy_sessions_created_total",
        "chat_proxy_tool_calls_rewritten_total",
        "chat_proxy_voice_fillers_total",
        "chat_proxy_replica_in_flight",
        "chat_proxy_replica_errors_total",
        "chat_proxy_affinity_spills_total",
        "chat_proxy_replica_engine_requests",
        "chat_proxy_queue_waiting",
        "chat_proxy_queue_wait_seconds_bucket",
        "chat_proxy_queue_refusals_total",
        "chat_proxy_hedges_total",
        "chat_proxy_gc_pause_seconds_bucket",
        "chat_proxy_gc_pause_max_seconds",
    }
    assert wanted <= read, sorted(wanted - read)
    quantiles = {
        (m.group(1), m.group(2))
        for _, expr, _ in queries()
        for m in re.finditer(r"histogram_quantile\(([\d.]+),.*?\((\w+)_bucket", expr)
    }
    for q in ("0.5", "0.95", "0.99"):
        assert (q, "chat_proxy_request_duration_seconds") in quantiles
    for name in ("time_to_first_byte_seconds", "queue_wait_seconds"):
        assert {("0.5", f"chat_proxy_{name}"), ("0.99", f"chat_proxy_{name}")} <= quantiles


# ---------------------------------------------------------------- against /metrics

FLEET = """
upstreams:
  - name: dashfleet
    replicas: ["{backend}", "{backend2}"]
    max_in_flight: 4
    load: {metrics: vllm, interval: 0.05}
    timeouts: {connect: 2, first_byte: 5, idle: 5}
middleware:
  - type: auth
    keys:
      - id: dashboard
        key: dashboard-key
        scopes: [chat, models]
  - type: rate_limit
    requests_per_minute: 3
  - type: session
  - type: tool_keywords
    rules:
      - tool: end_call
        keywords: [goodbye]
  - type: voice
    filler_after_ms: 150
"""

ENGINE = b"""# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="test-model"} 1
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="test-model"} 0
"""


async def exposed_metrics(make_proxy: ProxyFactory, backend: Backend) -> dict[str, Any]:
    """The proxy's GET /metrics after a few requests, by family name."""
    assert backend.server is not None
    second = str(backend.server.make_url("/r2/v1"))
    backend.on("POST", "/r2/v1/chat/completions", json_handler(completion()))

    async def engine(request: web.Request) -> web.StreamResponse:
        return web.Response(body=ENGINE, content_type="text/plain")

    backend.on("GET", "/metrics", engine)
    client = await make_proxy(FLEET.replace("{backend2}", second), backend)
    headers = {"Authorization": "Bearer dashboard-key"}
    tools = [{"type": "function", "function": {"name": "end_call"}}]
    statuses = []
    for text in ("hello", "goodbye", "hello again", "one too many"):
        resp = await client.post(
            "/v1/chat/completions",
            json={
                "model": "test-model",
                "messages": [{"role": "user", "content": text}],
                "tools": tools,
            },
            headers=headers,
        )
        await resp.read()
        statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429]
    resp = await client.get("/metrics")
    assert resp.status == 200
    return {f.name: f for f in text_string_to_metric_families(await resp.text())}


def series_names(families: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every series name a family may have -> (family, type), as prometheus_client
    writes them: counters with _total, histograms as _bucket, _sum and _count."""
    out: dict[str, tuple[str, str]] = {}
    for name, family in families.items():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(
            family.type, ("",)
        )
        for suffix in suffixes:
            out[name + suffix] = (name, family.type)
    return out


def family_labels(family: Any) -> set[str]:
    """The labels of a family: from its samples, and from the metric that registered
    it (a labelled metric has no samples until a child is made)."""
    labels = {k for s in family.samples for k in s.labels}
    for name in (family.name, family.name + "_total"):
        collector = REGISTRY._names_to_collectors.get(name)
        labels |= set(getattr(collector, "_labelnames", ()))
    return labels


async def test_every_query_reads_metrics_the_proxy_exports(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    families = await exposed_metrics(make_proxy, backend)
    series = series_names(families)
    ours = {n for n in families if n.startswith("chat_proxy_")}
    assert len(ours) >= 21, sorted(ours)
    # the requests above made their samples
    assert families["chat_proxy_requests"].samples
    assert families["chat_proxy_replica_in_flight"].samples
    checked = 0
    for where, expr, legend in queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        labels: set[str] = set(TARGET_LABELS)
        for name in names:
            assert name in series, f"{where}: {name} is not a metric the proxy exports"
            family, kind = series[name]
            labels |= family_labels(families[family])
            if kind == "histogram" and name.endswith("_bucket"):
                labels.add("le")
            if where.startswith("panel"):
                if kind in ("counter", "histogram"):
                    assert not read_raw(expr, name), f"{where}: {name} is read without rate()"
                else:
                    assert read_raw(expr, name), f"{where}: the gauge {name} is read by rate()"
            checked += 1
        for name, used in selectors(expr):
            family, _ = series[name]
            allowed = family_labels(families[family]) | TARGET_LABELS
            assert used <= allowed, f"{where}: {name} has no label {sorted(used - allowed)}"
        grouped = grouping_labels(expr)
        assert grouped <= labels, f"{where}: grouped by {sorted(grouped - labels)}"
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if where.startswith("panel"):
            assert shown <= grouped, f"{where}: the legend names {sorted(shown - grouped)}"
        else:
            assert shown <= labels, f"{where}: no label {sorted(shown - labels)}"
    assert checked >= 33


# ---------------------------------------------------------------- compose and friends


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount of a service."""
    out = []
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def mounted(service: dict[str, Any], container_path: str) -> Path:
    """The repository file or directory a service sees at container_path."""
    path = PurePosixPath(container_path)
    for source, target in bind_mounts(service):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return (COMPOSE.parent / source / path.relative_to(target)).resolve()
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_compose_observability_profile_adds_prometheus_grafana_and_jaeger() -> None:
    services = compose()["services"]
    profiled = {n for n, s in services.items() if PROFILE in s.get("profiles", [])}
    assert profiled == {"prometheus", "grafana", "jaeger"}
    # the rest starts without it: the proxy and its own Redis with no profile at all
    assert all(
        PROFILE not in s.get("profiles", []) for n, s in services.items() if n not in profiled
    )
    assert "profiles" not in services["chat-proxy"]
    for name in profiled:
        image = services[name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: pin the image's version"
        # reachable from the host's loopback only
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    declared = set(compose()["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                path = (COMPOSE.parent / source).resolve()
                assert path.exists(), f"{name}: {source} is not in the repository"
                assert ROOT in path.parents, f"{name}: {source} is outside the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_proxy_metrics() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    flags = dict(f.split("=", 1) for f in prometheus["command"])
    config_path = mounted(prometheus, flags["--config.file"])
    assert config_path == PROMETHEUS.resolve()
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert re.fullmatch(r"\d+[sm]", config["global"]["scrape_interval"])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "chat-proxy"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, port = target.rsplit(":", 1)
    assert host == "chat-proxy" and host in services
    container_port = str(services["chat-proxy"]["ports"][0]).rsplit(":", 1)[1]
    assert port == container_port == services["chat-proxy"]["environment"]["CHAT_PROXY_PORT"]
    # the dashboard's job variable finds this job
    (var,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "job"]
    assert var["query"]["query"] == "label_values(chat_proxy_requests_total, job)"


def test_grafana_provisions_the_data_sources_and_the_dashboard() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    assert provisioning == (GRAFANA / "provisioning").resolve()
    (sources_file,) = (provisioning / "datasources").glob("*.yaml")
    sources = yaml.safe_load(sources_file.read_text())
    assert sources["apiVersion"] == 1
    by_type = {s["type"]: s for s in sources["datasources"]}
    prom = URL(by_type["prometheus"]["url"])
    assert prom.host == "prometheus" and prom.port == 9090 and prom.host in services
    assert by_type["prometheus"]["isDefault"] is True
    jaeger = URL(by_type["jaeger"]["url"])
    assert jaeger.host == "jaeger" and jaeger.port == 16686 and jaeger.host in services
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert by_type["prometheus"]["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]

    (providers_file,) = (provisioning / "dashboards").glob("*.yaml")
    providers = yaml.safe_load(providers_file.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    folder = mounted(grafana, provider["options"]["path"])
    assert DASHBOARD.resolve() in folder.glob("*.json")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted(grafana, home) == DASHBOARD.resolve()
    assert set(grafana["depends_on"]) == {"prometheus", "jaeger"}


def test_the_proxy_accepts_the_jaeger_endpoint() -> None:
    # what the compose file tells to add to deploy/compose/config.yaml for traces
    header = COMPOSE.read_text().split("\nname:", 1)[0]
    match = re.search(r"observability: \{otlp_endpoint: \"([^\"]+)\"\}", header)
    assert match, "the compose file says how to send the proxy's traces to jaeger"
    config = load_text(
        "upstreams: [{name: echo, url: 'echo:'}]\n"
        f"observability: {{otlp_endpoint: '{match.group(1)}'}}\n",
        env={},
    )
    endpoint = URL(config.observability.otlp_endpoint or "")
    assert endpoint.host == "jaeger" and endpoint.port == 4318  # OTLP over HTTP
    assert "jaeger" in compose()["services"]
