"""A feed: every local subscriber of one conversation, and the task that serves them.

The hub routes each of the conversation's events into the feed; the feed's
task handles membership first (joins: load the snapshot, then go live;
leaves; resyncs), then live events and reply frames
(:mod:`chatd.engine.feed_replies`), each in arrival order. Each subscription keeps ``last``, the highest seq it has been
sent; a live event is delivered only as ``last + 1``. The transport is at
most once, so a jump in seq is a gap: the feed reads the missing messages
from the log first. Every (re)subscription confirmed by the transport also
triggers a resync, closing the window between "subscribed" and "live".

Live events beyond ``_FEED_QUEUE`` waiting are not queued: the feed resyncs
from the log instead (it has every message). Joins and leaves always queue.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from chatd.backoff import Backoff
from chatd.config import RetryConfig, StoreConfig
from chatd.engine.feed_replies import ReplyFrames
from chatd.engine.loader import Loader
from chatd.errors import Unavailable
from chatd.ports import Log, Transport
from chatd.protocol import encode, error_frame
from chatd.records import InFlight, Snapshot, fit_newest, fit_oldest, message_event

log = logging.getLogger("chatd.feed")

_FILL_PAGE = 500
_FEED_QUEUE = 4096
_FEED_BURST = 256


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
class Counters:
    """What every feed of the process counts, for operators."""

    gap_fills: int = 0
    stream_fills: int = 0
    resyncs: int = 0
    #: Resyncs that failed (the log unavailable) and were retried.
    resync_retries: int = 0
    #: Replies that ended (no message) while pub/sub was cut: their followers
    #: were sent the end they missed.
    vanished_replies: int = 0
    #: Delta frames handed to clients (one per viewer per delta).
    deltas_delivered: int = 0


@dataclass
class Sub:
    client: Subscriber
    last: int
    #: The join that made it (``join.left`` once the client unsubscribed).
    join: Join
    #: Per in-flight reply, the offset this client has text up to; None once
    #: the reply is over for it (the snapshot already held the committed message).
    streams: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Join:
    client: Subscriber
    after: int | None
    ref: Any
    #: Reply id -> offset the client already holds.
    streams: dict[str, int] = field(default_factory=dict)
    #: Set by the hub, at once, when the client leaves (unsubscribed, revoked,
    #: gone): from then on it gets nothing of this join, even from a read the
    #: feed started before (its Leave is queued behind that read).
    left: bool = False


@dataclass
class Leave:
    client_id: int


@dataclass
class Event:
    seq: int
    text: str


@dataclass
class StreamFrame:
    kind: str  # stream.start, delta, stream.end, stream.error
    stream: str
    offset: int
    text: str
    raw: str
    #: stream.end only: the committed reply's seq and length (code points).
    seq: int | None = None
    length: int | None = None


@dataclass
class Ephemeral:
    user: str | None
    text: str


class Resync:
    pass


class Feed:
    """All local subscribers of one conversation; :meth:`run` is its task."""

    def __init__(
        self,
        conv: str,
        log: Log,
        transport: Transport,
        loader: Loader,
        cfg: StoreConfig,
        retry: RetryConfig,
        counters: Counters,
    ) -> None:
        self.conv = conv
        self.log = log
        self.transport = transport
        self.loader = loader
        self._cfg = cfg
        self._retry = retry
        self.counters = counters
        self.subs: dict[int, Sub] = {}
        self.needs_resync = False
        self._live: deque[Event | StreamFrame | Ephemeral] = deque()
        self._members: deque[Join | Leave | Resync] = deque()
        self._wake = trio.Event()
        self._closed = False
        #: Set while the task waits with nothing to handle.
        self._idle = trio.Event()
        self._is_idle = False
        self.replies = ReplyFrames(self)

    # -- the mailbox ------------------------------------------------------

    def put(self, item: Event | StreamFrame | Ephemeral) -> None:
        """Queue a live item; never blocks. Past the bound it becomes a resync."""
        if self._closed:
            return
        if len(self._live) >= _FEED_QUEUE:
            # Never block the router on one busy feed: the log has every message.
            self.needs_resync = True
        else:
            self._live.append(item)
        self._wake_up()

    def put_member(self, item: Join | Leave | Resync) -> None:
        """Queue a join, a leave or a resync: these always queue, and are handled
        before the live items waiting with them (the seq and offset cursors make
        that order safe; consecutive joins then share one snapshot)."""
        if self._closed:
            return
        self._members.append(item)
        self._wake_up()

    def _wake_up(self) -> None:
        if self._is_idle:
            self._is_idle = False
            self._idle = trio.Event()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Return once everything queued so far is handled."""
        await self._idle.wait()

    def close(self) -> None:
        """No subscriber is left: the task ends once it has handled what is queued."""
        self._closed = True
        self._wake.set()

    def forget(self, join: Join) -> None:
        """``join``'s client left: it is no subscriber any more, from now on."""
        sub = self.subs.get(join.client.id)
        if sub is not None and sub.join is join:
            del self.subs[join.client.id]

    def drop(self, sub: Sub) -> None:
        """The client was disconnected as too slow: it gets nothing more here."""
        self.subs.pop(sub.client.id, None)

    # -- the task ---------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            # Ended (closed, or cancelled): nothing queued will be handled any
            # more, so whoever waits for this feed to settle (an orderly
            # shutdown) must not wait on for it.
            self._is_idle = True
            self._idle.set()

    async def _serve(self) -> None:
        backoff = Backoff.of(self._retry)
        while True:
            if not self._members and not self._live:
                if self._closed:
                    return
                self._is_idle = True
                self._idle.set()
                # The retry timeout bounds only the wait, never the handling: a
                # join cut short would leave its client without a snapshot.
                with trio.move_on_after(backoff.next() if self.needs_resync else math.inf):
                    await self._wake.wait()
                self._wake = trio.Event()
            if self._members:
                members = list(self._members)
                self._members.clear()
                await self._on_members(members)
            if self._live:
                # Whatever queued meanwhile is handled without a scheduler
                # round per item (a relay batch arrives all at once).
                live = self._live
                for _ in range(min(_FEED_BURST, len(live))):
                    await self._handle(live.popleft())
            if self.needs_resync:
                if await self._resync():
                    backoff.reset()
            else:
                backoff.reset()

    async def _on_members(self, items: list[Join | Leave | Resync]) -> None:
        """In order; consecutive joins share one snapshot round trip."""
        joins: list[Join] = []
        for item in items:
            if isinstance(item, Join):
                joins.append(item)
                continue
            if joins:
                await self._on_joins(joins)
                joins = []
            if isinstance(item, Leave):
                self.subs.pop(item.client_id, None)
            else:
                self.needs_resync = True
        if joins:
            await self._on_joins(joins)

    async def _handle(self, item: Event | StreamFrame | Ephemeral) -> None:
        if type(item) is Event:
            await self._on_event(item)
        elif type(item) is StreamFrame:
            await self.replies.on_frame(item)
        else:
            assert isinstance(item, Ephemeral)
            for sub in list(self.subs.values()):
                if sub.client.user != item.user and not sub.client.deliver(item.text):
                    self.drop(sub)

    # -- joins ------------------------------------------------------------

    async def _on_joins(self, joins: list[Join]) -> None:
        # No waiting for the transport's subscription to go live: whatever commits
        # between this snapshot and the subscription's confirmation is read
        # from the log by the resync that the confirmation triggers.
        held = frozenset().union(*(j.streams for j in joins))
        try:
            loaded = await self.loader.load(self.conv, tuple(j.after for j in joins), held)
        except Unavailable as exc:
            for join in joins:
                if join.left:
                    self._answer_left(join)
                    continue
                frame = error_frame(
                    "unavailable",
                    f"cannot load conversation: {exc.message}",
                    join.ref,
                    retryable=True,
                    conv=self.conv,
                )
                join.client.deliver(encode(frame))
                join.client.subscription_failed(self.conv)
            return
        for join, snap in zip(joins, loaded.snapshots, strict=True):
            self._admit(join, snap, loaded.inflight)

    def _admit(self, join: Join, snap: Snapshot, inflight: list[InFlight]) -> None:
        """Send the snapshot and make the client a live subscriber, or, when its
        catch-up is larger than a page, send the first page and let it ask for
        the next (``more``: subscribe again from the last seq it got)."""
        if join.left:
            self._answer_left(join)  # unsubscribed while its snapshot was being read
            return
        budget = self._cfg.page_bytes
        messages = snap.messages
        paging = False
        if join.after is not None and snap.recovered:
            # Everything after the cursor, oldest first: a page at a time, so
            # "exactly once, in order" holds across pages.
            messages = fit_oldest(messages, budget)
            paging = len(messages) < len(snap.messages)
        else:
            messages = fit_newest(messages, budget)
        frame: dict[str, Any] = {
            "type": "snapshot",
            "conv": self.conv,
            "messages": messages,
            "head": snap.head,
            "recovered": snap.recovered,
        }
        if join.ref is not None:
            frame["ref"] = join.ref
        if paging:
            frame |= {"streams": [], "more": True}
            join.client.deliver(encode(frame))
            # Not live yet: the client subscribes again with the next cursor.
            join.client.subscription_failed(self.conv)
            return
        streams, have = self.replies.on_join(join, snap, inflight)
        frame["streams"] = streams
        if join.client.deliver(encode(frame)):
            self.subs[join.client.id] = Sub(join.client, snap.head, join, have)

    def _answer_left(self, join: Join) -> None:
        """Its subscribe is still owed an answer (every request gets one): the
        subscription ended before its snapshot, so no snapshot, an error."""
        if join.ref is None:
            return
        frame = error_frame(
            "unsubscribed",
            f"the subscription to {self.conv!r} ended before its snapshot "
            "(unsubscribed, or access revoked)",
            join.ref,
            conv=self.conv,
        )
        join.client.deliver(encode(frame))

    # -- messages ---------------------------------------------------------

    async def _on_event(self, ev: Event) -> None:
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
            self.counters.gap_fills += 1
            batch = [(m["seq"], encode(message_event(self.conv, m))) for m in missing]
        batch.append((ev.seq, ev.text))
        self._deliver(behind, batch)

    async def _read_range(self, after: int, upto: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while after < upto:
            page = await self.log.after(self.conv, after, min(_FILL_PAGE, upto - after))
            if not page:
                break
            out.extend(page)
            after = page[-1]["seq"]
        return out

    def _deliver(self, subs: list[Sub], batch: list[tuple[int, str]]) -> None:
        for sub in subs:
            if sub.join.left:
                continue  # left while the batch was being read
            for seq, text in batch:
                if seq == sub.last + 1:
                    if not sub.client.deliver(text):
                        self.drop(sub)
                        break
                    sub.last = seq

    async def _resync(self) -> bool:
        """Deliver everything committed beyond each subscriber's cursor; False if it failed."""
        self.needs_resync = False
        self.counters.resyncs += 1
        if not self.subs:
            return True
        # Replies subscribers follow may have ended while the transport was not
        # delivering (their end frame lost with the pub/sub connection). Which
        # are still running is read before the snapshot, so one that commits
        # in between shows as committed.
        followed = self.replies.followed()
        # Usually little or nothing is missing: the loader asks for it together
        # with every other feed resyncing now (a pub/sub reconnect, a storm of
        # new subscriptions confirmed), one round trip for all of them.
        low = min(s.last for s in self.subs.values())
        try:
            running = await self.replies.running(followed)
            loaded = await self.loader.load(self.conv, (low,), followed, streams=False)
        except Unavailable as exc:
            log.warning("resync of %s failed, retrying: %s", self.conv, exc)
            self.counters.resync_retries += 1
            self.needs_resync = True
            return False
        (snap,) = loaded.snapshots
        if snap.recovered:
            self._deliver(
                list(self.subs.values()),
                [(m["seq"], encode(message_event(self.conv, m))) for m in snap.messages],
            )
            self.replies.end_vanished(followed - running, snap.committed_streams)
            return True
        self.replies.end_vanished(followed - running, snap.committed_streams)
        # Further behind than one snapshot holds: page through the log.
        while self.subs:
            low = min(s.last for s in self.subs.values())
            try:
                page = await self.log.after(self.conv, low, _FILL_PAGE)
            except Unavailable as exc:
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
