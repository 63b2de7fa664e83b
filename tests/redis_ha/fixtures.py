"""pytest fixtures of the Redis deployments (tests/redis_ha/servers.py), for the
suites that run against each store (tests/contract) and for tests/redis_ha.

The session-wide ones serve tests that only read and write: each test has a key prefix
of its own. A test that kills or restarts a server starts a deployment of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_ha.servers import Cluster, SentinelSet


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """A master and a replica behind three sentinels, for the whole test session."""
    deployment = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    deployment.start(failover=False)
    yield deployment
    deployment.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-master Redis Cluster, for the whole test session."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()
