"""Both implementations of each port, as fixtures, for the contract tests.

Every contract test runs twice: against the in-memory twin and against the
real server (a database and a Redis of the suite's own), so the twins cannot
drift from what Postgres and Redis do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from chatd.adapters.bridge import open_bridge
from chatd.adapters.memory_durable import MemoryStreams
from chatd.adapters.memory_log import MemoryDatabase, MemoryLog
from chatd.adapters.memory_transport import MemoryBroker, MemoryTransport
from chatd.adapters.postgres import open_postgres_log
from chatd.adapters.postgres_durable import PostgresStreams
from chatd.adapters.redis_transport import open_redis_transport
from chatd.chaos import Chaos
from chatd.config import PostgresConfig, RedisConfig
from tests.engine_env import TEST_BRIDGE

CONTRACT_DB = "chatd_contract"


@pytest.fixture(scope="session")
def contract_dsn(postgres: Any) -> str:
    """A database of the contract tests' own: they may empty its outbox."""
    postgres.ensure_database(CONTRACT_DB)
    return postgres.dsn_for(CONTRACT_DB)


@pytest.fixture(params=["memory", "postgres"])
async def logs(request: Any, contract_dsn: str) -> AsyncIterator[tuple[Any, Any, Chaos]]:
    """Two handles on one log (two "processes"), and the chaos gates of the first."""
    chaos = Chaos()
    if request.param == "memory":
        db = MemoryDatabase()
        yield MemoryLog(db, chaos, timeout=1.0), MemoryLog(db, Chaos(), timeout=1.0), chaos
        return
    cfg = PostgresConfig(dsn=contract_dsn, command_timeout=1.0, pool_min=1, pool_max=4)
    async with AsyncExitStack() as stack:
        handles = []
        for gates in (chaos, Chaos()):
            bridge = await stack.enter_async_context(
                open_bridge(gates, postgres_timeout=1.0, redis_timeout=1.0, kind=TEST_BRIDGE)
            )
            handles.append(await stack.enter_async_context(open_postgres_log(bridge, cfg)))
        first = handles[0]

        async def _empty_outbox(pool: Any) -> None:
            await pool.execute("DELETE FROM outbox")

        await first.bridge.postgres(_empty_outbox, first.pool)
        yield handles[0], handles[1], chaos


@pytest.fixture(params=["memory", "redis"])
async def transports(request: Any, redis_server: Any) -> AsyncIterator[tuple[Any, Any, Chaos]]:
    """Two clients of one transport (two "processes"), and the chaos gates of the first."""
    chaos = Chaos()
    if request.param == "memory":
        broker = MemoryBroker(seed=1)
        a = MemoryTransport(broker, chaos, timeout=1.0)
        b = MemoryTransport(broker, Chaos(), timeout=1.0)
        yield a, b, chaos
        a.close()
        b.close()
        return
    cfg = RedisConfig(url=redis_server.url, command_timeout=1.0, connect_timeout=1.0)
    async with AsyncExitStack() as stack:
        handles = []
        for gates in (chaos, Chaos()):
            bridge = await stack.enter_async_context(
                open_bridge(gates, postgres_timeout=1.0, redis_timeout=1.0, kind=TEST_BRIDGE)
            )
            handles.append(await stack.enter_async_context(open_redis_transport(bridge, cfg)))
        yield handles[0], handles[1], chaos


@pytest.fixture(params=["memory", "postgres"])
async def stream_stores(request: Any, contract_dsn: str) -> AsyncIterator[Any]:
    """A Durable Streams store: in memory, or in the contract tests' Postgres."""
    if request.param == "memory":
        yield MemoryStreams()
        return
    cfg = PostgresConfig(dsn=contract_dsn, command_timeout=2.0, pool_min=1, pool_max=4)
    async with (
        open_bridge(Chaos(), postgres_timeout=2.0, redis_timeout=1.0, kind=TEST_BRIDGE) as bridge,
        open_postgres_log(bridge, cfg) as pglog,
    ):
        yield PostgresStreams(bridge, pglog.pool, pglog.reads)
