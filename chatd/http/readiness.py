"""Liveness and readiness: what /healthz and /readyz answer, probed in the background.

A load balancer polls /readyz often; answering each poll with fresh calls to
Postgres and Redis would let it spend the servers' time, and a poll would
wait out a dead server's deadline. So one task probes both every
``[http].readiness_interval``, each probe bounded by ``probe_timeout``, and
the endpoints answer from the last result: an outage turns /readyz 503 within
``readiness_interval + probe_timeout``.

Ready means: Postgres answers (and has every migration this chatd ships),
Redis answers, the pub/sub connection that carries every delivery is live,
and the server is not draining. The probe's outbox figures feed the metrics.
The same task measures the event loop's lag (how late a timer fires), which
/healthz reports: a process whose loop answers at all is alive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from chatd.config import HttpConfig
from chatd.errors import Unavailable

if TYPE_CHECKING:
    from chatd.engine.engine import Engine

log = logging.getLogger("chatd.readiness")

#: How often the loop's lag is sampled between probes.
_LAG_TICK = 0.25


@dataclass
class Readiness:
    engine: Engine
    cfg: HttpConfig
    #: Set when a shutdown begins: readiness fails first, before the drain.
    draining: bool = False
    #: Why each backing service is not ready ("" when it is); None: not probed yet.
    postgres: str | None = None
    redis: str | None = None
    #: The last successful Postgres probe's outbox figures.
    outbox: dict[str, Any] = field(default_factory=dict)
    #: The largest lag of the event loop over the last probe interval, seconds.
    loop_lag: float = 0.0
    probes: int = 0
    _was_ready: bool | None = None

    def reasons(self) -> list[str]:
        """Why this process should not get new clients; empty when it is ready."""
        out = []
        if self.draining:
            out.append("draining: the server is shutting down")
        for name, state in (("postgres", self.postgres), ("redis", self.redis)):
            if state is None:
                out.append(f"{name}: not probed yet")
            elif state:
                out.append(f"{name}: {state}")
        if self.redis == "" and not self.engine.hub.bus_healthy:
            out.append("redis: the pub/sub connection is down (no deliveries)")
        return out

    @property
    def ready(self) -> bool:
        return not self.reasons()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe until cancelled; the first probe has run when this has started."""
        await self.probe()
        task_status.started()
        while True:
            await self._watch_lag(self.cfg.readiness_interval)
            await self.probe()

    async def probe(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_postgres)
            nursery.start_soon(self._probe_redis)
        self.probes += 1
        ready = self.ready
        if ready != self._was_ready:
            if ready:
                log.info("ready")
            elif self._was_ready is None or self.draining:  # starting, or stopping: expected
                log.info("not ready: %s", "; ".join(self.reasons()))
            else:
                log.warning("not ready: %s", "; ".join(self.reasons()))
            self._was_ready = ready

    async def _probe_postgres(self) -> None:
        with trio.move_on_after(self.cfg.probe_timeout):
            try:
                stats = await self.engine.log.stats()
            except Unavailable as exc:
                self.postgres = exc.message
                return
            self.outbox = stats
            pending = stats.get("migrations_pending", 0)
            self.postgres = f"{pending} migration(s) not applied" if pending else ""
            return
        self.postgres = f"no answer within {self.cfg.probe_timeout:g}s"

    async def _probe_redis(self) -> None:
        with trio.move_on_after(self.cfg.probe_timeout):
            try:
                await self.engine.transport.ping()
            except Unavailable as exc:
                self.redis = exc.message
                return
            self.redis = ""
            return
        self.redis = f"no answer within {self.cfg.probe_timeout:g}s"

    async def _watch_lag(self, seconds: float) -> None:
        end = trio.current_time() + seconds
        worst = 0.0
        while (now := trio.current_time()) < end:
            tick = min(_LAG_TICK, end - now)
            await trio.sleep(tick)
            worst = max(worst, trio.current_time() - now - tick)
        self.loop_lag = worst
