"""Loading the configuration: interpolation, strict validation, paths in errors."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError
from proxy.loader import load_text

UP = "upstreams:\n  - name: a\n    url: http://127.0.0.1:9/v1\n"


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(text, env=env or {})
    return info.value.errors


def test_minimal_config_defaults() -> None:
    cfg = load_text(UP, env={})
    assert cfg.server.port == 8080
    assert cfg.server.max_body_bytes == 4 * 1024 * 1024
    assert cfg.upstreams[0].timeouts.first_byte == 120
    assert cfg.upstreams[0].models == ("*",)
    assert cfg.chain == ()


def test_env_interpolation_with_defaults() -> None:
    text = """
server: {port: "${PORT:-9000}", host: "${HOST}"}
upstreams:
  - name: a
    url: ${URL}
    api_key: ${KEY:-}
"""
    cfg = load_text(text, env={"HOST": "0.0.0.0", "URL": "http://x:1/v1"})
    assert cfg.server.port == 9000
    assert cfg.server.host == "0.0.0.0"
    assert cfg.upstreams[0].url == "http://x:1/v1"
    assert cfg.upstreams[0].api_key == ""


def test_unset_variable_is_an_error_naming_it() -> None:
    errs = errors_of("upstreams:\n  - name: a\n    url: ${NOPE}\n")
    assert any("upstreams[0].url: environment variable NOPE is not set" in e for e in errs)


def test_unknown_keys_wrong_types_and_values_all_reported() -> None:
    text = (
        UP
        + """server:
  prot: 1
  port: "abc"
  max_body_bytes: -1
upstreams_x: []
"""
    )
    errs = errors_of(text)
    assert "server.prot: unknown key" in errs
    assert "server.port: must be an integer" in errs
    assert "server.max_body_bytes: must be a positive integer" in errs
    assert "upstreams_x: unknown key" in errs


def test_upstream_errors_have_paths() -> None:
    text = "upstreams:\n  - name: a\n    url: ftp://x\n    timeouts: {connect: 0}\n"
    errs = errors_of(text)
    assert "upstreams[0].url: must be an http:// or https:// URL, or echo:" in errs
    assert "upstreams[0].timeouts.connect: must be a positive number" in errs or any(
        e.startswith("upstreams[0].timeouts.connect:") for e in errs
    )


def test_missing_upstreams() -> None:
    assert "upstreams: is required" in errors_of("server: {}\n")


def test_invalid_yaml_says_where() -> None:
    errs = errors_of("upstreams: [\n  - : :\n")
    assert errs[0].startswith("<file>: line ")


def test_unknown_middleware_and_bad_plugin() -> None:
    text = (
        UP
        + """middleware:
  - type: nope
  - type: tests.plugins.missing:factory
  - {}
"""
    )
    errs = errors_of(text)
    assert any(e.startswith("middleware[0].type: unknown middleware 'nope'") for e in errs)
    assert any(
        e.startswith("middleware[1].type: cannot load 'tests.plugins.missing:factory'")
        for e in errs
    )
    assert "middleware[2].type: is required" in errs


def test_user_middleware_options_kept() -> None:
    cfg = load_text(
        UP + "middleware:\n  - type: tests.plugins.audit:audit\n    team: blue\n", env={}
    )
    assert cfg.chain[0].type == "tests.plugins.audit:audit"
    assert cfg.chain[0].options == {"team": "blue"}


def test_unset_variable_in_a_middleware_names_its_type() -> None:
    text = UP + "middleware:\n  - type: tests.plugins.audit:audit\n    team: ${TEAM}\n"
    assert (
        "middleware[0].tests.plugins.audit:audit.team: environment variable TEAM is not set"
        in errors_of(text)
    )


def test_the_file_shape_is_read_without_importing_a_middleware() -> None:
    # config.py checks the file's shape; the chain's options are the chain's
    import subprocess
    import sys

    code = (
        "import sys; import proxy.config as c; "
        "c.parse_text('upstreams: [{name: a, url: http://127.0.0.1:1/v1}]'); "
        "print(sorted(m for m in sys.modules if m.startswith('proxy.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout
    assert "proxy.config" in loaded
    assert "proxy.middleware" not in loaded and "proxy.chain" not in loaded, loaded


def test_a_fleet_is_read_with_its_defaults() -> None:
    cfg = load_text(
        "upstreams:\n  - name: f\n    replicas: [http://127.0.0.1:1/v1, http://127.0.0.1:2/v1/]\n"
        "queue: {max_waiting: 5}\n",
        env={},
    )
    up = cfg.upstreams[0]
    assert up.urls == ("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1")
    assert up.balance == "affinity" and up.affinity.load_factor == 1.25
    assert up.max_in_flight is None and up.load.metrics == "none"
    assert cfg.queue.max_waiting == 5 and cfg.queue.max_wait_seconds == 30


def test_fleet_errors_name_their_paths() -> None:
    both = "upstreams:\n  - name: f\n    url: http://a:1/v1\n    replicas: [http://b:1/v1]\n"
    assert any("url" in e and "replicas" in e for e in errors_of(both))
    assert any("upstreams" in e and "url" in e for e in errors_of("upstreams:\n  - name: f\n"))
    twice = "upstreams:\n  - name: f\n    replicas: [http://b:1/v1, http://b:1/v1/]\n"
    assert any("replicas" in e and "distinct" in e for e in errors_of(twice))
    bad = (
        "upstreams:\n  - name: f\n    replicas: [ftp://b]\n    balance: fastest\n"
        "    max_in_flight: 0\n    affinity: {load_factor: 0.5}\n    load: {metrics: tgi}\n"
        "queue: {max_wait_seconds: 0}\n"
    )
    found = "\n".join(errors_of(bad))
    for where in (
        "upstreams[0].replicas",
        "upstreams[0].balance",
        "upstreams[0].max_in_flight",
        "upstreams[0].affinity.load_factor",
        "upstreams[0].load.metrics",
        "queue.max_wait_seconds",
    ):
        assert where in found, (where, found)


def test_a_key_priority_outside_0_to_9_is_an_error() -> None:
    text = UP + "middleware:\n  - type: auth\n    keys:\n      - {id: a, key: sk-a, priority: 10}\n"
    assert any("priority" in e for e in errors_of(text))


def test_an_empty_variable_takes_its_default_as_in_the_shell() -> None:
    text = (
        'upstreams:\n  - name: a\n    url: "${URL:-http://127.0.0.1:9/v1}"\n    api_key: "${KEY}"\n'
    )
    cfg = load_text(text, env={"URL": "", "KEY": ""})
    assert cfg.upstreams[0].url == "http://127.0.0.1:9/v1"
    assert cfg.upstreams[0].api_key == ""
