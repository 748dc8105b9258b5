"""Supervised embedded servers: one that dies is restarted on its port, with backoff.

``serve()`` runs :meth:`EmbeddedWatch.run` when ``chatd serve`` started its own
PostgreSQL and Redis. A dead server is noticed within a poll interval and
started again on the same port, so the DSNs the pools and clients hold stay
valid and the engine's own recovery (pool reconnects, pub/sub resync, the
relay's sweep) takes it from there. Restarts are logged, counted and shown
in ``/status`` and the metrics. Each restart spawns the process from Trio's
thread, the main one (so it still dies with chatd), and waits for it to
answer in a worker thread.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import trio

from chatd.backoff import Backoff
from chatd.errors import ServiceStartError

if TYPE_CHECKING:
    from chatd.embedded import EmbeddedServices
    from chatd.embedded.postgres import PostgresServer
    from chatd.embedded.redis import RedisServer

log = logging.getLogger("chatd.embedded")

#: How often the processes are checked.
POLL = 0.5


class EmbeddedWatch:
    def __init__(self, services: EmbeddedServices) -> None:
        self._services = services
        #: Restarts by server ("postgres", "redis"), and which are down now.
        self.restarts: Counter[str] = Counter()
        self.down: set[str] = set()

    @property
    def servers(self) -> dict[str, PostgresServer | RedisServer]:
        out: dict[str, PostgresServer | RedisServer] = {}
        if self._services.postgres is not None:
            out["postgres"] = self._services.postgres
        if self._services.redis is not None:
            out["redis"] = self._services.redis
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for name, server in self.servers.items():
                nursery.start_soon(self._watch, name, server)
            task_status.started()

    async def _watch(self, name: str, server: PostgresServer | RedisServer) -> None:
        while True:
            await trio.sleep(POLL)
            proc = server.proc
            if proc is None or proc.poll() is None:
                continue
            self.down.add(name)
            log.warning(
                "embedded %s exited (code %s): restarting it on port %d",
                name,
                proc.returncode,
                server.port,
            )
            await self._restart(name, server)
            self.down.discard(name)
            self.restarts[name] += 1
            log.warning("embedded %s is back on port %d", name, server.port)

    async def _restart(self, name: str, server: PostgresServer | RedisServer) -> None:
        backoff = Backoff(0.5, 5.0)
        while True:
            try:
                server.spawn(server.port)  # in this (the main) thread: see the module doc
                await trio.to_thread.run_sync(server.wait_ready, abandon_on_cancel=True)
                return
            except (ServiceStartError, OSError) as exc:
                log.warning("embedded %s did not restart: %s", name, str(exc).splitlines()[0])
            await backoff.sleep()
