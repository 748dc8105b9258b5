"""A simulated run of one program: the fuzzer's World on :class:`SimProcess` engines.

The steps, the clients and what they were told are :class:`fuzz.program.World`'s
own; only the system under them differs (``sim/system.py``), plus faults the
memory adapters can inject and real servers cannot on demand: pub/sub
messages lost or late, subscriptions confirmed late, Redis restarting empty,
commit answers lost after the commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio
from hypothesis import strategies as st

from chatd.adapters.memory_connection import MemoryConnection
from chatd.adapters.memory_log import MemoryDatabase
from chatd.adapters.memory_transport import MemoryBroker
from fuzz.program import CLIENTS, CONVS, Break, Reconnect, Send, Slow, World, _step
from fuzz.program import steps as fuzz_steps
from sim import intruder as intr
from sim.system import SimPeer, SimServer
from tests.client import Client


@_step
class LosePubsub:
    """For ``ms``, each pub/sub message is lost with probability ``pct`` %."""

    pct: int
    ms: int


@_step
class DelayPubsub:
    """For ``ms``, every pub/sub message reaches its subscribers ``delay_ms`` late
    (in order: a slow network or a busy Redis; nothing is lost)."""

    delay_ms: int
    ms: int


@_step
class LateConfirms:
    """For ``ms``, each SUBSCRIBE takes effect (and is confirmed) ``delay_ms`` late,
    as when the command reaches Redis late: what is published meanwhile does
    not reach that subscriber."""

    delay_ms: int
    ms: int


@_step
class RestartRedis:
    """Redis restarts empty: partials, reply metadata and subscriptions are gone."""


@_step
class LoseAnswers:
    """For ``ms``, each Postgres answer is lost with probability ``pct`` % after the
    statement ran: the caller sees an outage, the write happened."""

    pct: int
    ms: int


@_step
class Stall:
    """Watcher ``c`` stops reading for ``ms``; if the server closed it as a slow
    consumer meanwhile (4008), it reconnects with its cursor, as a client would."""

    c: int
    ms: int


@_step
class Burst:
    """Client ``c`` sends ``n`` messages to ``conv`` at once (a catch-up then pages)."""

    c: int
    conv: int
    n: int


@_step
class Intrude:
    """The intruder tries ``op`` on conversation ``conv`` (sim/intruder.py): its token
    lets it read conversation 0 only; it may be a member of others, read only."""

    conv: int
    op: str


@_step
class Member:
    """The intruder is a member of conversation ``conv`` (read only) for ``ms``: it
    subscribes, then the membership is revoked (not waiting, as ``Break``)."""

    conv: int
    ms: int


def steps() -> st.SearchStrategy[Any]:
    # Of every 11 steps, 5 the fuzzer's, 5 faults only the memory adapters can
    # inject, 1 the intruder's: enough to catch the access bugs planted
    # (sim/mutations.py) without thinning the faults that the other bugs need.
    fuzz, faults = fuzz_steps(), _faults()
    intruder = st.one_of(
        st.builds(
            Intrude,
            conv=st.integers(0, CONVS - 1),
            op=st.sampled_from(intr.READ_OPS + intr.WRITE_OPS),
        ),
        st.builds(Member, conv=st.integers(1, CONVS - 1), ms=st.integers(0, 1500)),
    )
    return st.one_of(*[fuzz] * 5, *[faults] * 5, intruder)


def _faults() -> st.SearchStrategy[Any]:
    c = st.integers(0, CLIENTS - 1)
    return st.one_of(
        st.builds(LosePubsub, pct=st.integers(10, 100), ms=st.integers(50, 1500)),
        st.builds(DelayPubsub, delay_ms=st.integers(1, 500), ms=st.integers(50, 1500)),
        st.builds(LateConfirms, delay_ms=st.integers(1, 2500), ms=st.integers(50, 1500)),
        st.just(RestartRedis()),
        st.builds(LoseAnswers, pct=st.integers(10, 100), ms=st.integers(50, 1500)),
        st.builds(Stall, c=c, ms=st.integers(50, 1500)),
        st.builds(Burst, c=c, conv=st.integers(0, CONVS - 1), n=st.integers(2, 25)),
    )


def programs(max_size: int = 14) -> st.SearchStrategy[list[Any]]:
    return st.lists(steps(), min_size=1, max_size=max_size)


@dataclass
class SimWorld(World):
    """The fuzzer's World on simulated processes sharing one memory database and broker."""

    db: MemoryDatabase | None = None
    broker: MemoryBroker | None = None
    #: The chatd under test lost Postgres for a while (its lease may have lapsed).
    postgres_faults: bool = False
    #: Watchers the server closed as slow consumers (and that reconnected).
    slow_drops: int = 0
    #: Connected on the first step that needs it.
    intruder: intr.Intruder | None = None
    _dropped: list[MemoryConnection] = field(default_factory=list)
    _drop_seen: trio.Event = field(default_factory=trio.Event)
    _resumed: trio.Event = field(default_factory=trio.Event)
    _reconnecting: list[trio.Lock] = field(
        default_factory=lambda: [trio.Lock() for _ in range(CLIENTS)]
    )

    @property
    def sim_srv(self) -> SimServer:
        assert isinstance(self.srv, SimServer)
        return self.srv

    @property
    def sim_peer(self) -> SimPeer:
        assert isinstance(self.peer, SimPeer)
        return self.peer

    async def _client(self, user: str) -> Client:
        return await self.sim_srv.process.connect(user)

    async def _do_Break(self, step: Break, bg: trio.Nursery) -> None:
        self.postgres_faults |= step.component == "postgres"
        await super()._do_Break(step, bg)

    async def _do_Slow(self, step: Slow, bg: trio.Nursery) -> None:
        self.postgres_faults |= step.component == "postgres"
        await super()._do_Slow(step, bg)

    @staticmethod
    def _knob(bg: trio.Nursery, obj: Any, name: str, value: float, ms: int) -> None:
        """Set a memory server's fault knob for ``ms``, then back to 0."""
        setattr(obj, name, value)

        async def _restore() -> None:
            await trio.sleep(ms / 1000)
            setattr(obj, name, 0.0)

        bg.start_soon(_restore)

    async def _do_LosePubsub(self, step: LosePubsub, bg: trio.Nursery) -> None:
        assert self.broker is not None
        self.redis_faults = True
        self._knob(bg, self.broker, "drop_rate", step.pct / 100, step.ms)

    # Neither loses anything the engine cannot recover (a confirmation is the
    # engine's cue to re-read), so both leave redis_faults off: a reply
    # followed live to its end must still arrive whole.
    async def _do_DelayPubsub(self, step: DelayPubsub, bg: trio.Nursery) -> None:
        assert self.broker is not None
        self._knob(bg, self.broker, "delay", step.delay_ms / 1000, step.ms)

    async def _do_LateConfirms(self, step: LateConfirms, bg: trio.Nursery) -> None:
        assert self.broker is not None
        self._knob(bg, self.broker, "confirm_delay", step.delay_ms / 1000, step.ms)

    async def _do_RestartRedis(self, step: RestartRedis, bg: trio.Nursery) -> None:
        assert self.broker is not None
        self.redis_faults = self.redis_lost = True
        self.broker.restart()

    async def _do_LoseAnswers(self, step: LoseAnswers, bg: trio.Nursery) -> None:
        assert self.db is not None
        self.postgres_faults = True
        self._knob(bg, self.db, "answer_loss", step.pct / 100, step.ms)

    async def _do_Stall(self, step: Stall, bg: trio.Nursery) -> None:
        w = self.watchers[step.c]
        conn = w.client.ws
        resume_at = trio.current_time() + step.ms / 1000
        reading = conn.get_message

        async def _stalled() -> Any:
            await trio.sleep_until(resume_at)
            return await reading()

        conn.get_message = _stalled
        await trio.sleep(step.ms / 1000)
        conn.get_message = reading

    # -- clients the server closed as slow consumers ---------------------------

    def on_close(self, server_side: MemoryConnection) -> None:
        # 4008 when the send queue overflowed, an abort (1006) when a write
        # was not taken within [limits].write_timeout.
        self._dropped.append(server_side)
        self._drop_seen.set()

    async def resume_dropped(self) -> None:
        """A watcher the server closed (a slow consumer) reconnects with its
        cursor, as a client does (runs for the whole run)."""
        while True:
            await self._drop_seen.wait()
            self._drop_seen = trio.Event()
            while self._dropped:
                conn = self._dropped.pop(0)
                for c in range(CLIENTS):
                    # Under the watcher's lock: a Reconnect step in progress
                    # (it closed this connection itself) replaces the watcher first.
                    async with self._reconnecting[c]:
                        if self.watchers[c].client.ws._server is not conn:
                            continue
                        self.slow_drops += 1
                        await trio.sleep(0.01)  # it reads what came before the close
                        await super()._do_Reconnect(Reconnect(c=c), self.nursery)
            self._resumed.set()

    async def quiet(self) -> None:
        """Until no dropped watcher is waiting to reconnect."""
        while self._dropped:
            self._resumed = trio.Event()
            await self._resumed.wait()

    async def _do_Reconnect(self, step: Reconnect, bg: trio.Nursery) -> None:
        async with self._reconnecting[step.c]:
            await super()._do_Reconnect(step, bg)

    async def _do_Burst(self, step: Burst, bg: trio.Nursery) -> None:
        for _ in range(step.n):
            await self._do_Send(Send(c=step.c, conv=step.conv), bg)

    # -- the intruder (sim/intruder.py) -----------------------------------------

    @property
    def others(self) -> int:
        return int(self.intruder is not None and not self.intruder.gone)

    async def _intruder(self) -> intr.Intruder:
        if self.intruder is None:
            granted = self.conv(0)
            client = await self.sim_srv.process.connect(intr.USER, {granted: "r"})
            self.intruder = intr.Intruder(client, granted)
            self.nursery.start_soon(self.intruder.read)
            await self.intruder.attempt(granted, "subscribe")
        return self.intruder

    async def _do_Intrude(self, step: Intrude, bg: trio.Nursery) -> None:
        intruder = await self._intruder()
        await intruder.attempt(self.conv(step.conv), step.op)

    async def _do_Member(self, step: Member, bg: trio.Nursery) -> None:
        assert self.db is not None
        intruder = await self._intruder()
        conv = self.conv(step.conv)
        if intruder.member_since(conv) is None:
            # As `chatd grant` writes it (an operator's change, not the engine's).
            self.db.members[(conv, intr.USER)] = "r"
            intruder.memberships.setdefault(conv, []).append([trio.current_time(), None])
        await intruder.attempt(conv, "subscribe")

        async def _revoke() -> None:
            await trio.sleep(step.ms / 1000)
            if intruder.member_since(conv) is not None:
                assert self.db is not None
                self.db.members.pop((conv, intr.USER), None)
                intruder.memberships[conv][-1][1] = trio.current_time()

        bg.start_soon(_revoke)

    async def _settle_faults(self) -> None:
        await super()._settle_faults()
        assert self.broker is not None and self.db is not None
        self.broker.drop_rate = 0.0
        self.db.answer_loss = 0.0

    async def check(self) -> None:
        from sim.invariants import check

        await check(self)
