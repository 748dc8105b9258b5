"""The hub: this process's fan-out from Redis to its local subscribers.

One reader task pumps the process's single pub/sub connection and routes each
event to the conversation's *feed*. A feed is a task (owned by the hub's
nursery) that lives while the conversation has local subscribers and handles,
strictly in order: joins (load the snapshot, then go live), live events, and
resyncs. Each subscription keeps ``last``, the highest seq it has been sent;
a live event is delivered only as ``last + 1``. Since Redis pub/sub is
at-most-once, a jump in seq is a gap: the feed reads the missing messages
from Postgres first. Every (re)subscription confirmed by Redis also triggers
a resync, closing the window between "subscribed" and "live".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import trio

from chatd.bus import Bus, InFlight
from chatd.errors import StoreUnavailable, Unavailable
from chatd.protocol import encode, error_frame
from chatd.store import Snapshot, Store, message_event

log = logging.getLogger("chatd.hub")

_FILL_PAGE = 500
_FEED_QUEUE = 4096
_FEED_BURST = 256
_STREAM_KINDS = frozenset({"stream.start", "delta", "stream.end", "stream.error"})


class Subscriber(Protocol):
    """What a feed needs from a client connection."""

    id: int
    user: str

    def deliver(self, text: str) -> bool:
        """Queue one frame without blocking; False if the client was dropped as too slow."""
        ...

    def subscription_failed(self, conv: str) -> None:
        """The subscription could not be set up (an error frame was sent); forget it."""
        ...


@dataclass
class _Sub:
    client: Subscriber
    last: int
    #: Per in-flight reply, the offset this client has text up to; None once
    #: the reply is over for it (the snapshot already held the committed message).
    streams: dict[str, int | None] = field(default_factory=dict)


@dataclass
class _Join:
    client: Subscriber
    after: int | None
    ref: Any
    streams: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _StreamEv:
    kind: str  # stream.start, delta, stream.end, stream.error
    stream: str
    offset: int
    text: str
    raw: str
    #: stream.end only: the committed reply's seq and length (code points).
    seq: int | None = None
    length: int | None = None


@dataclass
class _Leave:
    client_id: int


@dataclass
class _Event:
    seq: int
    text: str


@dataclass
class _Ephemeral:
    user: str | None
    text: str


class _Resync:
    pass


class Feed:
    """All local subscribers of one conversation."""

    def __init__(self, hub: Hub, conv: str) -> None:
        self.hub = hub
        self.conv = conv
        self.subs: dict[int, _Sub] = {}
        self.members = 0
        self.needs_resync = False
        self.send, self.receive = trio.open_memory_channel[Any](_FEED_QUEUE)

    def put(self, item: Any) -> None:
        try:
            self.send.send_nowait(item)
        except trio.WouldBlock:
            # Never block the reader on one busy feed: Postgres has every message.
            self.needs_resync = True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The feed was closed (no subscribers left) or its task has already
            # stopped (shutdown: a pump result can still be routed after the
            # hub's nursery was cancelled).
            pass

    async def run(self) -> None:
        retry = 0.05
        async with self.receive:
            while True:
                item: Any = None
                # The retry timeout bounds only the wait, never the handling: a
                # join cut short would leave its client without a snapshot.
                with trio.move_on_after(retry if self.needs_resync else math.inf):
                    try:
                        item = await self.receive.receive()
                    except trio.EndOfChannel:
                        return
                if item is not None:
                    # Whatever queued meanwhile is handled without a scheduler
                    # round per item (a relay batch arrives all at once).
                    items = [item]
                    for _ in range(_FEED_BURST):
                        try:
                            items.append(self.receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self._handle_all(items)
                if self.needs_resync:
                    if await self._resync():
                        retry = 0.05
                    else:
                        retry = min(retry * 2, 2.0)

    async def _handle_all(self, items: list[Any]) -> None:
        """Handle items in order; consecutive joins share one snapshot round trip."""
        joins: list[_Join] = []
        for item in items:
            if isinstance(item, _Join):
                joins.append(item)
                continue
            if joins:
                await self._on_joins(joins)
                joins = []
            await self._handle(item)
        if joins:
            await self._on_joins(joins)

    async def _handle(self, item: Any) -> None:
        """Handle one item other than a join (see :meth:`_handle_all`)."""
        if isinstance(item, _StreamEv):
            await self._on_stream(item)
        elif isinstance(item, _Event):
            await self._on_event(item)
        elif isinstance(item, _Leave):
            self.subs.pop(item.client_id, None)
        elif isinstance(item, _Ephemeral):
            for sub in list(self.subs.values()):
                if sub.client.user != item.user:
                    sub.client.deliver(item.text)
        elif isinstance(item, _Resync):
            self.needs_resync = True

    async def _on_joins(self, joins: list[_Join]) -> None:
        # No waiting for the Redis subscription to go live: whatever commits
        # between this snapshot and the subscription's confirmation is read
        # from Postgres by the resync that the confirmation triggers.
        # In-flight replies first, then Postgres: a reply that commits in between
        # is reported as committed and dropped from the in-flight list.
        try:
            inflight = await self.hub.bus.read_streams(self.conv)
        except Unavailable as exc:
            log.debug("no in-flight replies for %s: %s", self.conv, exc)
            inflight = []
        try:
            # Replies a client says it holds part of count too: Redis may not
            # have reported them, and a committed one is over for that client.
            asked = {f.stream for f in inflight}.union(*(j.streams for j in joins))
            snaps = await self.hub.store.snapshots(
                self.conv, [j.after for j in joins], sorted(asked)
            )
        except Unavailable as exc:
            for join in joins:
                join.client.deliver(
                    encode(
                        error_frame(
                            "unavailable",
                            f"cannot load conversation: {exc.message}",
                            join.ref,
                            retryable=True,
                            conv=self.conv,
                        )
                    )
                )
                self.hub.forget(join.client, self.conv)
                join.client.subscription_failed(self.conv)
            return
        for join, snap in zip(joins, snaps, strict=True):
            self._admit(join, snap, inflight)

    def _admit(self, join: _Join, snap: Snapshot, inflight: list[InFlight]) -> None:
        """Send the snapshot and make the client a live subscriber."""
        streams: list[dict[str, Any]] = []
        # What the client says it holds counts even for replies Redis did not
        # report (it was unreachable, or restarted empty): their next deltas are
        # then filled from the client's offset, never from 0 again.
        have: dict[str, int | None] = {
            stream: None if stream in snap.committed_streams else offset
            for stream, offset in join.streams.items()
        }
        for f in inflight:
            if f.stream in snap.committed_streams:
                # Over: late deltas are ignored; the committed message is in the snapshot.
                have[f.stream] = None
                continue
            offset = join.streams.get(f.stream, 0)
            streams.append(
                {"stream": f.stream, **f.meta, "offset": offset, "text": f.text[offset:]}
            )
            have[f.stream] = max(offset, len(f.text))
        frame: dict[str, Any] = {
            "type": "snapshot",
            "conv": self.conv,
            "messages": snap.messages,
            "head": snap.head,
            "recovered": snap.recovered,
            "streams": streams,
            **join.extra,
        }
        if join.ref is not None:
            frame["ref"] = join.ref
        if join.client.deliver(encode(frame)):
            self.subs[join.client.id] = _Sub(join.client, snap.head, have)

    async def _on_event(self, ev: _Event) -> None:
        behind = [s for s in self.subs.values() if s.last < ev.seq]
        if not behind:
            return
        low = min(s.last for s in behind)
        batch: list[tuple[int, str]] = []
        if low < ev.seq - 1:
            try:
                missing = await self._read_range(low, ev.seq - 1)
            except Unavailable as exc:
                log.warning("gap fill for %s failed, will resync: %s", self.conv, exc)
                self.needs_resync = True
                return
            self.hub.gap_fills += 1
            batch = [(m["seq"], encode(message_event(self.conv, m))) for m in missing]
        batch.append((ev.seq, ev.text))
        self._deliver(behind, batch)

    async def _on_stream(self, ev: _StreamEv) -> None:
        # Deltas are deduplicated by offset per client, like messages by seq.
        if ev.kind == "delta":
            end = ev.offset + len(ev.text)
            gapped: list[_Sub] = []
            for sub in list(self.subs.values()):
                have = sub.streams.get(ev.stream, 0)
                if have is None or end <= have:
                    continue
                if ev.offset > have:
                    gapped.append(sub)
                    continue
                text = (
                    ev.raw
                    if ev.offset == have
                    else self._delta(ev.stream, have, ev.text[have - ev.offset :])
                )
                if sub.client.deliver(text):
                    sub.streams[ev.stream] = end
                else:
                    self.subs.pop(sub.client.id, None)
            if gapped:
                await self._fill_stream(ev.stream, gapped)
        elif ev.kind == "stream.start":
            for sub in list(self.subs.values()):
                if ev.stream not in sub.streams:
                    sub.streams[ev.stream] = 0
                    if not sub.client.deliver(ev.raw):
                        self.subs.pop(sub.client.id, None)
        else:  # stream.end / stream.error
            if ev.kind == "stream.end":
                await self._fill_end(ev)
            for sub in list(self.subs.values()):
                sub.streams.pop(ev.stream, None)
                if not sub.client.deliver(ev.raw):
                    self.subs.pop(sub.client.id, None)

    async def _fill_end(self, ev: _StreamEv) -> None:
        """Before ``stream.end``, send each lagging client the rest of the reply.

        Deltas lost on the way (Redis blipped near the end of the reply) leave
        nothing in Redis to fill from: the partial goes when the reply ends. The
        committed message in Postgres is the same text, so the rest comes from there.
        """
        if ev.seq is None or ev.length is None:
            return
        behind = [
            sub
            for sub in self.subs.values()
            if (have := sub.streams.get(ev.stream)) is not None and have < ev.length
        ]
        if not behind:
            return
        try:
            page = await self.hub.store.after(self.conv, ev.seq - 1, 1)
        except Unavailable as exc:
            # The message event (resync) will replace the bubble.
            log.info("could not fill the end of reply %s: %s", ev.stream, exc)
            return
        if not page or page[0]["seq"] != ev.seq or page[0]["id"] != ev.stream:
            return
        body = page[0]["text"]
        self.hub.stream_fills += 1
        for sub in behind:
            have = sub.streams.get(ev.stream)
            if have is None or have >= len(body):
                continue
            if sub.client.deliver(self._delta(ev.stream, have, body[have:])):
                sub.streams[ev.stream] = len(body)
            else:
                self.subs.pop(sub.client.id, None)

    def _delta(self, stream: str, offset: int, text: str) -> str:
        return encode(
            {"type": "delta", "conv": self.conv, "stream": stream, "offset": offset, "text": text}
        )

    async def _fill_stream(self, stream: str, subs: list[_Sub]) -> None:
        """Deltas were missed (Redis blipped): send the rest from the partial in Redis."""
        self.hub.stream_fills += 1
        try:
            partial = await self.hub.bus.read_partial(self.conv, stream)
        except Unavailable:
            partial = None
        for sub in subs:
            have = sub.streams.get(stream, 0)
            if have is None:
                continue
            if partial is None or len(partial) < have:
                # Nothing to fill from now: a later delta tries again, and
                # stream.end fills the rest from Postgres.
                continue
            if len(partial) > have:
                if not sub.client.deliver(self._delta(stream, have, partial[have:])):
                    self.subs.pop(sub.client.id, None)
                    continue
            sub.streams[stream] = len(partial)

    async def _read_range(self, after: int, upto: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while after < upto:
            page = await self.hub.store.after(self.conv, after, min(_FILL_PAGE, upto - after))
            if not page:
                break
            out.extend(page)
            after = page[-1]["seq"]
        return out

    def _deliver(self, subs: list[_Sub], batch: list[tuple[int, str]]) -> None:
        for sub in subs:
            for seq, text in batch:
                if seq == sub.last + 1:
                    if not sub.client.deliver(text):
                        self.subs.pop(sub.client.id, None)
                        break
                    sub.last = seq

    async def _resync(self) -> bool:
        """Deliver everything committed beyond each subscriber's cursor."""
        self.needs_resync = False
        while self.subs:
            low = min(s.last for s in self.subs.values())
            try:
                page = await self.hub.store.after(self.conv, low, _FILL_PAGE)
            except StoreUnavailable as exc:
                log.warning("resync of %s failed, retrying: %s", self.conv, exc)
                self.needs_resync = True
                return False
            if not page:
                return True
            self._deliver(
                list(self.subs.values()),
                [(m["seq"], encode(message_event(self.conv, m))) for m in page],
            )
            if len(page) < _FILL_PAGE:
                return True
        return True


class Hub:
    """Routes Redis events to feeds; owned by the server's nursery."""

    def __init__(self, store: Store, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        self.feeds: dict[str, Feed] = {}
        self._nursery: trio.Nursery | None = None
        self.bus_healthy = False
        self.gap_fills = 0
        self.stream_fills = 0
        self.events = 0
        #: Called with control-channel messages (e.g. stop a stream running here).
        self.on_control: Callable[[str], None] | None = None

    async def run(self, *, task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._read_loop)
            nursery.start_soon(self.bus.run_waker)
            task_status.started(self)

    # -- membership -------------------------------------------------------

    def join(
        self,
        client: Subscriber,
        conv: str,
        after: int | None,
        ref: Any,
        streams: dict[str, int] | None = None,
        **extra: Any,
    ) -> None:
        """Subscribe ``client``: it gets a snapshot (or an error), then live events."""
        feed = self.feeds.get(conv)
        if feed is None:
            assert self._nursery is not None, "hub is not running"
            feed = Feed(self, conv)
            self.feeds[conv] = feed
            self.bus.want(conv)
            self._nursery.start_soon(feed.run)
        feed.members += 1
        feed.put(_Join(client, after, ref, streams or {}, extra))

    def forget(self, client: Subscriber, conv: str) -> None:
        """Unsubscribe ``client`` (idempotent per successful join)."""
        feed = self.feeds.get(conv)
        if feed is None:
            return
        feed.put(_Leave(client.id))
        feed.members -= 1
        if feed.members <= 0:
            del self.feeds[conv]
            self.bus.unwant(conv)
            feed.send.close()

    def publish_local(self, conv: str, text: str, user: str | None) -> None:
        """Deliver an ephemeral frame to this process's subscribers of ``conv``."""
        feed = self.feeds.get(conv)
        if feed is not None:
            feed.put(_Ephemeral(user, text))

    # -- the Redis reader -------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            try:
                batch = await self.bus.pump(wait=1.0)
            except Unavailable as exc:
                log.debug("pump failed: %s", exc)
                if self.bus_healthy:
                    log.warning("pub/sub lost, live fan-out paused: %s", exc)
                self.bus_healthy = False
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if not self.bus_healthy:
                log.info("pub/sub connected")
                # Anything published while we were away is in Postgres.
                for feed in self.feeds.values():
                    feed.put(_Resync())
            self.bus_healthy = True
            backoff = 0.05
            for msg in batch:
                self._route(msg.kind, msg.conv, msg.data)

    def _route(self, kind: str, conv: str, data: str) -> None:
        if kind == "control":
            if self.on_control is not None:
                self.on_control(data)
            return
        feed = self.feeds.get(conv)
        if feed is None:
            return
        if kind == "subscribe":
            feed.put(_Resync())
            return
        # The relay sends a conversation's batch as one message, an event per line
        # (JSON text never holds a raw newline).
        for line in data.split("\n") if "\n" in data else (data,):
            self._route_event(feed, conv, line)

    def _route_event(self, feed: Feed, conv: str, data: str) -> None:
        self.events += 1
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("dropping undecodable event on %s", conv)
            return
        etype = obj.get("type")
        if etype == "message" and isinstance(obj.get("seq"), int):
            feed.put(_Event(obj["seq"], data))
        elif etype in _STREAM_KINDS and isinstance(obj.get("stream"), str):
            offset = obj.get("offset", 0)
            text = obj.get("text", "")
            if isinstance(offset, int) and isinstance(text, str):
                seq, length = obj.get("seq"), obj.get("length")
                feed.put(
                    _StreamEv(
                        etype,
                        obj["stream"],
                        offset,
                        text,
                        data,
                        seq if isinstance(seq, int) else None,
                        length if isinstance(length, int) else None,
                    )
                )
        else:
            user = obj.pop("_from", None)
            feed.put(_Ephemeral(user, encode(obj) if user is not None else data))
