"""Real PostgreSQL and Redis processes owned by the suite (free ports, temp dirs)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from chatd.config import Config, config_from_dict
from chatd.embedded import PostgresServer, RedisServer, _pg_run_user, find_pg_bin, find_redis_server
from chatd.server import Server, serve
from tests.client import Client
from tests.engine_env import TEST_BRIDGE


def _tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    # PostgreSQL may run as another user (the suite may run as root).
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    base = _tempdir("chatd-test-pg-")
    pg = PostgresServer(
        base, bin_dir=find_pg_bin(os.environ.get("CHATD_TEST_PG_BIN", "")), run_as=_pg_run_user("")
    )
    pg.start()
    try:
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def _redis() -> Iterator[RedisServer]:
    base = _tempdir("chatd-test-redis-")
    rs = RedisServer(base, binary=find_redis_server())
    rs.start()
    try:
        yield rs
    finally:
        rs.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _redis()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, which it may stop, kill or pause."""
    yield from _redis()


def make_config(pg: PostgresServer, rs: RedisServer, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "server": {"port": 0, "hello_timeout": 5.0, "asyncio_bridge": TEST_BRIDGE},
        "postgres": {"dsn": pg.dsn, "command_timeout": 3.0},
        "redis": {"url": rs.url, "command_timeout": 1.0, "connect_timeout": 1.0},
        "relay": {"poll_interval": 0.5},
        "retry": {"backoff_max": 0.5},
        # Tests drive connections far past a user's pace; the limits have tests of their own.
        "limits": {
            "send_rate": 0,
            "read_rate": 0,
            "frame_rate": 0,
            "replies_per_connection": 1000,
            "replies_per_user": 1000,
        },
        "auth": {"anonymous_operators": ["ops"]},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


@pytest.fixture
def config(postgres: PostgresServer, redis_server: RedisServer) -> Config:
    return make_config(postgres, redis_server)


@pytest.fixture
async def server(nursery: trio.Nursery, config: Config) -> AsyncIterator[Server]:
    srv = await nursery.start(serve, config)
    yield srv


@pytest.fixture
def conv() -> str:
    """A conversation id no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def connect(nursery: trio.Nursery) -> AsyncIterator[Any]:
    """``await connect(server, user)`` opens a client that has said hello."""
    clients: list[Client] = []

    async def _connect(srv: Server, user: str | None = "alice", **kw: Any) -> Client:
        client = await Client.open(nursery, srv.url, **kw)
        clients.append(client)
        if user is not None:
            await client.hello(user)
        return client

    yield _connect
    for c in clients:
        await c.close()


__all__ = ["make_config", "replace"]


async def sql(srv: Server, query: str, *args: Any) -> list[dict[str, Any]]:
    """Run a query against the server's own Postgres (through its bridge)."""

    async def _query(pool: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await pool.fetch(query, *args)]

    return await srv.log.bridge.postgres(_query, srv.log.pool)


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)


from tests.engine_env import clock, env, kind, servers  # noqa: E402, F401  (fixtures)
from tests.ports import contract_dsn, logs, stream_stores, transports  # noqa: E402, F401  (fixtures)
