"""The hub: this process's fan-out from the transport to its local subscribers.

Two tasks, both owned by :func:`open_hub`'s nursery:

* the **router** reads the transport's subscription (one connection for the
  whole process) and routes each event into its conversation's
  :class:`~chatd.engine.feed.Feed`; control messages go to the ``control``
  channel (the replies service reads it);
* the **membership** task owns the feeds: it takes joins and leaves from a
  channel, starts a feed (in its own nursery) for a conversation's first
  subscriber, and closes it after the last one leaves.

Sessions call :meth:`Hub.join` and :meth:`Hub.leave`, which only queue a
request and never block: the channel is unbounded, and bounded in practice by
connections x ``[server].max_subscriptions``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from chatd.backoff import Backoff
from chatd.config import RetryConfig, StoreConfig
from chatd.engine.feed import (
    Counters,
    Ephemeral,
    Event,
    Feed,
    Join,
    Leave,
    Resync,
    StreamFrame,
    Subscriber,
)
from chatd.engine.loader import Loader, open_loader
from chatd.errors import Unavailable
from chatd.ports import Log, Transport
from chatd.protocol import encode
from chatd.records import split_events

log = logging.getLogger("chatd.hub")

#: A durable stream's transport channel is its path after this: conversation
#: ids have no "/", so the two never meet (chatd.durable.service).
DURABLE_CHANNEL = "/"

_STREAM_KINDS = frozenset({"stream.start", "delta", "stream.end", "stream.error"})
#: How long one receive waits for the first message before asking again.
_RECEIVE_WAIT = 1.0


@dataclass
class _Member:
    """A join or leave request for the membership task."""

    client: Subscriber
    conv: str
    join: Join | None  # None: leave


class Hub:
    """Owned by :func:`open_hub`."""

    def __init__(
        self,
        log: Log,
        transport: Transport,
        cfg: StoreConfig,
        retry: RetryConfig,
        control: trio.MemorySendChannel[str],
        loader: Loader,
        durable: trio.MemorySendChannel[str] | None = None,
    ) -> None:
        self._log = log
        self.loader = loader
        self._transport = transport
        self._cfg = cfg
        self._retry = retry
        self._control = control
        self._durable = durable
        self._requests, self._incoming = trio.open_memory_channel[_Member](math.inf)
        #: Conversation -> its feed; only the membership task adds and removes.
        self.feeds: dict[str, Feed] = {}
        self._members: dict[str, int] = {}
        #: (client id, conv) -> its current join, until it leaves.
        self._joins: dict[tuple[int, str], Join] = {}
        self.counters = Counters()
        self.bus_healthy = False
        self.pubsub_connects = 0

    # -- for sessions -----------------------------------------------------

    def join(
        self,
        client: Subscriber,
        conv: str,
        after: int | None,
        ref: Any,
        streams: dict[str, int] | None = None,
    ) -> None:
        """Subscribe ``client``: it gets a snapshot (or an error frame), then live events."""
        join = Join(client, after, ref, streams or {})
        self._joins[client.id, conv] = join
        self._request(_Member(client, conv, join))

    def leave(self, client: Subscriber, conv: str) -> None:
        """Unsubscribe ``client`` (once per join, failed ones included).

        It gets nothing more of ``conv`` from the moment it returns: its
        session may already have told the client so (``unsubscribed``).
        """
        join = self._joins.pop((client.id, conv), None)
        if join is not None:
            join.left = True
            feed = self.feeds.get(conv)
            if feed is not None:
                feed.forget(join)
        self._request(_Member(client, conv, None))

    def _request(self, req: _Member) -> None:
        try:
            self._requests.send_nowait(req)
        except trio.ClosedResourceError:
            pass  # shutting down: nothing is delivered any more

    # -- for replies ------------------------------------------------------

    def deliver_local(self, conv: str, raw: str) -> None:
        """Hand a reply frame straight to this process's subscribers of ``conv``.

        The copy the transport brings later is deduplicated by the feed, so a
        reply ending while Redis is down, or while this process shuts down,
        still reaches its local clients.
        """
        feed = self.feeds.get(conv)
        if feed is not None:
            self._route_event(feed, raw)

    async def wait_settled(self) -> None:
        """Return once every feed has handled what was queued (for an orderly shutdown)."""
        for feed in list(self.feeds.values()):
            await feed.wait_idle()

    # -- the membership task ------------------------------------------------

    async def _membership(self) -> None:
        async with trio.open_nursery() as feeds:
            async for req in self._incoming:
                if req.join is not None:
                    feed = self.feeds.get(req.conv)
                    if feed is None:
                        feed = self._new_feed(req.conv)
                        self.feeds[req.conv] = feed
                        self._members[req.conv] = 0
                        self._transport.want(req.conv)
                        feeds.start_soon(feed.run, name=f"feed {req.conv}")
                    self._members[req.conv] += 1
                    feed.put_member(req.join)
                    continue
                feed = self.feeds.get(req.conv)
                if feed is None:
                    continue
                feed.put_member(Leave(req.client.id))
                self._members[req.conv] -= 1
                if self._members[req.conv] <= 0:
                    del self.feeds[req.conv], self._members[req.conv]
                    self._transport.unwant(req.conv)
                    feed.close()

    def _new_feed(self, conv: str) -> Feed:
        return Feed(
            conv, self._log, self._transport, self.loader, self._cfg, self._retry, self.counters
        )

    # -- the router ---------------------------------------------------------

    async def _router(self) -> None:
        backoff = Backoff.of(self._retry)
        while True:
            try:
                batch = await self._transport.receive(_RECEIVE_WAIT)
            except Unavailable as exc:
                log.debug("receive failed: %s", exc)
                if self.bus_healthy:
                    log.warning("pub/sub lost, live fan-out paused: %s", exc)
                self.bus_healthy = False
                await backoff.sleep()
                continue
            if not self.bus_healthy:
                log.info("pub/sub connected")
                self.pubsub_connects += 1
                # Anything published while we were away is in the log.
                for feed in self.feeds.values():
                    feed.put_member(Resync())
                self._wake_durable("")
            self.bus_healthy = True
            backoff.reset()
            for msg in batch:
                self._route(msg.kind, msg.conv, msg.data)

    def _route(self, kind: str, conv: str, data: str) -> None:
        if kind == "control":
            try:
                self._control.send_nowait(data)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("control message dropped: its queue is full")
            return
        if conv.startswith(DURABLE_CHANNEL):
            # A durable stream changed (or its channel is live now): its readers look again.
            self._wake_durable(conv[len(DURABLE_CHANNEL) :])
            return
        feed = self.feeds.get(conv)
        if feed is None:
            return
        if kind == "subscribe":
            feed.put_member(Resync())
            return
        for line in split_events(data):
            self._route_event(feed, line)

    def _wake_durable(self, path: str) -> None:
        """Hand a wake to the Durable Streams service ("": every stream)."""
        if self._durable is None:
            return
        try:
            self._durable.send_nowait(path)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.warning("durable stream wake dropped: its queue is full")

    def _route_event(self, feed: Feed, data: str) -> None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("dropping undecodable event on %s", feed.conv)
            return
        etype = obj.get("type")
        if etype == "message" and isinstance(obj.get("seq"), int):
            feed.put(Event(obj["seq"], data))
        elif etype in _STREAM_KINDS and isinstance(obj.get("stream"), str):
            offset = obj.get("offset", 0)
            text = obj.get("text", "")
            if isinstance(offset, int) and isinstance(text, str):
                seq, length = obj.get("seq"), obj.get("length")
                feed.put(
                    StreamFrame(
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
            feed.put(Ephemeral(user, encode(obj) if user is not None else data))


@asynccontextmanager
async def open_hub(
    log: Log,
    transport: Transport,
    cfg: StoreConfig,
    retry: RetryConfig,
    *,
    control: trio.MemorySendChannel[str],
    checkpoints: bool = False,
    durable: trio.MemorySendChannel[str] | None = None,
) -> AsyncIterator[Hub]:
    """Route the transport's events to local subscribers for the duration of the block.

    ``checkpoints``: joining clients also get in-flight replies' text from the log.
    """
    async with (
        open_loader(log, transport, cfg, checkpoints=checkpoints) as loader,
        trio.open_nursery() as nursery,
    ):
        hub = Hub(log, transport, cfg, retry, control, loader, durable)
        nursery.start_soon(hub._membership, name="hub membership")
        nursery.start_soon(hub._router, name="hub router")
        yield hub
        hub._requests.close()
        nursery.cancel_scope.cancel()
