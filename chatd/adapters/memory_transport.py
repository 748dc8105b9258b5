"""The :class:`~chatd.ports.Transport` in memory: Redis's twin for fast tests.

:class:`MemoryBroker` is the server (shared by every "process" of a test):
channels, the replies' partials and metadata with TTLs on Trio's clock.
:class:`MemoryTransport` is one process's client with its one subscription.
Like Redis pub/sub it is at most once: a message published to a channel
nobody is subscribed to right now is gone, and :meth:`MemoryBroker.restart`
empties everything and cuts every subscription, which the next ``receive``
reports as an error and then re-subscribes, confirming each channel. The
contract tests (``tests/test_contract_transport.py``) run against both.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson
import trio

from chatd.chaos import Chaos
from chatd.errors import BusUnavailable
from chatd.records import BusMessage, InFlight, LaneOp, join_events

_CONTROL = "\x00control"


class MemoryBroker:
    """The shared state: who is subscribed to what, and the keys."""

    def __init__(self, *, seed: int | None = None) -> None:
        #: Each channel's subscribers, in the order they subscribed (a dict as an
        #: ordered set: delivery, and the draws of ``rng`` it makes, must not
        #: follow memory addresses, or a seeded run would depend on its process).
        self.subscribers: dict[str, dict[MemoryTransport, None]] = {}
        #: conv -> stream -> (metadata JSON); conv -> expiry of that hash.
        self.streams: dict[str, dict[str, str]] = {}
        self.streams_expire: dict[str, float] = {}
        #: (conv, stream) -> (partial text, expiry).
        self.partials: dict[tuple[str, str], tuple[str, float]] = {}
        #: (conv, stream) -> expiry: replies taken over (their old owner may not publish).
        self.seized: dict[tuple[str, str], float] = {}
        #: Share of published messages lost on the way to a subscriber (a fault
        #: for simulations). Redis loses pub/sub messages only by losing the
        #: subscriber's connection (its output buffer over the limit, the
        #: network): a lost message cuts that subscriber, which notices on its
        #: next ``receive`` and re-subscribes.
        self.drop_rate = 0.0
        #: Seconds each message takes to reach a subscriber (a slow network or a
        #: busy Redis). A connection stays in order, as TCP keeps it: nothing
        #: overtakes a confirmation or an earlier message.
        self.delay = 0.0
        #: Extra seconds before a SUBSCRIBE takes effect (the command reaches
        #: Redis late): what is published meanwhile is not delivered to it, and
        #: its confirmation comes when it takes effect.
        self.confirm_delay = 0.0
        self.rng = random.Random(seed)

    def publish(self, chan: str, msg: BusMessage) -> None:
        for t in list(self.subscribers.get(chan, ())):
            if self.drop_rate and self.rng.random() < self.drop_rate:
                t._cut()
                continue
            t._arrive(msg)

    def restart(self) -> None:
        """Redis restarted empty: every key and subscription is gone."""
        self.streams.clear()
        self.streams_expire.clear()
        self.partials.clear()
        self.seized.clear()
        everyone = dict.fromkeys(t for subs in self.subscribers.values() for t in subs)
        for t in everyone:
            t._cut()

    # Keys expire lazily, on access, like Redis's own passive expiry.

    def partial(self, conv: str, stream: str) -> str | None:
        item = self.partials.get((conv, stream))
        if item is None:
            return None
        if item[1] <= trio.current_time():
            del self.partials[(conv, stream)]
            return None
        return item[0]

    def meta(self, conv: str) -> dict[str, str]:
        if conv in self.streams and self.streams_expire.get(conv, 0) <= trio.current_time():
            del self.streams[conv]
            self.streams_expire.pop(conv, None)
        return self.streams.get(conv, {})


class MemoryTransport:
    """One process's client of a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, chaos: Chaos, *, timeout: float = 2.0) -> None:
        self.broker = broker
        self._chaos = chaos
        self._timeout = timeout
        self._wanted: set[str] = set()
        self.subscribed: set[str] = set()
        self._connected = False
        self._broken = False
        #: (when it reaches this client, message), in arrival order.
        self._inbox: deque[tuple[float, BusMessage]] = deque()
        self._last_at = 0.0
        #: Channels subscribed to but not in effect yet: when they take effect.
        self._activating: dict[str, float] = {}
        self._wakeup = trio.Event()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await self._chaos.call_at_once(("redis",), self._timeout, lambda: fn(*args))

    # -- publishing -------------------------------------------------------

    async def publish_events(self, events: Sequence[tuple[str, str]]) -> None:
        await self._call(self._publish_events, list(events))

    def _publish_events(self, events: list[tuple[str, str]]) -> None:
        by_conv: dict[str, list[str]] = {}
        for conv, payload in events:
            by_conv.setdefault(conv, []).append(payload)
        for conv, payloads in by_conv.items():
            self.broker.publish(conv, BusMessage("message", conv, join_events(payloads)))

    async def publish(self, conv: str, data: str) -> None:
        await self._call(self.broker.publish, conv, BusMessage("message", conv, data))

    async def publish_control(self, data: str) -> None:
        await self._call(self.broker.publish, _CONTROL, BusMessage("control", "", data))

    async def ping(self) -> bool:
        return await self._call(lambda: True)

    # -- the token lane -----------------------------------------------------

    async def lane(self, ops: Sequence[LaneOp], ttl: int) -> list[int]:
        return await self._call(self._lane, list(ops), ttl)

    def _lane(self, ops: list[LaneOp], ttl: int) -> list[int]:
        results = [self._lane_op(op, ttl, op.expect_bytes < 0) for op in ops]
        for i, r in enumerate(results):
            if r == -1:  # what Redis holds is not what the caller thinks: rewrite it whole
                results[i] = self._lane_op(ops[i], ttl, True)
        return results

    def _lane_op(self, op: LaneOp, ttl: int, rewrite: bool) -> int:
        b = self.broker
        key = (op.conv, op.stream)
        if op.meta and b.seized.get(key, 0) > trio.current_time():
            return -2  # taken over: only its end goes through
        if rewrite:
            text = op.whole()
        else:
            have = b.partial(op.conv, op.stream) or ""
            if len(have.encode()) != op.expect_bytes:
                return -1
            text = have + op.text
        expires = trio.current_time() + ttl
        if op.meta:
            b.partials[key] = (text, expires)
            b.meta(op.conv)  # drop the hash first if it expired, as Redis would
            b.streams.setdefault(op.conv, {})[op.stream] = op.meta
            b.streams_expire[op.conv] = expires
            size = len(text.encode())
        else:
            b.partials.pop(key, None)
            b.meta(op.conv).pop(op.stream, None)
            size = 0
        for frame in op.frames:
            b.publish(op.conv, BusMessage("message", op.conv, frame))
        return size

    async def read_streams(self, convs: Sequence[str]) -> list[list[InFlight]]:
        return await self._call(lambda: [self._read_streams(c) for c in convs])

    def _read_streams(self, conv: str) -> list[InFlight]:
        out = []
        for stream, meta in self.broker.meta(conv).items():
            try:
                parsed = orjson.loads(meta)
            except orjson.JSONDecodeError:
                continue
            out.append(InFlight(stream, parsed, self.broker.partial(conv, stream) or ""))
        return out

    async def read_partial(self, conv: str, stream: str) -> str | None:
        return await self._call(self.broker.partial, conv, stream)

    async def seize_partial(self, conv: str, stream: str, ttl: int) -> str | None:
        def _seize() -> str | None:
            self.broker.seized[(conv, stream)] = trio.current_time() + ttl
            return self.broker.partial(conv, stream)

        return await self._call(_seize)

    async def stream_exists(self, conv: str, stream: str) -> bool:
        return await self._call(lambda: stream in self.broker.meta(conv))

    # -- the subscription ---------------------------------------------------

    def want(self, conv: str) -> None:
        if conv not in self._wanted:
            self._wanted.add(conv)
            self._wakeup.set()

    def unwant(self, conv: str) -> None:
        self._wanted.discard(conv)

    def _arrive(self, msg: BusMessage, delay: float | None = None) -> None:
        at = trio.current_time() + (self.broker.delay if delay is None else delay)
        self._last_at = at = max(at, self._last_at)
        self._inbox.append((at, msg))
        self._wakeup.set()

    def _cut(self) -> None:
        """The server dropped this client's pub/sub connection."""
        self._drop_connection()
        self._broken = True
        self._wakeup.set()

    def _drop_connection(self) -> None:
        for subs in self.broker.subscribers.values():
            subs.pop(self, None)
        self.subscribed.clear()
        self._activating.clear()
        self._inbox.clear()
        self._last_at = 0.0
        self._connected = False

    async def receive(self, wait: float) -> list[BusMessage]:
        return await self._chaos.call(("redis",), wait + self._timeout, lambda: self._receive(wait))

    async def _receive(self, wait: float) -> list[BusMessage]:
        try:
            deadline = trio.current_time() + wait
            while True:
                if self._broken:
                    # As redis-py does: the read on a dead connection fails once;
                    # the next call starts a new connection.
                    self._broken = False
                    raise BusUnavailable("redis: ConnectionError: connection lost")
                self._sync()
                now = trio.current_time()
                out = []
                while self._inbox and self._inbox[0][0] <= now:
                    out.append(self._inbox.popleft()[1])
                if out:
                    return out
                if now >= deadline:
                    return []
                # Until the next message is due or subscription takes effect,
                # or something new arrives.
                due = min([self._inbox[0][0]] if self._inbox else [deadline])
                due = min([due, *self._activating.values()])
                with trio.move_on_at(min(due, deadline)):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
        except trio.Cancelled:
            # Abandoned mid-read (a deadline): the connection's state is unknown,
            # so it is replaced, and everything re-subscribed, next time.
            self._drop_connection()
            raise

    def _sync(self) -> None:
        b = self.broker
        if not self._connected:
            self._connected = True
            b.subscribers.setdefault(_CONTROL, {})[self] = None
        now = trio.current_time()
        for conv in self._wanted - self.subscribed - self._activating.keys():
            self._activating[conv] = now + b.confirm_delay
        for conv, at in list(self._activating.items()):
            if conv not in self._wanted:
                del self._activating[conv]
            elif at <= now:
                del self._activating[conv]
                b.subscribers.setdefault(conv, {})[self] = None
                self.subscribed.add(conv)
                self._arrive(BusMessage("subscribe", conv))
        for conv in self.subscribed - self._wanted:
            subs = b.subscribers.get(conv)
            if subs is not None:
                subs.pop(self, None)
            self.subscribed.discard(conv)

    def close(self) -> None:
        self._drop_connection()
