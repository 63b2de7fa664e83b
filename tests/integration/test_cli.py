"""The command line: check, keys, serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_check_prints_the_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:9/v1\n    api_key: sekrit\n"
        "middleware:\n  - type: tests.plugins.audit:audit\n    team: blue\n"
    )
    assert main(["check", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "0. tests.plugins.audit:audit {'team': 'blue'}" in out
    assert "a: http://127.0.0.1:9/v1" in out
    assert "sekrit" not in out


def test_check_reports_every_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server: {port: x, bogus: 1}\nupstreams: []\n")
    with pytest.raises(SystemExit) as info:
        main(["check", "--config", str(cfg)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "server.port: must be an integer" in err
    assert "server.bogus: unknown key" in err
    assert "upstreams: must not be empty" in err


def test_check_reports_a_failing_plugin_factory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "upstreams:\n  - name: a\n    url: http://127.0.0.1:9/v1\n"
        "middleware:\n  - type: tests.plugins.audit:audit\n"
    )
    assert main(["check", "--config", str(cfg)]) == 2
    assert "middleware[0].tests.plugins.audit:audit: 'team'" in capsys.readouterr().err


def test_config_from_environment_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text('upstreams:\n  - name: a\n    url: "echo:"\n')
    monkeypatch.setenv("CHAT_PROXY_CONFIG", str(cfg))
    assert main(["check"]) == 0
    assert "  - a: echo: models=['*']" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_serve_demo_answers_curl_like_requests() -> None:
    import json
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(ROOT / "config/demo.yaml"),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(
                {"model": "demo", "messages": [{"role": "user", "content": "hi there"}]}
            ).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer demo-key"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            body = json.loads(r.read())
        assert body["choices"][0]["message"]["content"].endswith("hi there")
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("logger") == "chat_proxy.access"]
    assert any(x["path"] == "/v1/chat/completions" and x["status"] == 200 for x in access)
    # uvloop is a dependency where it builds: the default event loop is uvloop's
    started = next(x for x in lines if x.get("msg") == "chat-proxy listening")
    assert started["event_loop"] == "uvloop"
