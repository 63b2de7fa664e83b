"""An upstream's backend-client settings: client, tls, idle_seconds."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.config import UpstreamConfig, UpstreamTls, validation_errors
from proxy.routing import tls_context

UPSTREAM: dict[str, Any] = {"name": "main", "url": "https://backend.example/v1"}


def test_defaults_are_the_own_client_verified_tls_and_15_idle_seconds() -> None:
    up = UpstreamConfig.model_validate(UPSTREAM)
    assert up.client == "http1"
    assert up.idle_seconds == 15
    assert up.tls == UpstreamTls(ca_file=None, cert_file=None, key_file=None, verify=True)


def test_client_tls_and_idle_seconds_are_read() -> None:
    tls = {"ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "k.pem", "verify": False}
    up = UpstreamConfig.model_validate(
        {**UPSTREAM, "client": "aiohttp", "idle_seconds": 2.5, "tls": tls}
    )
    assert (up.client, up.idle_seconds) == ("aiohttp", 2.5)
    assert up.tls == UpstreamTls(
        ca_file="ca.pem", cert_file="c.pem", key_file="k.pem", verify=False
    )


def test_errors_name_their_path() -> None:
    bad = {**UPSTREAM, "client": "h2", "idle_seconds": 0.0, "tls": {"key_file": "k.pem"}}
    with pytest.raises(ValidationError) as info:
        UpstreamConfig.model_validate(bad)
    assert sorted(validation_errors(info.value, "upstreams[0]")) == [
        "upstreams[0].client: must be one of 'http1' or 'aiohttp'",
        "upstreams[0].idle_seconds: must be a positive number",
        "upstreams[0].tls.key_file: needs cert_file (the client certificate it belongs to)",
    ]


def test_verify_false_turns_off_certificate_and_host_name_checks() -> None:
    ctx = tls_context(UpstreamTls(verify=False))
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    ctx = tls_context(UpstreamTls())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
