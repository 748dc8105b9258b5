"""A chatd "process" inside the simulation: the whole engine on the memory adapters.

Every process of a run shares one :class:`MemoryDatabase` (Postgres's twin)
and one :class:`MemoryBroker` (Redis's twin) and runs in the same Trio run,
on its mock clock. A crash loses the process's memory and keeps the log: its
gates break for good (nothing it still does reaches the database or the
broker), its client connections drop, and its tasks are cancelled.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import trio

from chatd.adapters.keys import StaticKey
from chatd.adapters.memory_connection import MemoryConnection, memory_connection_pair
from chatd.adapters.memory_log import MemoryDatabase, MemoryLog
from chatd.adapters.memory_transport import MemoryBroker, MemoryTransport
from chatd.chaos import Chaos
from chatd.config import AuthConfig, Config
from chatd.engine.engine import Engine, open_engine
from chatd.entropy import new_rng
from chatd.identity import Identity
from chatd.model import open_model
from chatd.ports import ConnectionGone
from chatd.shutdown import ShutdownClock
from chatd.tokens import TokenVerifier, mint
from tests.client import Client


class SimProcess:
    """One engine with its own chaos gates, log handle and transport client."""

    def __init__(self, config: Config, db: MemoryDatabase, broker: MemoryBroker) -> None:
        self.config = config
        self.chaos = Chaos(seed=new_rng().getrandbits(32))
        self.log = MemoryLog(db, self.chaos, timeout=config.postgres.command_timeout)
        self.transport = MemoryTransport(broker, self.chaos, timeout=config.redis.command_timeout)
        self.engine: Engine | None = None
        self.crashed = False
        self._scope = trio.CancelScope()
        self._sessions: trio.Nursery | None = None
        self._conns: list[MemoryConnection] = []
        #: Called with the server side of each connection the engine closes.
        self.on_close: Callable[[MemoryConnection], None] | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The process's life; returns when it crashes (or its nursery is cancelled)."""
        cfg = self.config
        with self._scope:
            async with AsyncExitStack() as stack:
                model = await stack.enter_async_context(open_model(cfg.model))
                self.engine = await stack.enter_async_context(
                    open_engine(
                        cfg,
                        log=self.log,
                        transport=self.transport,
                        model=model,
                        chaos=self.chaos,
                        shutdown=ShutdownClock(cfg.server.shutdown_grace),
                        verifier=_verifier(cfg),
                    )
                )
                self._sessions = await stack.enter_async_context(trio.open_nursery())
                task_status.started(self)
                await trio.sleep_forever()

    async def connect(self, user: str, grants: dict[str, str] | None = None) -> Client:
        """A client of this process over an in-memory connection, said hello as
        ``user`` with a token granting ``grants`` (default: every conversation
        of the simulation, read and write)."""
        if self.crashed or self.engine is None or self._sessions is None:
            raise ConnectionGone(1006, "the process is gone")
        # A small window, as a socket's buffers: a client that stops reading
        # fills it quickly, and the server's send queue then grows.
        server_side, client_side = memory_connection_pair(8, remote=f"memory:{user}")
        self._conns.append(server_side)
        closing = server_side.aclose

        async def _aclose(code: int, reason: str) -> None:
            await closing(code, reason)
            if self.on_close is not None:
                self.on_close(server_side)

        server_side.aclose = _aclose  # type: ignore[method-assign]
        self._sessions.start_soon(self.engine.run_session, server_side)
        client = Client(client_side)
        if self.config.auth.mode == "jwt":
            key = json.dumps(grants if grants is not None else _EVERY_CONV, sort_keys=True)
            answer = await client.request(
                {"op": "hello", "token": _token(self.config.auth, user, key)}, "welcome"
            )
            assert answer["type"] == "welcome", answer
        else:
            await client.hello(user)
        return client

    async def crash(self) -> None:
        """Lose the process: no more writes, connections cut, every task cancelled."""
        if self.crashed:
            return
        self.crashed = True
        for component in ("postgres", "redis"):
            self.chaos.break_for(component, float("inf"))
        self.log.close()
        self.transport.close()
        for conn in self._conns:
            await conn.abort()
        self._scope.cancel()

    def cut_off(self, seconds: float) -> None:
        """A pause, as the rest of the system sees it: no call of this process gets
        through for ``seconds`` (its leases lapse; what it sends meanwhile fails)."""
        for component in ("postgres", "redis"):
            self.chaos.break_for(component, seconds)


#: What every simulated client but the intruder may do: read and write every
#: conversation of a run (their ids start with "fz-").
_EVERY_CONV = {"fz-*": "rw"}


def _verifier(cfg: Config) -> TokenVerifier | None:
    if cfg.auth.mode != "jwt":
        return None
    return _RememberingVerifier(cfg.auth, StaticKey(cfg.auth.secret), (cfg.streams.assistant_user,))


#: Identities verified so far, by token, across runs (see _RememberingVerifier).
_VERIFIED: dict[str, Identity] = {}


class _RememberingVerifier(TokenVerifier):
    """The real verifier, run once per token of the whole exploration.

    Every run says hello three times or more with the same few tokens (minted
    once per user and grants, valid for a day): verifying each again was a
    tenth of an empty run. A token's identity does not change while it is
    valid, and the verifier itself is proved in tests/test_tokens.py; a
    token it refuses is refused every time (refusals are not remembered).
    """

    async def verify(self, token: str) -> Identity:
        known = _VERIFIED.get(token)
        if known is None:
            known = _VERIFIED[token] = await super().verify(token)
        return known


@functools.cache
def _token(auth: AuthConfig, user: str, grants_json: str) -> str:
    # Minted once per user and grants, valid for a day of wall-clock time
    # (PyJWT checks ``exp`` against it): a run takes milliseconds.
    return mint(auth, user, convs=json.loads(grants_json), ttl=86400)
