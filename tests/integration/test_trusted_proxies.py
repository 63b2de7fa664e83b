"""server.trusted_proxies: anonymous callers behind a load balancer are told apart by
the address it forwarded (X-Forwarded-For), and only when the balancer is trusted."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.config import ConfigError
from proxy.loader import load_text
from tests.fixtures import Backend, ProxyFactory, chat_body

CONFIG = """
server:
  trusted_proxies: {trusted}
upstreams:
  - name: main
    url: {{backend}}
middleware:
  - type: rate_limit
    requests_per_minute: 1
"""


async def status(client: TestClient[Any, Any], forwarded: str | None) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    resp = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    await resp.read()
    return resp.status


async def test_behind_a_trusted_balancer_each_forwarded_client_has_its_own_limit(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(CONFIG.format(trusted='["127.0.0.0/8", "10.0.0.0/8"]'), backend)
    assert await status(client, "203.0.113.7") == 200
    assert await status(client, "203.0.113.8") == 200  # another client: its own limit
    assert await status(client, "203.0.113.7") == 429
    # the right-most untrusted hop counts: what a client writes to the left does not
    assert await status(client, "198.51.100.1, 203.0.113.8, 10.1.2.3") == 429
    assert await status(client, "198.51.100.2, 203.0.113.9") == 200
    assert await status(client, "192.0.2.1, 203.0.113.9") == 429
    # no header, or only trusted hops or garbage: the balancer's own address
    assert await status(client, None) == 200
    assert await status(client, "10.9.9.9") == 429
    assert await status(client, "not-an-address") == 429


async def test_without_trusted_proxies_the_header_is_ignored(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    client = await make_proxy(CONFIG.format(trusted="[]"), backend)
    assert await status(client, "203.0.113.7") == 200
    assert await status(client, "203.0.113.8") == 429  # one client: the peer address
    other = await make_proxy(CONFIG.format(trusted='["192.0.2.0/24"]'), backend)
    assert await status(other, "203.0.113.7") == 200
    assert await status(other, "203.0.113.8") == 429  # the peer (127.0.0.1) is not trusted


def test_a_trusted_proxy_must_be_an_address_or_network() -> None:
    base = "upstreams: [{name: a, url: 'echo:'}]\n"
    assert load_text(base + "server: {trusted_proxies: ['10.0.0.0/8', '::1']}\n")
    with pytest.raises(ConfigError) as err:
        load_text(base + "server: {trusted_proxies: ['lb.internal']}\n")
    assert any(
        e.startswith("server.trusted_proxies") and "lb.internal" in e for e in err.value.errors
    )
