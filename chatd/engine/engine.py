"""The engine assembled: its services, the channels between them, and its shutdown.

:func:`open_engine` composes the services over a :class:`~chatd.ports.Log`
and a :class:`~chatd.ports.Transport`. The data flow is the two channels
created here:

* ``fresh``: committer → relay, each commit's new outbox rows (the relay
  reports back with :meth:`Committer.mark_published`);
* ``control``: hub → replies, control messages from other processes.

A client connection is served by :meth:`Engine.run_session` in the caller's
task. :meth:`Engine.drain` is the orderly shutdown, bounded by the shutdown
clock's deadline: stop reading from clients, answer every send in flight,
end every reply (its end frame reaches this process's clients too), let the
feeds settle, then close every client with 1001.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from chatd.chaos import Chaos
from chatd.config import Config
from chatd.engine.committer import Committer, open_committer
from chatd.engine.hub import Hub, open_hub
from chatd.engine.ops import Services
from chatd.engine.relay import Relay, open_relay
from chatd.engine.replies import Replies, open_replies
from chatd.engine.session import Session, SessionCounters
from chatd.errors import Unavailable
from chatd.model import Model
from chatd.ports import Connection, Log, Transport
from chatd.protocol import Limits, ProtocolError, Request
from chatd.records import OutboxEvent
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.engine")

#: Control messages waiting for the replies service.
_CONTROL_QUEUE = 256


@dataclass
class Engine:
    config: Config
    chaos: Chaos
    log: Log
    transport: Transport
    committer: Committer
    relay: Relay
    hub: Hub
    replies: Replies
    shutdown: ShutdownClock
    sessions: set[Session] = field(default_factory=set)
    counters: SessionCounters = field(default_factory=SessionCounters)

    def __post_init__(self) -> None:
        cfg = self.config
        self._limits = Limits(cfg.server.max_text_chars, cfg.store.history_max)
        self._services = Services(
            log=self.log,
            hub=self.hub,
            committer=self.committer,
            replies=self.replies,
            transport=self.transport,
            identify=self.identify,
            status=self.status,
        )

    def identify(self, req: Request) -> str:
        """Resolve a hello to a user name. Token auth plugs in here."""
        if req.get("token") is not None:
            raise ProtocolError(
                "unauthorized", "token authentication is not configured on this server", req.ref
            )
        if not self.config.server.allow_anonymous:
            raise ProtocolError(
                "unauthorized", "anonymous hello is disabled; send a token", req.ref
            )
        return req["user"]

    async def run_session(self, conn: Connection) -> None:
        """Serve one client connection until it ends (in the caller's task)."""
        session = Session(
            conn, self._services, self.config.server, self._limits, self.shutdown, self.counters
        )
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    async def drain(self) -> None:
        """The orderly shutdown of every session and reply, by the shutdown's deadline."""
        self.shutdown.begin()
        with trio.move_on_at(self.shutdown.deadline) as scope:
            for s in list(self.sessions):
                s.stop_reading()
            # The committer still runs: every send in flight gets its real outcome.
            for s in list(self.sessions):
                await s.sends_answered()
            self.replies.interrupt_all()
            await self.replies.wait_ended()
            await self.hub.wait_settled()
        if scope.cancelled_caught:
            log.warning("shutdown: draining took longer than its deadline; closing anyway")
        for s in list(self.sessions):
            s.close()

    async def status(self) -> dict[str, Any]:
        """Health of both backing services and the counters, for operators."""
        out: dict[str, Any] = {
            "postgres": "ok",
            "redis": "ok",
            "connections": len(self.sessions),
            "feeds": len(self.hub.feeds),
            "pubsub_live": self.hub.bus_healthy,
            "committed": self.committer.committed,
            "isolated_bad_messages": self.committer.isolated,
            "published": self.relay.fresh_published,
            "relayed": self.relay.published,
            "publish_failures": self.relay.publish_failures,
            "publish_overflows": self.committer.publish_overflows,
            "pubsub_connects": self.hub.pubsub_connects,
            "gap_fills": self.hub.counters.gap_fills,
            "stream_fills": self.hub.counters.stream_fills,
            "resyncs": self.hub.counters.resyncs,
            "slow_disconnects": self.counters.slow_disconnects,
            "hello_timeouts": self.counters.hello_timeouts,
            **self.replies.status(),
            "chaos": self.chaos.status(),
        }
        try:
            out.update(await self.log.stats())
        except Unavailable as exc:
            out["postgres"] = f"unavailable: {exc.message}"
        try:
            await self.transport.ping()
        except Unavailable as exc:
            out["redis"] = f"unavailable: {exc.message}"
        return out


@asynccontextmanager
async def open_engine(
    config: Config,
    *,
    log: Log,
    transport: Transport,
    model: Model,
    chaos: Chaos,
    shutdown: ShutdownClock,
) -> AsyncIterator[Engine]:
    """Run the engine's services for the duration of the block.

    Leaving the block (sessions must be gone) stops them in reverse order:
    replies, hub, relay, committer, each within the shutdown's deadline.
    """
    fresh_send, fresh_receive = trio.open_memory_channel[list[OutboxEvent]](
        config.relay.publish_queue
    )
    control_send, control_receive = trio.open_memory_channel[str](_CONTROL_QUEUE)
    async with (
        open_committer(
            log,
            config.store,
            bound=config.postgres.command_timeout + 1.0,
            fresh=fresh_send,
            shutdown=shutdown,
        ) as committer,
        open_relay(
            log, transport, config.relay, config.retry, committer=committer, fresh=fresh_receive
        ) as relay,
        open_hub(log, transport, config.store, config.retry, control=control_send) as hub,
        open_replies(
            config.streams,
            config.retry,
            context_messages=config.model.context_messages,
            log=log,
            committer=committer,
            hub=hub,
            transport=transport,
            model=model,
            shutdown=shutdown,
            control=control_receive,
        ) as replies,
    ):
        yield Engine(config, chaos, log, transport, committer, relay, hub, replies, shutdown)
