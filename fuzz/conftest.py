"""Fuzz fixtures: the test suite's real PostgreSQL and Redis (Hypothesis profiles: ../conftest.py)."""

from tests.conftest import own_redis, postgres, redis_server  # noqa: F401  (fixtures)
