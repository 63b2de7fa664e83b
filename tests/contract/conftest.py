"""The contract suites run against Redis behind Sentinel and a Redis Cluster too:
their deployments' fixtures (started only when a test asks for them)."""

from tests.redis_ha.fixtures import redis_cluster, redis_sentinel

__all__ = ["redis_cluster", "redis_sentinel"]
