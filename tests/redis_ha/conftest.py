"""Fixtures of the tests against Redis deployments of their own."""

from tests.redis_ha.fixtures import redis_cluster, redis_sentinel

__all__ = ["redis_cluster", "redis_sentinel"]
