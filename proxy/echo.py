"""The built-in `echo:` upstream: an in-process OpenAI-compatible responder.

It answers /v1/chat/completions by repeating the last user message ("You said: ..."),
word by word when streaming, with usage counted in words. It lets the demo and the
quick tests run with no model server. `echo:?delay=0.05` waits that many seconds
between streamed words.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web
from yarl import URL

_RUNNERS: dict[str, web.AppRunner] = {}


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    p.get("text", "")
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "text"
                )
    return ""


def _count(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    total = 0
    for msg in messages:
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            total += len(msg["content"].split()) + 3
    return total


def make_app(delay: float = 0.0) -> web.Application:
    app = web.Application()

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "chat-proxy"}],
            }
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(
                {"error": {"message": "invalid JSON", "type": "invalid_request_error"}}, status=400
            )
        if not isinstance(body, dict):
            return web.json_response(
                {"error": {"message": "body must be an object", "type": "invalid_request_error"}},
                status=400,
            )
        model = body.get("model") or "echo"
        text = _last_user_text(body.get("messages"))
        words = ("You said: " + text).split() if text else ["Hello!"]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and limit < len(words):
            words, finish = words[:limit], "length"
        raw_n = body.get("n")
        n = raw_n if isinstance(raw_n, int) and 0 < raw_n <= 16 else 1
        prompt_tokens = _count(body.get("messages"))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words) * n,
            "total_tokens": prompt_tokens + len(words) * n,
        }
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": finish,
                        }
                        for i in range(n)
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)

        async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if extra:
                chunk.update(extra)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        try:
            for i in range(n):
                await send(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ]
                )
            for pos, word in enumerate(words):
                if delay:
                    await asyncio.sleep(delay)
                piece = word if pos == 0 else " " + word
                for i in range(n):
                    await send([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
            for i in range(n):
                await send([{"index": i, "delta": {}, "finish_reason": finish}])
            opts = body.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage"):
                await send([], {"usage": usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the proxy let go of the stream (its client left): nothing to report
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response(
                {
                    "error": {
                        "message": "body must be a JSON object",
                        "type": "invalid_request_error",
                    }
                },
                status=400,
            )
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(x)) % 7), 0.5, -0.5]}
            for i, x in enumerate(items)
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", "echo"),
                "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
            }
        )

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


async def start_echo(spec: str) -> URL:
    """Start an echo responder on a free loopback port; return its /v1 base URL."""
    url = URL(spec)
    delay = float(url.query.get("delay", "0") or 0)
    runner = web.AppRunner(make_app(delay), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = runner.server
    assert runner.addresses
    host, port = runner.addresses[0][:2]
    base = URL.build(scheme="http", host=host, port=port, path="/v1")
    _RUNNERS[str(base)] = runner
    del server
    return base


async def stop_echo(base: URL) -> None:
    runner = _RUNNERS.pop(str(base), None)
    if runner is not None:
        await runner.cleanup()
