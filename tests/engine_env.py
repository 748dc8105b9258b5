"""Whole engines for tests, over the memory adapters (on a mock clock) or the real servers.

``env`` is parametrized: ``memory`` runs on :mod:`chatd.adapters.memory_log`
and :mod:`chatd.adapters.memory_transport` with an autojump mock clock, so a
test that waits seconds runs in milliseconds; ``real`` runs the same test on
the suite's own Postgres and Redis, in real time. Sessions run over in-memory
connections in both, since sockets are not what these tests are about. Each
engine test takes ``env`` and ``clock`` (pytest-trio runs the test on the
clock it is handed).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from chatd.adapters.bridge import open_bridge
from chatd.adapters.keys import open_keys
from chatd.adapters.memory_connection import memory_connection_pair
from chatd.adapters.memory_log import MemoryDatabase, MemoryLog
from chatd.adapters.memory_transport import MemoryBroker, MemoryTransport
from chatd.adapters.postgres import open_postgres_log
from chatd.adapters.redis_transport import open_redis_transport
from chatd.chaos import Chaos
from chatd.config import Config, ServerConfig, config_from_dict
from chatd.engine.engine import Engine, open_engine
from chatd.model import open_model
from chatd.shutdown import ShutdownClock
from chatd.tokens import TokenVerifier
from tests.client import Client

#: The asyncio bridge the suite's real adapters use: CHATD_TEST_BRIDGE runs the
#: whole suite on the other one (CI does, on one Python).
TEST_BRIDGE = os.environ.get("CHATD_TEST_BRIDGE", ServerConfig().asyncio_bridge)


@dataclass
class Running:
    """An engine running in the test's nursery, with a way to connect clients to it."""

    engine: Engine
    chaos: Chaos
    nursery: trio.Nursery
    sessions: trio.Nursery
    stop: trio.Event
    stopped: trio.Event
    clients: list[Client] = field(default_factory=list)

    async def connect(
        self, user: str | None = "alice", capacity: int = 1000, token: str | None = None
    ) -> Client:
        """A client over an in-memory connection; says hello with ``token`` (jwt mode)
        or as ``user`` (anonymous mode) unless both are None."""
        server_side, client_side = memory_connection_pair(capacity, remote=f"memory:{user}")
        self.sessions.start_soon(self.engine.run_session, server_side)
        client = Client(client_side)
        client.server_side = server_side
        self.clients.append(client)
        if token is not None:
            reply = await client.request({"op": "hello", "token": token}, "welcome")
            assert reply["type"] == "welcome", reply
        elif user is not None:
            await client.hello(user)
        return client

    async def shutdown(self) -> None:
        """The orderly shutdown (what SIGTERM does); returns once it is over."""
        self.stop.set()
        await self.stopped.wait()


@dataclass
class Env:
    kind: str
    nursery: trio.Nursery
    postgres: Any
    redis: Any
    db: MemoryDatabase = field(default_factory=MemoryDatabase)
    broker: MemoryBroker = field(default_factory=lambda: MemoryBroker(seed=7))
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def conv(self, name: str = "c") -> str:
        return f"e-{self.prefix}-{name}"

    def config(self, **sections: dict[str, Any]) -> Config:
        real = self.kind == "real"
        data: dict[str, Any] = {
            "server": {"port": 0, "hello_timeout": 5.0, "asyncio_bridge": TEST_BRIDGE},
            "postgres": {"dsn": self.postgres.dsn if real else "memory:", "command_timeout": 3.0},
            "redis": {"url": self.redis.url if real else "memory:", "command_timeout": 1.0},
            "relay": {"poll_interval": 0.3},
            "retry": {"backoff_max": 0.3},
            "model": {"fake_tokens": 20, "fake_token_rate": 100.0},
            "limits": {
                "send_rate": 0,
                "read_rate": 0,
                "frame_rate": 0,
                "replies_per_connection": 1000,
                "replies_per_user": 1000,
            },
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return config_from_dict(data)

    async def start(self, **sections: dict[str, Any]) -> Running:
        """Start an engine (another "process" on the same log and transport each call)."""
        return await self.nursery.start(self._run, self.config(**sections))

    async def _run(self, config: Config, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        chaos = Chaos(seed=3)
        shutdown = ShutdownClock(config.server.shutdown_grace)
        async with AsyncExitStack() as stack, self._adapters(config, chaos, stack) as (log, tr):
            model = await stack.enter_async_context(open_model(config.model))
            keys = await stack.enter_async_context(open_keys(config.auth))
            verifier = None
            if config.auth.mode == "jwt":
                verifier = TokenVerifier(config.auth, keys, (config.streams.assistant_user,))
            engine = await stack.enter_async_context(
                open_engine(
                    config,
                    log=log,
                    transport=tr,
                    model=model,
                    chaos=chaos,
                    shutdown=shutdown,
                    verifier=verifier,
                )
            )
            stop, stopped = trio.Event(), trio.Event()
            try:
                async with trio.open_nursery() as sessions:
                    running = Running(engine, chaos, self.nursery, sessions, stop, stopped)
                    task_status.started(running)
                    await stop.wait()
                    await engine.drain()
                    sessions.cancel_scope.deadline = shutdown.deadline_of("close")
            finally:
                stopped.set()

    @asynccontextmanager
    async def _adapters(
        self, config: Config, chaos: Chaos, stack: AsyncExitStack
    ) -> AsyncIterator[tuple[Any, Any]]:
        if self.kind == "memory":
            log = MemoryLog(self.db, chaos, timeout=config.postgres.command_timeout)
            tr = MemoryTransport(self.broker, chaos, timeout=config.redis.command_timeout)
            try:
                yield log, tr
            finally:
                log.close()
                tr.close()
            return
        bridge = await stack.enter_async_context(
            open_bridge(
                chaos,
                postgres_timeout=config.postgres.command_timeout,
                redis_timeout=config.redis.command_timeout,
                kind=config.server.asyncio_bridge,
            )
        )
        log = await stack.enter_async_context(open_postgres_log(bridge, config.postgres))
        tr = await stack.enter_async_context(open_redis_transport(bridge, config.redis))
        yield log, tr


@pytest.fixture(params=["memory", "real"])
def kind(request: Any) -> str:
    return request.param


@pytest.fixture
def clock(kind: str) -> Any:
    """An autojump mock clock for the memory engine; the real one runs in real time."""
    return trio.testing.MockClock(autojump_threshold=0) if kind == "memory" else None


@pytest.fixture
def servers(kind: str, request: Any) -> tuple[Any, Any]:
    """The suite's Postgres and Redis, started only for the real variant."""
    if kind == "real":
        return request.getfixturevalue("postgres"), request.getfixturevalue("redis_server")
    return None, None


@pytest.fixture
async def env(kind: str, nursery: trio.Nursery, servers: tuple[Any, Any]) -> AsyncIterator[Env]:
    yield Env(kind, nursery, *servers)
