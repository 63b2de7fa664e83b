"""The sessions page (GET /ui) in a real headless Chromium: what an operator sees.

Each test starts the proxy in process on a real port, in front of stand-in backends,
opens the page with a key (HTTP Basic in the URL: Chromium answers the page's Basic
challenge with it), and reads the page as the browser shows it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from aiohttp.web import Request, StreamResponse, json_response

from tests.fixtures import Backend, ProxyFactory, completion
from tests.fixtures.fleet import StandIn, fleet_config, unique
from tests.ui.conftest import Browser

Client = TestClient[Any, Any]

ADMIN_KEY = "sk-ui-admin-0123456789abcdef"
CHAT_KEY = "sk-ui-chat-0123456789abcdef"
OTHER_KEY = "sk-ui-other-0123456789abcdef"

KEYS = f"""
  - type: auth
    keys:
      - {{id: ops, key: {ADMIN_KEY}, scopes: [chat, admin]}}
      - {{id: app, key: {CHAT_KEY}, scopes: [chat, sessions:read]}}
      - {{id: other, key: {OTHER_KEY}, scopes: [chat, admin]}}
"""


def proxy_config(store: str = "", session: str = "  - type: session\n") -> str:
    return f"""
upstreams:
  - name: main
    url: {{backend}}
    timeouts: {{connect: 2, first_byte: 5, idle: 5}}
{store}
middleware:
{KEYS}{session}"""


def page_url(client: Client, key: str | None, path: str = "/ui") -> str:
    url = client.make_url(path)
    if key is not None:
        url = url.with_user("operator").with_password(key)
    return str(url)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def echo_backend(backend: Backend) -> None:
    """The stand-in answers each chat request with `reply to: <last user message>`."""

    async def handler(request: Request) -> StreamResponse:
        doc = await request.json()
        last = next(m["content"] for m in reversed(doc["messages"]) if m["role"] == "user")
        return json_response(completion(f"reply to: {last}"))

    backend.chat(handler)


async def say(
    client: Client,
    text: str,
    key: str = ADMIN_KEY,
    session: str | None = None,
    history: list[dict[str, Any]] | None = None,
) -> str:
    """One chat request that must succeed; the session id it was recorded under."""
    headers = bearer(key)
    if session is not None:
        headers["X-Session-Id"] = session
    messages = [*(history or []), {"role": "user", "content": text}]
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": messages},
        headers=headers,
    )
    assert resp.status == 200, await resp.text()
    return resp.headers["X-Session-Id"]


async def recorded(client: Client, session_id: str, turns: int) -> None:
    """Until the store holds `turns` turns of the session (the writer is off the
    request path): what the page shows next is then what is stored."""
    for _ in range(200):
        resp = await client.get(f"/ui/api/sessions/{session_id}", headers=bearer(ADMIN_KEY))
        if resp.status == 200 and (await resp.json())["turn_count"] >= turns:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{session_id} did not reach {turns} turns")


def errors_in_console(browser: Browser, allowed: tuple[str, ...] = ()) -> list[str]:
    logs: list[dict[str, Any]] = browser.driver.get_log("browser")
    return [
        e["message"]
        for e in logs
        if e.get("level") == "SEVERE" and not any(a in e["message"] for a in allowed)
    ]


async def session_ids(browser: Browser) -> list[str]:
    found: list[str] = await browser.script(
        "return Array.from(document.querySelectorAll('#sessions .session'), e => e.dataset.id);"
    )
    return found


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, backend: Backend) -> Client:
    echo_backend(backend)
    return await make_proxy(proxy_config(), backend)


# -- sessions and their turns --


async def test_sessions_newest_first_turns_and_a_turn_arriving_live(
    proxy: Client, browser: Browser, tmp_path: Path
) -> None:
    first = await say(proxy, "What is the capital of France?")
    second = await say(proxy, "And of Italy?")
    await recorded(proxy, second, 1)

    await browser.open(page_url(proxy, ADMIN_KEY))
    await browser.wait_text("#sessions", second)
    assert await session_ids(browser) == [second, first]
    assert "1 turn" in await browser.text(f'.session[data-id="{first}"] .summary')

    # a session opens to its turns: the request's message and the reply
    await browser.click(f'.session[data-id="{first}"] .summary')
    turn = await browser.wait_text(f'.session[data-id="{first}"] .turn', "reply to:")
    assert "What is the capital of France?" in turn
    assert "reply to: What is the capital of France?" in turn
    assert "5 in + 2 out = 7 tokens" in turn  # the turn's usage
    assert " ms" in turn  # and its latency, broken down
    assert re.search(r"first byte [0-9.]+ ms · first token [0-9.]+ ms", turn), turn

    # a turn answered while the page is open shows without a reload, in the open
    # session, which moves to the top
    await say(proxy, "And of Spain?", session=first)
    live = await browser.wait_text(f'.session[data-id="{first}"] .turn[data-n="2"]', "Spain")
    assert "reply to: And of Spain?" in live
    assert "2 turns" in await browser.text(f'.session[data-id="{first}"] .summary')
    assert (await session_ids(browser))[0] == first

    # and a new session appears at the top
    third = await say(proxy, "Hello there")
    await browser.wait_for(
        lambda: _first_is(browser, third), what="the new session at the top of the list"
    )

    shot = os.environ.get("CHAT_PROXY_UI_SCREENSHOT") or str(tmp_path / "ui.png")
    await browser.screenshot(shot)
    assert await asyncio.to_thread(os.path.getsize, shot) > 10_000
    assert errors_in_console(browser) == []


async def _first_is(browser: Browser, session_id: str) -> bool:
    ids = await session_ids(browser)
    return bool(ids) and ids[0] == session_id


async def test_html_in_a_message_is_shown_as_text(
    make_proxy: ProxyFactory, backend: Backend, browser: Browser
) -> None:
    reply = '<script>window.__pwned = "reply"</script><i id="injected-reply">italic</i>'

    async def answer(request: Request) -> StreamResponse:
        return json_response(completion(reply))

    backend.chat(answer)
    proxy = await make_proxy(proxy_config(), backend)
    text = '<img src=x onerror="window.__pwned = 1"><b id="injected">bold</b> & &amp;'
    sid = await say(proxy, text)
    await recorded(proxy, sid, 1)

    await browser.open(page_url(proxy, ADMIN_KEY))
    await browser.wait_text("#sessions", sid)
    await browser.click(f'.session[data-id="{sid}"] .summary')
    shown = await browser.wait_text(f'.session[data-id="{sid}"] .turn', "italic")
    # the markup is on the page as the characters the client sent
    assert text in shown
    assert reply in shown
    # and none of it became elements or ran
    assert await browser.script("return document.getElementById('injected');") is None
    assert await browser.script("return document.getElementById('injected-reply');") is None
    assert await browser.script("return document.querySelector('.turn img, .turn b');") is None
    assert await browser.script("return window.__pwned === undefined;") is True


async def test_sessions_kept_without_content_show_no_text(
    make_proxy: ProxyFactory, backend: Backend, browser: Browser
) -> None:
    echo_backend(backend)
    config = proxy_config(session="  - type: session\n    store_content: false\n")
    proxy = await make_proxy(config, backend)
    sid = await say(proxy, "my secret question")
    await recorded(proxy, sid, 1)

    await browser.open(page_url(proxy, ADMIN_KEY))
    await browser.wait_text("#sessions", sid)
    await browser.click(f'.session[data-id="{sid}"] .summary')
    turn = await browser.wait_text(f'.session[data-id="{sid}"] .turn', "text not stored")
    assert "secret" not in turn
    assert "secret" not in browser.source


async def test_only_the_callers_sessions_are_listed(proxy: Client, browser: Browser) -> None:
    mine = await say(proxy, "mine")
    theirs = await say(proxy, "theirs", key=OTHER_KEY)
    await recorded(proxy, mine, 1)

    await browser.open(page_url(proxy, ADMIN_KEY))
    await browser.wait_text("#sessions", mine)
    assert await session_ids(browser) == [mine]
    assert "key: ops" in await browser.text("#who")

    # another key's session, searched for by its id, is not found
    search = await browser.call(browser.driver.find_element, "css selector", "#search-id")
    await browser.call(search.send_keys, theirs + "\n")
    await browser.wait_text("#sessions-note", "No session of this key")
    assert await session_ids(browser) == [mine]
    resp = await proxy.get(f"/ui/api/sessions/{theirs}", headers=bearer(ADMIN_KEY))
    assert resp.status == 404

    # neither key is anywhere on the page
    assert ADMIN_KEY not in browser.source
    assert OTHER_KEY not in browser.source


async def test_a_session_searched_by_id_opens(proxy: Client, browser: Browser) -> None:
    old = await say(proxy, "an old conversation")
    await say(proxy, "a newer one")
    await browser.open(page_url(proxy, ADMIN_KEY))
    await browser.wait_text("#sessions", old)

    search = await browser.call(browser.driver.find_element, "css selector", "#search-id")
    await browser.call(search.send_keys, old[-10:])  # filtering as one types
    await browser.wait_for(
        lambda: _visible_ids_are(browser, [old]), what="only the matching session"
    )
    await browser.call(search.send_keys, "\n")  # not the whole id: opens nothing new
    await browser.call(search.clear)
    await browser.call(search.send_keys, old + "\n")
    turn = await browser.wait_text(f'.session[data-id="{old}"] .turn', "reply to:")
    assert "an old conversation" in turn


async def _visible_ids_are(browser: Browser, ids: list[str]) -> bool:
    shown: list[str] = await browser.script(
        "return Array.from(document.querySelectorAll('#sessions .session'))"
        ".filter(e => !e.hidden).map(e => e.dataset.id);"
    )
    return shown == ids


async def test_turns_recorded_by_another_proxy_on_the_same_store_appear(
    make_proxy: ProxyFactory, backend: Backend, browser: Browser, tmp_path: Path
) -> None:
    """Two proxies (two workers, or two replicas of the proxy) writing to one store:
    the page of one shows the turns the other answered, as they are recorded."""
    echo_backend(backend)
    store = f"store: {{backend: sqlite, path: {tmp_path / 'sessions.db'}}}"
    shown_by = await make_proxy(proxy_config(store=store), backend)
    other = await make_proxy(proxy_config(store=store), backend)

    await browser.open(page_url(shown_by, ADMIN_KEY))
    await browser.wait_text("#sessions-note", "No sessions of this key yet")
    sid = await say(other, "answered by the other proxy")
    await browser.wait_text("#sessions", sid)
    await browser.click(f'.session[data-id="{sid}"] .summary')
    await browser.wait_text(f'.session[data-id="{sid}"] .turn', "answered by the other proxy")

    await say(other, "and again", session=sid)
    await browser.wait_text(f'.session[data-id="{sid}"] .turn[data-n="2"]', "and again")


# -- replicas --


@pytest.fixture
async def stand_ins() -> AsyncIterator[list[StandIn]]:
    made = [StandIn("b0"), StandIn("b1")]
    for stand_in in made:
        await stand_in.start()
    yield made
    for stand_in in made:
        await stand_in.stop()


async def test_replicas_and_a_stopped_one_changing_state(
    make_proxy: ProxyFactory, stand_ins: list[StandIn], browser: Browser
) -> None:
    name = unique("ui")
    config = fleet_config(
        name,
        [s.url for s in stand_ins],
        middleware=[
            {
                "type": "auth",
                "keys": [{"id": "ops", "key": ADMIN_KEY, "scopes": ["chat", "admin"]}],
            },
            {"type": "session"},
        ],
        max_in_flight=8,
    )
    proxy = await make_proxy(config)

    await browser.open(page_url(proxy, ADMIN_KEY))
    rows = f'#replicas tr.replica[data-upstream="{name}"]'
    await browser.wait_text(f'{rows}[data-index="1"]', "ok")
    states = await browser.texts(f"{rows} .state")
    assert states == ["ok", "ok"]
    assert (await browser.texts(f"{rows} .index")) == ["#0", "#1"]
    assert (await browser.texts(f"{rows} .in-flight")) == ["0 / 8", "0 / 8"]

    await stand_ins[1].stop()
    await browser.wait_text(f'{rows}[data-index="1"] .state', "unreachable", timeout=15)
    assert await browser.text(f'{rows}[data-index="0"] .state') == "ok"

    # by index only: no replica's address is anywhere on the page or in what it reads
    upstreams = await (await proxy.get("/ui/api/upstreams", headers=bearer(ADMIN_KEY))).text()
    for stand_in in stand_ins:
        address = f"127.0.0.1:{stand_in.port}"
        assert address not in browser.source
        assert address not in upstreams
        assert str(stand_in.port) not in json.dumps(json.loads(upstreams))

    await stand_ins[1].start()
    await browser.wait_text(f'{rows}[data-index="1"] .state', "ok", timeout=15)


async def test_a_plain_upstream_is_one_replica_and_no_session_middleware_is_said(
    make_proxy: ProxyFactory, backend: Backend, browser: Browser
) -> None:
    proxy = await make_proxy(proxy_config(session=""), backend)
    await browser.open(page_url(proxy, ADMIN_KEY))
    await browser.wait_text("#sessions-note", "records no sessions")
    assert await browser.texts('#replicas tr.replica[data-upstream="main"] .index') == ["single"]
    assert await browser.text('#replicas tr.replica[data-upstream="main"] .state') == "ok"


# -- who may see the page --


async def test_no_key_401_with_a_basic_challenge(proxy: Client, browser: Browser) -> None:
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/api/sessions", "/ui/api/upstreams"):
        resp = await proxy.get(path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith('Basic realm="chat-proxy"')
        error = (await resp.json())["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "missing_api_key"
    resp = await proxy.get("/ui", headers=basic("operator", "sk-not-a-key"))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith('Basic realm="chat-proxy"')
    assert (await resp.json())["error"]["code"] == "invalid_api_key"

    # the browser without credentials is asked for them (a person sees the browser's
    # login prompt; headless Chromium has none to show), and gets no page
    url = page_url(proxy, None)
    await browser.open(url)
    seen = await browser.call(browser.responses, url)
    assert [status for status, _ in seen] == [401]
    assert seen[0][1]["www-authenticate"].startswith('Basic realm="chat-proxy"')
    assert await browser.script("return document.getElementById('sessions');") is None


async def test_a_key_without_admin_403(proxy: Client, browser: Browser) -> None:
    await say(proxy, "hello", key=CHAT_KEY)
    for path in ("/ui", "/ui/api/sessions", "/ui/api/upstreams"):
        resp = await proxy.get(path, headers=bearer(CHAT_KEY))
        assert resp.status == 403, path
        error = (await resp.json())["error"]
        assert error == {
            "message": "You have insufficient permissions for this operation. "
            "Missing scope: admin (key 'app').",
            "type": "permission_error",
            "param": None,
            "code": "missing_scope",
        }
    url = page_url(proxy, CHAT_KEY)
    await browser.open(url)
    body = await browser.wait_text("body", "Missing scope: admin")
    statuses = [status for status, _ in await browser.call(browser.responses, url)]
    assert statuses == [403]
    assert "permission_error" in body
    assert CHAT_KEY not in browser.source


async def test_basic_credentials_open_the_page_only(proxy: Client) -> None:
    """A browser sends the Basic credentials it cached with any request to the
    proxy's origin, even one another site's page makes: they are accepted on the
    page's read-only paths and nowhere else."""
    creds = basic("operator", ADMIN_KEY)
    assert (await proxy.get("/ui/api/sessions", headers=creds)).status == 200
    # the key as the user name, with no password, does too
    assert (await proxy.get("/ui/api/sessions", headers=basic(ADMIN_KEY, ""))).status == 200
    resp = await proxy.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=creds,
    )
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await proxy.get("/v1/models", headers=creds)).status == 401
    # the page only reads
    for method in ("POST", "PUT", "DELETE"):
        resp = await proxy.request(method, "/ui/api/sessions", headers=bearer(ADMIN_KEY))
        assert resp.status == 405, method


async def test_the_page_loads_nothing_from_elsewhere(proxy: Client) -> None:
    resp = await proxy.get("/ui", headers=bearer(ADMIN_KEY))
    assert resp.status == 200
    assert resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert resp.headers["Cache-Control"] == "no-store"
    html = await resp.text()
    for word in ("http://", "https://", "//cdn", "<script>"):
        assert word not in html
    for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
        resp = await proxy.get(path, headers=bearer(ADMIN_KEY))
        assert resp.status == 200
        assert resp.content_type == kind
        text = await resp.text()
        assert "http://" not in text
        assert "https://" not in text
    # the script puts data on the page as text only
    assert "innerHTML" not in (
        await (await proxy.get("/ui/app.js", headers=bearer(ADMIN_KEY))).text()
    )


async def test_the_page_is_not_rate_limited(make_proxy: ProxyFactory, backend: Backend) -> None:
    config = proxy_config() + "  - type: rate_limit\n    requests_per_minute: 2\n"
    proxy = await make_proxy(config, backend)
    for _ in range(5):
        assert (await proxy.get("/ui/api/sessions", headers=bearer(ADMIN_KEY))).status == 200


async def test_paging_and_turns_from(proxy: Client) -> None:
    ids = [await say(proxy, f"message {i}") for i in range(3)]
    await recorded(proxy, ids[-1], 1)
    page = await (await proxy.get("/ui/api/sessions?limit=2", headers=bearer(ADMIN_KEY))).json()
    assert [s["id"] for s in page["data"]] == [ids[2], ids[1]]
    assert page["has_more"] is True
    after = page["last_id"]
    rest = await (
        await proxy.get(f"/ui/api/sessions?limit=2&after={after}", headers=bearer(ADMIN_KEY))
    ).json()
    assert [s["id"] for s in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False

    await say(proxy, "second turn", session=ids[0])
    await recorded(proxy, ids[0], 2)
    doc = await (
        await proxy.get(f"/ui/api/sessions/{ids[0]}?from=1", headers=bearer(ADMIN_KEY))
    ).json()
    assert doc["turn_count"] == 2
    assert doc["turns_from"] == 1
    assert [t["messages"][-1]["content"] for t in doc["turns"]] == ["second turn"]
    bad = await proxy.get("/ui/api/sessions?limit=0", headers=bearer(ADMIN_KEY))
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "limit"


def test_the_page_files_are_in_the_package_data() -> None:
    """Every file of the page is named by pyproject's package-data, so an installed
    (not editable) chat-proxy serves it too."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["proxy.ui"]
    static = root / "proxy" / "ui" / "static"
    files = [p.relative_to(static.parent).as_posix() for p in static.iterdir()]
    assert files
    for name in files:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
