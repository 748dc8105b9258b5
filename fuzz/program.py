"""Interleavings as programs: steps, their strategies, and the interpreter.

A program is a list of steps, printed as Python (``Send(c=0, conv=1)``), so a
failing interleaving that Hypothesis shrank can be pasted into an
``@example`` in ``fuzz/test_interleavings.py`` and replayed.

The interpreter runs a program against a real chatd (``serve()``) with real
PostgreSQL and Redis, and a second chatd process sharing them (started when a
step first needs it: ``fuzz/peer.py``), then heals everything, waits for the
system to settle, and checks the invariants of ``docs/invariants.md``
(``fuzz/invariants.py``).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
from hypothesis import strategies as st

from chatd.config import Config
from chatd.embedded import PostgresServer, RedisServer
from chatd.server import Server, serve
from fuzz.invariants import check
from fuzz.peer import Peer, peer_toml
from tests.client import Client
from tests.faults import Faults, Watcher

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
class PeerReply:
    """A client of the peer process asks for a reply in ``conv`` (20 tokens/s, so a kill or
    pause lands mid-stream); watched from the chatd under test."""

    conv: int
    tokens: int


@_step
class KillPeer:
    """SIGKILL the peer process (a supervisor restarts it; its clients retry there)."""


@_step
class PausePeer:
    """SIGSTOP the peer for ``ms`` milliseconds, then SIGCONT (not waiting): past the
    lease, its replies are taken over and it must be fenced when it wakes."""

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
        st.builds(PeerReply, conv=conv, tokens=st.integers(1, 40)),
        st.just(KillPeer()),
        st.builds(PausePeer, ms=st.integers(100, 2500)),
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
    #: A Resend of it was issued (without "reply": it may commit first).
    resent: bool = False


@dataclass
class _Stream:
    conv: str
    id: str
    tokens: int
    fail_at: int | None
    stop_requested: bool = False
    on_peer: bool = False


@dataclass
class World:
    """One run of one program: a server, its clients and what they were told."""

    srv: Server
    faults: Faults
    peer: Peer
    nursery: trio.Nursery
    run_id: str
    #: Every reply ends within this many seconds once the faults are over.
    bound: float
    #: Connected on first use (``_sender``): most programs use one or two of them.
    senders: list[Client | None] = field(default_factory=list)
    #: One request at a time per sending connection: the test client's
    #: request() reads replies itself, so two concurrent callers can miss theirs.
    locks: list[trio.Lock] = field(default_factory=list)
    watchers: list[Watcher] = field(default_factory=list)
    old_watchers: list[tuple[Watcher, int]] = field(default_factory=list)
    starts: dict[int, int] = field(default_factory=dict)  # id(watcher) -> cursor it started at
    sent: list[_Sent] = field(default_factory=list)
    streams: list[_Stream] = field(default_factory=list)
    redis_faults: bool = False
    #: Redis restarted empty (partials and tails gone).
    redis_lost: bool = False
    postgres_restarts: int = 0
    #: Pages of paged catch-ups clients followed (snapshots with ``more``).
    pages: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    def conv(self, i: int) -> str:
        return f"fz-{self.run_id}-{i}"

    def convs(self) -> list[str]:
        return [self.conv(i) for i in range(CONVS)]

    @property
    def others(self) -> int:
        """Connections to the server besides the senders and the watchers."""
        return 0

    def all_watchers(self) -> list[Watcher]:
        return self.watchers + [w for w, _ in self.old_watchers]

    def may_interrupt(self, s: _Stream) -> bool:
        """Whether a fault could have taken ``s`` from its process (committed ``interrupted``)."""
        if self.postgres_restarts:
            return True  # every lease may lapse
        if s.on_peer:
            return bool(self.peer.kills or self.peer.pauses)
        return self.srv.engine.replies.custody.fenced > 0

    async def _client(self, user: str) -> Client:
        client = await Client.open(self.nursery, self.srv.url)
        await client.hello(user)
        return client

    async def setup(self, program: list[Any]) -> None:
        if any(isinstance(step, (PeerReply, KillPeer, PausePeer)) for step in program):
            # Up before the first step: a kill or pause then lands where the
            # program says, not on a process still starting.
            await self.peer.url_when_up()
        for i in range(CLIENTS):
            self.senders.append(None)
            self.locks.append(trio.Lock())
            w = Watcher(await self._client(f"w{i}"), self.conv(i % CONVS))
            await w.start(self.nursery, after=0)
            self.starts[id(w)] = 0
            self.watchers.append(w)

    async def _sender(self, c: int) -> Client:
        """Sender ``c``, connected on its first use; call with ``locks[c]`` held."""
        client = self.senders[c]
        if client is None:
            client = self.senders[c] = await self._client(f"s{c}")
        return client

    def connected(self) -> list[Client]:
        """Every connection the program made and still holds (senders, watchers)."""
        return [c for c in self.senders if c is not None] + [w.client for w in self.watchers]

    # -- steps ------------------------------------------------------------

    async def run(self, program: list[Any]) -> None:
        async with trio.open_nursery() as background:
            for step in program:
                await getattr(self, f"_do_{type(step).__name__}")(step, background)
                await trio.lowlevel.checkpoint()
            await self._settle_faults()

    async def _send(self, c: int, record: _Sent, reply: _Stream | None) -> None:
        frame: dict[str, Any] = {"op": "send", "conv": record.conv, "id": record.mid, "text": "x"}
        if reply is not None:
            frame["reply"] = True
            frame["text"] = f"#tokens={reply.tokens} #rate=100" + (
                f" #fail@{reply.fail_at}" if reply.fail_at is not None else ""
            )
        with trio.fail_after(60):
            while True:
                async with self.locks[c]:
                    client = await self._sender(c)
                    answer = await client.request(frame, "ack", timeout=60)
                if answer["type"] == "ack":
                    break
                assert answer["code"] == "unavailable" and answer["retryable"], answer
                await trio.sleep(0.1)
        record.seq = answer["seq"]
        if reply is not None and "stream" in answer:
            reply.id = answer["stream"]
            self.streams.append(reply)
        elif reply is not None:
            # Even when a first try's answer was lost and this retry is a
            # duplicate, the process that answered it owes the reply; unless a
            # Resend (which asks for none) committed the message first.
            assert record.resent, f"{record.mid} asked for a reply; acked without: {answer}"

    async def _do_Send(self, step: Send, bg: trio.Nursery) -> None:
        rec = _Sent(self.conv(step.conv), f"m{next(self._ids)}")
        self.sent.append(rec)
        bg.start_soon(self._send, step.c, rec, None)

    async def _do_Resend(self, step: Resend, bg: trio.Nursery) -> None:
        originals = [s for s in self.sent if s.duplicate_of is None]
        if not originals:
            return
        orig = originals[step.k % len(originals)]
        orig.resent = True
        rec = _Sent(orig.conv, orig.mid, duplicate_of=self.sent.index(orig))
        self.sent.append(rec)
        bg.start_soon(self._send, step.c, rec, None)

    async def _do_Reply(self, step: Reply, bg: trio.Nursery) -> None:
        rec = _Sent(self.conv(step.conv), f"m{next(self._ids)}")
        self.sent.append(rec)
        stream = _Stream(rec.conv, "", step.tokens, step.fail_at)
        bg.start_soon(self._send, step.c, rec, stream)

    async def _do_PeerReply(self, step: PeerReply, bg: trio.Nursery) -> None:
        rec = _Sent(self.conv(step.conv), f"m{next(self._ids)}")
        self.sent.append(rec)
        stream = _Stream(rec.conv, "", step.tokens, None, on_peer=True)
        frame = {
            "op": "send",
            "conv": rec.conv,
            "id": rec.mid,
            "reply": True,
            "text": f"#tokens={step.tokens} #rate=20",
        }

        async def _ask() -> None:
            answer = await self.peer.request(frame, "ack")
            assert answer["type"] == "ack", answer
            rec.seq = answer["seq"]
            if "stream" in answer:  # not on a retry whose first try was committed
                stream.id = answer["stream"]
                self.streams.append(stream)

        bg.start_soon(_ask)

    async def _do_KillPeer(self, step: KillPeer, bg: trio.Nursery) -> None:
        await self.peer.kill()

    async def _do_PausePeer(self, step: PausePeer, bg: trio.Nursery) -> None:
        bg.start_soon(self.peer.pause, step.ms / 1000)

    async def _do_Stop(self, step: Stop, bg: trio.Nursery) -> None:
        mine = [s for s in self.streams if s.conv == self.conv(step.conv) and not s.on_peer]
        if not mine:
            return
        mine[-1].stop_requested = True
        frame = {"op": "stop", "conv": mine[-1].conv, "stream": mine[-1].id}

        async def _stop() -> None:
            async with self.locks[step.c]:
                client = await self._sender(step.c)
                reply = await client.request(frame, "stopping", timeout=30)
            assert reply["type"] == "stopping" or reply["code"] in ("unknown_stream", "unavailable")

        bg.start_soon(_stop)

    async def _do_Reconnect(self, step: Reconnect, bg: trio.Nursery) -> None:
        old = self.watchers[step.c]
        await old.client.close()
        cursor = self.starts[id(old)] + len(old.seqs)
        self.old_watchers.append((old, self.starts[id(old)]))
        # What it holds, taken once: the old reader may still take frames the
        # closed connection had buffered (a stalled one does) while we connect.
        texts = {s: t for s, t in old.texts.items() if s not in old.ends}
        offsets = {s: len(t) for s, t in texts.items()}
        new = Watcher(await self._client(f"w{step.c}"), old.conv)
        new.texts = texts
        frame: dict[str, Any] = {"op": "subscribe", "conv": old.conv, "after": cursor}
        if offsets:
            frame["streams"] = offsets
        with trio.fail_after(60):
            while True:
                snap = await new.client.request(frame, "snapshot", timeout=60)
                if snap["type"] != "snapshot":
                    assert snap["code"] == "unavailable", snap
                    await trio.sleep(0.2)
                    continue
                assert snap["recovered"] is True
                for m in snap["messages"]:
                    new._message(m)
                if not snap.get("more"):
                    break
                # A page of a catch-up too large for one snapshot: not
                # subscribed yet; the next page starts after the last seq got.
                self.pages += 1
                frame = {**frame, "after": cursor + len(new.seqs)}
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
        self.redis_faults = self.redis_lost = True
        await self.faults.inject("redis", "kill", 0.3)

    async def _do_RestartPostgres(self, step: RestartPostgres, bg: trio.Nursery) -> None:
        self.postgres_restarts += 1
        await self.faults.inject("postgres", "kill", 0.3)

    async def _settle_faults(self) -> None:
        # Background sends keep retrying; gates close by themselves or here.
        await trio.sleep(0.2)
        self.srv.chaos.heal()
        await self.peer.settled()

    async def check(self) -> None:
        await check(self)


async def run_program(
    config: Config, pg: PostgresServer, redis: RedisServer, program: list[Any], run_id: str
) -> None:
    """Run one interleaving end to end and check every invariant."""
    streams = config.streams
    # Replies end within lease + sweep once their owner is gone; the rest is a
    # 40-token reply still generating when the faults end, and its commit.
    bound = streams.lease + streams.takeover_interval + 5.0
    with tempfile.TemporaryDirectory(prefix="chatd-fuzz-peer-") as tmp:
        conf = Path(tmp) / "peer.toml"
        conf.write_text(peer_toml(streams.lease, streams.takeover_interval))
        async with trio.open_nursery() as nursery:
            srv = await nursery.start(serve, config)
            peer = Peer(nursery, conf, pg.dsn, redis.url)
            world = World(srv, Faults(srv, pg, redis), peer, nursery, run_id, bound)
            try:
                await world.setup(program)
                await world.run(program)
                await world.check()
            except BaseException:
                if peer.started:  # shown with the failure (pytest's captured stdout)
                    print(f"-- the peer's log (last lines):\n{peer.log_tail()}")
                raise
            finally:
                await peer.close()
                for c in world.connected():
                    await c.close()
                nursery.cancel_scope.cancel()
