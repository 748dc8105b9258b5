"""Interleavings as programs: steps, their strategies, and the interpreter.

A program is a list of steps, printed as Python (``Send(c=0, conv=1)``), so a
failing interleaving that Hypothesis shrank can be pasted into an
``@example`` in ``fuzz/test_interleavings.py`` and replayed.

The interpreter runs a program against a real chatd (``serve()``) with real
PostgreSQL and Redis, then heals everything, waits for the system to settle,
and checks the invariants of ``docs/invariants.md``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.lowlevel
from hypothesis import strategies as st

from chatd.config import Config
from chatd.embedded import PostgresServer, RedisServer
from chatd.server import Server, serve
from tests.client import Client
from tests.conftest import wait_until
from tests.faults import Faults, Watcher, check_durable, check_outbox_drains

CLIENTS = 3
CONVS = 2


def _step(cls: type) -> type:
    """Dataclass whose repr is a constructor call (readable, replayable)."""
    cls = dataclass(frozen=True)(cls)

    def __repr__(self: Any) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__dataclass_fields__)
        return f"{type(self).__name__}({args})"

    cls.__repr__ = __repr__  # type: ignore[assignment]
    return cls


@_step
class Send:
    """Client ``c`` sends a new message to ``conv`` (retrying with the same id until acked)."""

    c: int
    conv: int


@_step
class Resend:
    """Client ``c`` sends the ``k``-th earlier message again (same id): a duplicate."""

    c: int
    k: int


@_step
class Reply:
    """Client ``c`` sends a message asking for a reply of ``tokens`` tokens; ``fail_at``:
    the model fails after that many tokens."""

    c: int
    conv: int
    tokens: int
    fail_at: int | None = None


@_step
class Stop:
    """Client ``c`` stops the latest reply in ``conv``."""

    c: int
    conv: int


@_step
class Reconnect:
    """Watcher ``c`` drops its connection and resubscribes with its cursor and offsets."""

    c: int


@_step
class Break:
    """Open the chaos gate of ``component`` for ``ms`` milliseconds (not waiting)."""

    component: str
    ms: int


@_step
class Slow:
    """Delay every call to ``component`` by ``latency_ms`` for ``ms`` milliseconds."""

    component: str
    ms: int
    latency_ms: int


@_step
class Heal:
    """Close every chaos gate."""


@_step
class Wait:
    ms: int


@_step
class KillRedis:
    """SIGKILL Redis and restart it empty (slow profile)."""


@_step
class RestartPostgres:
    """Immediate shutdown of Postgres, then restart (slow profile)."""


def steps(*, real_faults: bool = False) -> st.SearchStrategy[Any]:
    c = st.integers(0, CLIENTS - 1)
    conv = st.integers(0, CONVS - 1)
    component = st.sampled_from(["postgres", "redis"])
    options = [
        st.builds(Send, c=c, conv=conv),
        st.builds(Resend, c=c, k=st.integers(0, 20)),
        st.builds(
            Reply,
            c=c,
            conv=conv,
            tokens=st.integers(1, 30),
            fail_at=st.none() | st.integers(0, 30),
        ),
        st.builds(Stop, c=c, conv=conv),
        st.builds(Reconnect, c=c),
        st.builds(Break, component=component, ms=st.integers(50, 1500)),
        st.builds(
            Slow, component=component, ms=st.integers(100, 1500), latency_ms=st.integers(10, 1500)
        ),
        st.just(Heal()),
        st.builds(Wait, ms=st.integers(1, 400)),
    ]
    if real_faults:
        options += [st.just(KillRedis()), st.just(RestartPostgres())]
    return st.one_of(*options)


def programs(*, real_faults: bool = False, max_size: int = 14) -> st.SearchStrategy[list[Any]]:
    return st.lists(steps(real_faults=real_faults), min_size=1, max_size=max_size)


@dataclass
class _Sent:
    conv: str
    mid: str
    seq: int | None = None
    duplicate_of: int | None = None


@dataclass
class _Stream:
    conv: str
    id: str
    tokens: int
    fail_at: int | None
    stop_requested: bool = False


@dataclass
class World:
    """One run of one program: a server, its clients and what they were told."""

    srv: Server
    faults: Faults
    nursery: trio.Nursery
    run_id: str
    senders: list[Client] = field(default_factory=list)
    #: One request at a time per sending connection: the test client's
    #: request() reads replies itself, so two concurrent callers can miss theirs.
    locks: list[trio.Lock] = field(default_factory=list)
    watchers: list[Watcher] = field(default_factory=list)
    old_watchers: list[tuple[Watcher, int]] = field(default_factory=list)
    starts: dict[int, int] = field(default_factory=dict)  # id(watcher) -> cursor it started at
    sent: list[_Sent] = field(default_factory=list)
    streams: list[_Stream] = field(default_factory=list)
    redis_faults: bool = False
    _ids: itertools.count = field(default_factory=itertools.count)

    def conv(self, i: int) -> str:
        return f"fz-{self.run_id}-{i}"

    async def _client(self, user: str) -> Client:
        client = await Client.open(self.nursery, self.srv.url)
        await client.hello(user)
        return client

    async def setup(self) -> None:
        for i in range(CLIENTS):
            self.senders.append(await self._client(f"s{i}"))
            self.locks.append(trio.Lock())
            w = Watcher(await self._client(f"w{i}"), self.conv(i % CONVS))
            await w.start(self.nursery, after=0)
            self.starts[id(w)] = 0
            self.watchers.append(w)

    # -- steps ------------------------------------------------------------

    async def run(self, program: list[Any]) -> None:
        async with trio.open_nursery() as background:
            for step in program:
                await getattr(self, f"_do_{type(step).__name__}")(step, background)
                await trio.lowlevel.checkpoint()
            await self._settle_faults()

    async def _send(self, c: int, record: _Sent, reply: _Stream | None) -> None:
        client = self.senders[c]
        frame: dict[str, Any] = {"op": "send", "conv": record.conv, "id": record.mid, "text": "x"}
        if reply is not None:
            frame["reply"] = True
            frame["text"] = f"#tokens={reply.tokens} #rate=100" + (
                f" #fail@{reply.fail_at}" if reply.fail_at is not None else ""
            )
        with trio.fail_after(60):
            while True:
                async with self.locks[c]:
                    answer = await client.request(frame, "ack", timeout=60)
                if answer["type"] == "ack":
                    break
                assert answer["code"] == "unavailable" and answer["retryable"], answer
                await trio.sleep(0.1)
        record.seq = answer["seq"]
        if reply is not None and "stream" in answer:
            reply.id = answer["stream"]
            self.streams.append(reply)

    async def _do_Send(self, step: Send, bg: trio.Nursery) -> None:
        rec = _Sent(self.conv(step.conv), f"m{next(self._ids)}")
        self.sent.append(rec)
        bg.start_soon(self._send, step.c, rec, None)

    async def _do_Resend(self, step: Resend, bg: trio.Nursery) -> None:
        originals = [s for s in self.sent if s.duplicate_of is None]
        if not originals:
            return
        orig = originals[step.k % len(originals)]
        rec = _Sent(orig.conv, orig.mid, duplicate_of=self.sent.index(orig))
        self.sent.append(rec)
        bg.start_soon(self._send, step.c, rec, None)

    async def _do_Reply(self, step: Reply, bg: trio.Nursery) -> None:
        rec = _Sent(self.conv(step.conv), f"m{next(self._ids)}")
        self.sent.append(rec)
        stream = _Stream(rec.conv, "", step.tokens, step.fail_at)
        bg.start_soon(self._send, step.c, rec, stream)

    async def _do_Stop(self, step: Stop, bg: trio.Nursery) -> None:
        mine = [s for s in self.streams if s.conv == self.conv(step.conv)]
        if not mine:
            return
        mine[-1].stop_requested = True
        client = self.senders[step.c]
        frame = {"op": "stop", "conv": mine[-1].conv, "stream": mine[-1].id}

        async def _stop() -> None:
            async with self.locks[step.c]:
                reply = await client.request(frame, "stopping", timeout=30)
            assert reply["type"] == "stopping" or reply["code"] in ("unknown_stream", "unavailable")

        bg.start_soon(_stop)

    async def _do_Reconnect(self, step: Reconnect, bg: trio.Nursery) -> None:
        old = self.watchers[step.c]
        await old.client.close()
        cursor = self.starts[id(old)] + len(old.seqs)
        self.old_watchers.append((old, self.starts[id(old)]))
        offsets = {s: len(t) for s, t in old.texts.items() if s not in old.ends}
        new = Watcher(await self._client(f"w{step.c}"), old.conv)
        new.texts = {s: t for s, t in old.texts.items() if s in offsets}
        frame: dict[str, Any] = {"op": "subscribe", "conv": old.conv, "after": cursor}
        if offsets:
            frame["streams"] = offsets
        with trio.fail_after(60):
            while True:
                snap = await new.client.request(frame, "snapshot", timeout=60)
                if snap["type"] == "snapshot":
                    break
                assert snap["code"] == "unavailable", snap
                await trio.sleep(0.2)
        assert snap["recovered"] is True
        for m in snap["messages"]:
            new._message(m)
        for s in snap["streams"]:
            have = new.texts.get(s["stream"], "")
            # Resumes exactly at the offset the client had: no repeat, no hole.
            assert s["offset"] == len(have), (s, len(have))
            new.texts[s["stream"]] = have + s["text"]
            new.live.add(s["stream"])
        self.starts[id(new)] = cursor
        self.watchers[step.c] = new
        self.nursery.start_soon(new._read)

    async def _do_Break(self, step: Break, bg: trio.Nursery) -> None:
        self.redis_faults |= step.component == "redis"
        self.srv.chaos.break_for(step.component, step.ms / 1000)

    async def _do_Slow(self, step: Slow, bg: trio.Nursery) -> None:
        self.redis_faults |= step.component == "redis"
        self.srv.chaos.break_for(step.component, step.ms / 1000, latency=step.latency_ms / 1000)

    async def _do_Heal(self, step: Heal, bg: trio.Nursery) -> None:
        self.srv.chaos.heal()

    async def _do_Wait(self, step: Wait, bg: trio.Nursery) -> None:
        await trio.sleep(step.ms / 1000)

    async def _do_KillRedis(self, step: KillRedis, bg: trio.Nursery) -> None:
        self.redis_faults = True
        await self.faults.inject("redis", "kill", 0.3)

    async def _do_RestartPostgres(self, step: RestartPostgres, bg: trio.Nursery) -> None:
        await self.faults.inject("postgres", "kill", 0.3)

    async def _settle_faults(self) -> None:
        # Background sends keep retrying; gates close by themselves or here.
        await trio.sleep(0.2)
        self.srv.chaos.heal()

    # -- the invariants (docs/invariants.md) --------------------------------

    async def check(self) -> None:
        srv = self.srv
        with trio.fail_after(30):
            while srv.engine.replies.active:
                await trio.sleep(0.05)
        await check_outbox_drains(srv)  # 7
        rows_by_conv = {}
        for i in range(CONVS):
            conv = self.conv(i)
            acked = {s.mid: s.seq for s in self.sent if s.conv == conv and s.duplicate_of is None}
            rows_by_conv[conv] = await check_durable(srv, conv, acked)  # 1, 3, 8
        for s in self.sent:  # 4
            if s.duplicate_of is not None:
                assert s.seq == self.sent[s.duplicate_of].seq, f"retry of {s.mid} got a new seq"
        for st_ in self.streams:  # 2
            rows = [r for r in rows_by_conv[st_.conv] if r["client_id"] == st_.id]
            fails = st_.fail_at is not None and st_.fail_at <= st_.tokens
            if fails and not st_.stop_requested:
                assert rows == [], f"a reply that failed in the model was stored: {rows}"
                continue
            if rows:
                (row,) = rows
                assert row["role"] == "assistant"
                words = len(row["body"].split(" ")) if row["body"] else 0
                if row["status"] == "complete":
                    assert words == st_.tokens, f"incomplete reply stored as complete: {row}"
                else:
                    assert st_.stop_requested and words <= st_.tokens, row
            else:
                assert fails, f"reply {st_.id} ({st_.tokens} tokens) was never committed"
        for w in self.watchers:  # 5, 6
            rows = rows_by_conv[w.conv]
            start = self.starts[id(w)]
            expected = list(range(start + 1, len(rows) + 1))

            async def _caught_up(w: Watcher = w, n: int = len(expected)) -> bool:
                return len(w.seqs) >= n

            try:
                await wait_until(_caught_up, timeout=20)
            except trio.TooSlowError:
                pass
            assert w.seqs == expected, (
                f"watcher of {w.conv} from cursor {start} got {w.seqs}, expected {expected}"
            )
            for sid, text in w.texts.items():
                row = next((r for r in rows if r["client_id"] == sid), None)
                if row is None:
                    continue
                assert row["body"].startswith(text), f"deltas diverged from committed text of {sid}"
                # A reply followed live to its end, with Redis healthy, is complete.
                followed = sid in w.live and sid in w.ends
                if not self.redis_faults and followed and row["status"] == "complete":
                    assert text == row["body"], f"deltas of {sid} missed text without any fault"
        for w, start in self.old_watchers:  # 5: what a client got before leaving
            assert w.seqs == list(range(start + 1, start + 1 + len(w.seqs))), (
                f"watcher from cursor {start} got {w.seqs} before reconnecting"
            )
        # 7: no leaked feeds, sessions or reply tasks.
        assert set(srv.engine.hub.feeds) <= {self.conv(i) for i in range(CONVS)}
        with trio.fail_after(10):
            while len(srv.engine.sessions) != 2 * CLIENTS:
                await trio.sleep(0.05)
        with trio.move_on_after(10):  # a finished reply may still be publishing its end
            while srv.engine.replies.running:
                await trio.sleep(0.05)
        assert srv.engine.replies.running == 0, "no reply task is left"


async def run_program(
    config: Config, pg: PostgresServer, redis: RedisServer, program: list[Any], run_id: str
) -> None:
    """Run one interleaving end to end and check every invariant."""
    async with trio.open_nursery() as nursery:
        srv = await nursery.start(serve, config)
        world = World(srv, Faults(srv, pg, redis), nursery, run_id)
        try:
            await world.setup()
            await world.run(program)
            await world.check()
        finally:
            for c in world.senders + [w.client for w in world.watchers]:
                await c.close()
            nursery.cancel_scope.cancel()
