"""The load signal: engines' Prometheus text read into running, waiting and KV-cache
usage, and the poller against a stand-in engine on 127.0.0.1 through the proxy's own
HTTP/1.1 pool: the values it reads, the fallback to None (one warning per replica,
however many rounds fail) and the recovery (one info line)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.backend import BackendClient
from proxy.backend.http1 import Pool
from proxy.fleet.load import MAX_BODY, EngineLoad, LoadPoller, parse_metrics

# vLLM v1, two data-parallel engines: the KV gauge under its deprecated and its new name
VLLM_V1 = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 11873.0
python_gc_objects_collected_total{generation="1"} 2215.0
python_gc_objects_collected_total{generation="2"} 806.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.947164672e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-8B"} 5.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-8B"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-8B"} 2.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-8B"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.625
vllm:gpu_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.375
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-8B"} 0.625
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-8B"} 0.375
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-8B"} 48213.0
vllm:prefix_cache_queries_total{engine="1",model_name="Qwen/Qwen3-8B"} 45120.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="Qwen/Qwen3-8B"} 0.0
vllm:num_preemptions_total{engine="1",model_name="Qwen/Qwen3-8B"} 0.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen3-8B"} 12.5
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="Qwen/Qwen3-8B"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="Qwen/Qwen3-8B"} 31.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="Qwen/Qwen3-8B"} 97.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-8B"} 101.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen3-8B"} 101.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",gpu_memory_utilization="0.9",num_gpu_blocks="27413"} 1.0
"""


# vLLM v0, two model_name label sets
VLLM_V0 = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="False",gpu_memory_utilization="0.9",num_gpu_blocks="7282"} 1.0
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_running{model_name="llama-8b-sql-lora"} 2.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:num_requests_swapped{model_name="llama-8b-sql-lora"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{model_name="llama-8b-sql-lora"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.8125
vllm:gpu_cache_usage_perc{model_name="llama-8b-sql-lora"} 0.8125
# HELP vllm:cpu_cache_usage_perc CPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:cpu_cache_usage_perc{model_name="llama-8b-sql-lora"} 0.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 183211.0
vllm:prompt_tokens_total{model_name="llama-8b-sql-lora"} 20417.0
"""


# llama-server --metrics, a current build (no KV-cache gauge)
LLAMACPP = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 41870
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 52.114
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 9120
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 190.07
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 8764
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 2.71
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 803.43
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 47.98
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 3
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 6
# HELP llamacpp:n_tokens_max Largest observed n_tokens.
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 7311
"""


# llama-server --metrics, an older build with llamacpp:kv_cache_usage_ratio
LLAMACPP_KV = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1204
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 388
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 611.2
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 38.5
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.4375
# HELP llamacpp:kv_cache_tokens KV-cache tokens.
# TYPE llamacpp:kv_cache_tokens gauge
llamacpp:kv_cache_tokens 1792
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""


# -- parsing


def test_vllm_v1_sums_the_request_gauges_over_engines() -> None:
    # two data-parallel engines; the deprecated and the new KV gauge side by side
    load = parse_metrics("vllm", VLLM_V1)
    assert load.running == 9.0
    assert load.waiting == 3.0
    assert load.requests == 12.0
    assert load.kv_usage == pytest.approx(0.5)  # the mean of 0.625 and 0.375


def test_vllm_v0_sums_over_model_names_and_reads_the_gpu_cache_gauge() -> None:
    load = parse_metrics("vllm", VLLM_V0)
    assert (load.running, load.waiting) == (9.0, 4.0)
    assert load.kv_usage == pytest.approx(0.8125)  # not summed past 1


def test_vllm_reads_kv_cache_usage_perc_before_the_deprecated_name() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 1.0\n'
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
    )
    assert parse_metrics("vllm", text) == EngineLoad(running=1.0, waiting=0.0, kv_usage=0.25)


def test_vllm_without_a_kv_gauge_reports_none() -> None:
    text = "vllm:num_requests_running 2\nvllm:num_requests_waiting 5\n"  # no HELP/TYPE
    assert parse_metrics("vllm", text) == EngineLoad(running=2.0, waiting=5.0, kv_usage=None)


def test_llamacpp_current_build_has_no_kv_gauge() -> None:
    load = parse_metrics("llamacpp", LLAMACPP)
    assert load == EngineLoad(running=3.0, waiting=6.0, kv_usage=None)


def test_llamacpp_older_build_reports_kv_cache_usage_ratio() -> None:
    load = parse_metrics("llamacpp", LLAMACPP_KV)
    assert load == EngineLoad(running=1.0, waiting=0.0, kv_usage=0.4375)


def test_one_request_gauge_is_enough() -> None:
    load = parse_metrics("llamacpp", "llamacpp:requests_deferred 4\n")
    assert (load.running, load.waiting) == (0.0, 4.0)


def test_values_out_of_range_are_clamped() -> None:
    text = "vllm:num_requests_running -1\nvllm:kv_cache_usage_perc 1.5\n"
    assert parse_metrics("vllm", text) == EngineLoad(running=0.0, waiting=0.0, kv_usage=1.0)


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        pytest.param("vllm", "", id="empty"),
        pytest.param("llamacpp", VLLM_V1, id="the-other-engine"),
        pytest.param("vllm", LLAMACPP, id="the-other-engine-2"),
        pytest.param("vllm", "<html><body>Not Found</body></html>\n", id="html"),
        pytest.param(
            "llamacpp",
            '"# HELP llamacpp:requests_processing Number of requests processing.\\n'
            'llamacpp:requests_processing 0\\n"',
            id="json-quoted-text",
        ),
        pytest.param("vllm", 'vllm:num_requests_running{model_name="m} 1\n', id="bad-labels"),
        pytest.param("vllm", "vllm:num_requests_running one\n", id="bad-value"),
        pytest.param("vllm", "vllm:kv_cache_usage_perc 0.5\n", id="only-the-kv-gauge"),
        pytest.param("vllm", "vllm:num_requests_running NaN\n", id="nan"),
    ],
)
def test_unusable_text_is_a_value_error(kind: str, text: str) -> None:
    with pytest.raises(ValueError):
        parse_metrics(kind, text)  # type: ignore[arg-type]


def test_an_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_metrics("tgi", "x 1\n")  # type: ignore[arg-type]


# -- the poller against a stand-in engine


@dataclass
class Replica:
    index: int
    pool: BackendClient | None
    metrics_target: str = "/metrics"
    engine: EngineLoad | None = None


class StandIn:
    """An engine's /metrics on 127.0.0.1, answering as `mode` says."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.mode = "ok"
        self.requests: list[dict[str, str]] = []  # each request's headers
        self.release = asyncio.Event()  # ends the "slow" answers
        self.port = 0
        self._arrived = asyncio.Event()

    async def until_requests(self, n: int, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < n:
                self._arrived.clear()
                await self._arrived.wait()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        self._arrived.set()
        mode = self.mode
        if mode == "ok":
            return web.Response(text=self.text, content_type="text/plain")
        if mode == "status":
            return web.Response(status=500, text="Internal Server Error")
        if mode == "garbage":
            return web.Response(body=b"\x00\xff<html>oops</html>\n", content_type="text/plain")
        if mode == "no-gauges":
            return web.Response(text=VLLM_V1, content_type="text/plain")
        if mode == "big":
            return web.Response(body=b"#" * (MAX_BODY + 1), content_type="text/plain")
        if mode == "big-chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(17):
                await resp.write(b"# " + b"x" * 65534 + b"\n")
            await resp.write_eof()
            return resp
        if mode == "slow":
            await self.release.wait()
            return web.Response(text=self.text, content_type="text/plain")
        raise AssertionError(mode)


async def serve(text: str) -> tuple[StandIn, TestServer]:
    engine = StandIn(text)
    app = web.Application()
    app.router.add_get("/metrics", engine.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    engine.port = server.port
    return engine, server


@pytest.fixture
async def llama() -> AsyncIterator[tuple[StandIn, Pool]]:
    engine, server = await serve(LLAMACPP)
    pool = Pool("http", "127.0.0.1", engine.port)
    try:
        yield engine, pool
    finally:
        engine.release.set()
        await pool.close()
        await server.close()


def fleet_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "chat_proxy.fleet" and r.levelno == level]


async def test_the_poller_reads_each_replica(llama: tuple[StandIn, Pool]) -> None:
    engine, pool = llama
    other, server = await serve(VLLM_V1)
    other_pool = Pool("http", "127.0.0.1", other.port)
    try:
        a = Replica(0, pool)
        poller_a = LoadPoller("gpu", "llamacpp", 1.0, [a])
        await poller_a.poll_once()
        assert a.engine == EngineLoad(running=3.0, waiting=6.0, kv_usage=None)

        b, c = Replica(0, other_pool), Replica(1, other_pool, "/metrics?x=1")
        poller_b = LoadPoller("gpu", "vllm", 1.0, [b, c])
        await poller_b.poll_once()
        assert b.engine == c.engine == EngineLoad(running=9.0, waiting=3.0, kv_usage=0.5)
    finally:
        await other_pool.close()
        await server.close()
    [headers] = engine.requests
    assert headers["Host"] == f"127.0.0.1:{engine.port}"
    assert headers["Accept"] == "text/plain"


async def test_values_follow_the_engine(llama: tuple[StandIn, Pool]) -> None:
    engine, pool = llama
    replica = Replica(0, pool)
    poller = LoadPoller("gpu", "llamacpp", 1.0, [replica])
    await poller.poll_once()
    assert replica.engine is not None and replica.engine.requests == 9.0
    engine.text = "llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n"
    await poller.poll_once()
    assert replica.engine == EngineLoad(running=1.0, waiting=0.0)
    # the connection was kept and reused: every answer was read to its end
    assert pool.open_connections == 1


@pytest.mark.parametrize("mode", ["status", "garbage", "no-gauges", "big", "big-chunked", "slow"])
async def test_unreadable_metrics_fall_back_then_recover(
    llama: tuple[StandIn, Pool], caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    engine, pool = llama
    replica = Replica(3, pool)
    poller = LoadPoller("gpu", "llamacpp", 1.0, [replica], timeout=0.2)
    caplog.set_level(logging.INFO, logger="chat_proxy.fleet")
    await poller.poll_once()
    assert replica.engine == EngineLoad(running=3.0, waiting=6.0)

    engine.mode = mode
    for _ in range(3):
        started = time.monotonic()
        await poller.poll_once()
        assert time.monotonic() - started < 1.0  # a slow engine costs the timeout, no more
        assert replica.engine is None
    [warning] = fleet_records(caplog, logging.WARNING)
    assert warning.__dict__["upstream"] == "gpu"
    assert warning.__dict__["replica"] == 3
    message = warning.getMessage()
    assert "127.0.0.1" not in message and str(engine.port) not in message
    assert fleet_records(caplog, logging.INFO) == []
    # an answer read whole keeps its connection for the next round; one not read to
    # its end (an error status, too large, too slow) has it closed
    assert pool.open_connections == (1 if mode in ("garbage", "no-gauges") else 0)

    engine.mode = "ok"
    engine.release.set()
    for _ in range(2):
        await poller.poll_once()
        assert replica.engine == EngineLoad(running=3.0, waiting=6.0)
    [info] = fleet_records(caplog, logging.INFO)
    assert info.getMessage() == "replica load metrics back"
    assert info.__dict__["replica"] == 3
    assert len(fleet_records(caplog, logging.WARNING)) == 1

    # failing again warns again, once
    engine.mode = "status"
    await poller.poll_once()
    await poller.poll_once()
    assert replica.engine is None
    assert len(fleet_records(caplog, logging.WARNING)) == 2


async def test_a_refused_connection_falls_back_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = Pool("http", "127.0.0.1", port)
    try:
        replica = Replica(1, pool, engine=EngineLoad(running=5.0))
        poller = LoadPoller("gpu", "vllm", 1.0, [replica])
        caplog.set_level(logging.INFO, logger="chat_proxy.fleet")
        for _ in range(3):
            await poller.poll_once()
            assert replica.engine is None
    finally:
        await pool.close()
    [warning] = fleet_records(caplog, logging.WARNING)
    assert warning.__dict__["replica"] == 1
    assert str(port) not in warning.getMessage() and "127.0.0.1" not in warning.getMessage()


async def test_warnings_are_per_replica(
    llama: tuple[StandIn, Pool], caplog: pytest.LogCaptureFixture
) -> None:
    engine, pool = llama
    replicas = [Replica(0, pool), Replica(1, pool), Replica(2, pool, "/nowhere")]
    poller = LoadPoller("gpu", "llamacpp", 1.0, replicas)
    caplog.set_level(logging.INFO, logger="chat_proxy.fleet")
    for _ in range(3):
        await poller.poll_once()
    assert [r.engine is not None for r in replicas] == [True, True, False]
    engine.mode = "status"
    for _ in range(3):
        await poller.poll_once()
    assert [r.engine for r in replicas] == [None, None, None]
    warned = sorted(r.__dict__["replica"] for r in fleet_records(caplog, logging.WARNING))
    assert warned == [0, 1, 2]


async def test_a_stopped_replica_is_skipped(
    llama: tuple[StandIn, Pool], caplog: pytest.LogCaptureFixture
) -> None:
    engine, pool = llama
    last = EngineLoad(running=2.0)
    stopped = Replica(1, None, engine=last)
    running = Replica(0, pool)
    poller = LoadPoller("gpu", "llamacpp", 1.0, [stopped, running])
    caplog.set_level(logging.INFO, logger="chat_proxy.fleet")
    await poller.poll_once()
    await poller.poll_once()
    assert running.engine == EngineLoad(running=3.0, waiting=6.0)
    assert stopped.engine is last  # neither read nor reset
    assert len(engine.requests) == 2  # the running replica's, once a round
    assert fleet_records(caplog, logging.WARNING) == []


async def test_replicas_are_polled_concurrently(llama: tuple[StandIn, Pool]) -> None:
    engine, pool = llama
    engine.mode = "slow"
    replicas = [Replica(i, pool) for i in range(4)]
    poller = LoadPoller("gpu", "llamacpp", 1.0, replicas, timeout=0.3)
    started = time.monotonic()
    await poller.poll_once()
    assert time.monotonic() - started < 0.9  # four timeouts at once, not one after another
    assert len(engine.requests) == 4


async def test_the_task_polls_at_once_then_every_interval_until_stopped(
    llama: tuple[StandIn, Pool],
) -> None:
    engine, pool = llama
    replica = Replica(0, pool)
    poller = LoadPoller("gpu", "llamacpp", 0.05, [replica])
    poller.start()
    poller.start()  # already running: still one task
    try:
        await engine.until_requests(4)
        assert replica.engine == EngineLoad(running=3.0, waiting=6.0)
    finally:
        await poller.stop()
    seen = len(engine.requests)
    await asyncio.sleep(0.15)
    assert len(engine.requests) == seen
    await poller.stop()  # stopping twice is harmless


async def test_the_first_round_does_not_wait_for_the_interval(
    llama: tuple[StandIn, Pool],
) -> None:
    engine, pool = llama
    replica = Replica(0, pool)
    poller = LoadPoller("gpu", "llamacpp", 30.0, [replica])
    poller.start()
    try:
        await engine.until_requests(1, timeout=1.0)
        for _ in range(100):
            if replica.engine is not None:
                break
            await asyncio.sleep(0.01)
        assert replica.engine == EngineLoad(running=3.0, waiting=6.0)
    finally:
        await poller.stop()
    assert len(engine.requests) == 1


def test_the_timeout_defaults_to_the_interval_at_most_two_seconds() -> None:
    assert LoadPoller("gpu", "vllm", 0.5, []).timeout == 0.5
    assert LoadPoller("gpu", "vllm", 5.0, []).timeout == 2.0
    assert LoadPoller("gpu", "vllm", 5.0, [], timeout=3.0).timeout == 3.0
    with pytest.raises(ValueError):
        LoadPoller("gpu", "vllm", 0.0, [])
    with pytest.raises(ValueError):
        LoadPoller("gpu", "none", 1.0, [])  # type: ignore[arg-type]
