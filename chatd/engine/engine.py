"""The engine assembled: its services, the channels between them, and its shutdown.

:func:`open_engine` composes the services over a :class:`~chatd.ports.Log`
and a :class:`~chatd.ports.Transport`. The data flow is the two channels
created here:

* ``fresh``: committer → relay, each commit's new outbox rows (the relay
  reports back with :meth:`Committer.mark_published`);
* ``control``: hub → replies, control messages from other processes.

A client connection is served by :meth:`Engine.run_session` in the caller's
task. :meth:`Engine.drain` is the orderly shutdown, bounded by the shutdown
clock's deadline: take no new work from clients (what they still send is
answered ``unavailable``: retry elsewhere), answer every send in flight,
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
from chatd.durable.conversations import Conversations, open_conversations
from chatd.durable.service import Streams, open_streams
from chatd.engine.access import Access, open_access
from chatd.engine.committer import Committer, open_committer
from chatd.engine.gate import Gate
from chatd.engine.hub import Hub, open_hub
from chatd.engine.ops import Services
from chatd.engine.relay import Relay, open_relay
from chatd.engine.replies import Replies, open_replies
from chatd.engine.session import Session, SessionCounters
from chatd.errors import Unavailable
from chatd.limits import RefusalLog
from chatd.model import Model
from chatd.ports import Connection, Log, StreamStore, Transport
from chatd.protocol import Limits
from chatd.records import OutboxEvent
from chatd.shutdown import ShutdownClock
from chatd.tokens import TokenVerifier

log = logging.getLogger("chatd.engine")

#: Control messages waiting for the replies service.
_CONTROL_QUEUE = 256
#: Durable stream wakes from the transport waiting for the streams service.
_DURABLE_WAKES = 10_000


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
    access: Access
    gate: Gate
    shutdown: ShutdownClock
    #: Durable Streams ([durable]), when the server has a store for them.
    streams: Streams | None = None
    #: Conversations read as Durable Streams (with ``streams``).
    conversations: Conversations | None = None
    sessions: set[Session] = field(default_factory=set)
    counters: SessionCounters = field(default_factory=SessionCounters)

    def __post_init__(self) -> None:
        cfg = self.config
        self._limits = Limits(cfg.server.max_text_chars, cfg.store.history_max)
        self.refusals = RefusalLog(log, cfg.limits.logged_refusals_per_minute)
        self._services = Services(
            log=self.log,
            hub=self.hub,
            committer=self.committer,
            replies=self.replies,
            transport=self.transport,
            access=self.access,
            identify=self.gate.identify,
            status=self.status,
            refusals=self.refusals,
            history_slots=trio.Semaphore(cfg.limits.history_in_flight),
            page_bytes=cfg.store.page_bytes,
        )

    async def run_session(self, conn: Connection) -> None:
        """Serve one client connection until it ends (in the caller's task).

        A bug in one session never stops the server: it is logged and that
        client is closed with 1011.
        """
        cfg = self.config
        session = Session(
            conn,
            self._services,
            cfg.server,
            self._limits,
            cfg.limits,
            self.shutdown,
            self.counters,
        )
        self.sessions.add(session)
        try:
            await session.run()
        except* Exception as group:
            log.error("session of %s crashed", session.user or conn.remote, exc_info=group)
            self.counters.crashed += 1
            with self.shutdown.shield(1.0, "close"):
                await conn.aclose(1011, "internal error")
        finally:
            self.sessions.discard(session)

    async def drain(self) -> None:
        """The orderly shutdown of every session and reply, by the shutdown's deadline."""
        self.shutdown.begin()
        with trio.move_on_at(self.shutdown.deadline) as scope:
            for s in list(self.sessions):
                s.stop_taking_work()
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
            "duplicate_sends": self.committer.duplicates,
            "isolated_bad_messages": self.committer.isolated,
            "published": self.relay.fresh_published,
            "relayed": self.relay.published,
            "publish_failures": self.relay.publish_failures,
            "publish_overflows": self.committer.publish_overflows,
            "pubsub_connects": self.hub.pubsub_connects,
            "gap_fills": self.hub.counters.gap_fills,
            "stream_fills": self.hub.counters.stream_fills,
            "resyncs": self.hub.counters.resyncs,
            "joins_queued": self.hub.loader.queued,
            "join_batches": self.hub.loader.counters.batches,
            "join_loads": self.hub.loader.counters.loads,
            "join_queue_peak": self.hub.loader.counters.queue_peak,
            "slow_disconnects": self.counters.slow_disconnects,
            "hello_timeouts": self.counters.hello_timeouts,
            "dead_peers": self.counters.dead_peers,
            "expired_tokens": self.counters.expired_tokens,
            "revoked_subscriptions": self.counters.revoked_subscriptions,
            "sessions_crashed": self.counters.crashed,
            "throttled_reads": self.counters.throttled,
            "refusals": dict(self.refusals.counts),
            "handshakes_refused": dict(self.gate.refused),
            **self.replies.status(),
            **(self.streams.status() if self.streams is not None else {}),
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
    verifier: TokenVerifier | None = None,
    streams: StreamStore | None = None,
) -> AsyncIterator[Engine]:
    """Run the engine's services for the duration of the block.

    Leaving the block (sessions must be gone) stops them in reverse order:
    replies, hub, relay, committer, each within the shutdown's deadline.
    """
    fresh_send, fresh_receive = trio.open_memory_channel[list[OutboxEvent]](
        config.relay.publish_queue
    )
    control_send, control_receive = trio.open_memory_channel[str](_CONTROL_QUEUE)
    wake_send, wake_receive = trio.open_memory_channel[str](_DURABLE_WAKES)
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
        open_hub(
            log,
            transport,
            config.store,
            config.retry,
            control=control_send,
            checkpoints=config.streams.persistence == "checkpoint",
            durable=wake_send if streams is not None else None,
        ) as hub,
        _maybe_streams(streams, transport, config, wake_receive) as durable,
        _maybe_conversations(durable, log, hub) as conversations,
        open_access(log, config.auth) as access,
        open_replies(
            config.streams,
            config.retry,
            limits=config.limits,
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
        reserved = (config.streams.assistant_user,)
        gate = Gate(config.server, config.auth, config.limits, verifier, reserved)
        yield Engine(
            config,
            chaos,
            log,
            transport,
            committer,
            relay,
            hub,
            replies,
            access,
            gate,
            shutdown,
            durable,
            conversations,
        )


@asynccontextmanager
async def _maybe_conversations(
    streams: Streams | None, log: Log, hub: Hub
) -> AsyncIterator[Conversations | None]:
    if streams is None:
        yield None
        return
    async with open_conversations(log, hub) as conversations:
        yield conversations


@asynccontextmanager
async def _maybe_streams(
    store: StreamStore | None,
    transport: Transport,
    config: Config,
    wakes: trio.MemoryReceiveChannel[str],
) -> AsyncIterator[Streams | None]:
    if store is None or not config.durable.enabled:
        yield None
        return
    async with open_streams(store, transport, config.durable, wakes) as streams:
        yield streams
