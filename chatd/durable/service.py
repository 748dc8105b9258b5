"""The Durable Streams service: the store, and live readers woken by chatd's fan-out.

A live read (long-poll or SSE) takes a :meth:`Streams.ticket` for its stream
before it reads, and waits on it when it found nothing new. A ticket is set
when the stream changes:

* here, at once, by the append (or close, or delete) that changed it;
* in every other chatd process, through the transport: the change is
  published (batched, by this service's publisher task) on the stream's
  channel, which the hub routes back here;
* everywhere, when the transport may have lost something: when this process's
  subscription to the stream's channel is confirmed (a change published
  before it was live would be missed), and when pub/sub reconnects.

A woken reader reads the store again, so a wake can be lost or repeated
without losing or repeating data: the store is the truth, the transport only
says "look again". Readers never poll Postgres.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from chatd.config import DurableConfig
from chatd.durable.model import Append, AppendPlan, Create, DSError, StreamRow
from chatd.engine.hub import DURABLE_CHANNEL as CHANNEL
from chatd.errors import StoreError, StoreUnavailable, Unavailable
from chatd.ports import StreamStore, Transport

log = logging.getLogger("chatd.durable")

#: Wakes waiting to be published; past it they are dropped (readers in other
#: processes then see the change at their next wake or timeout, never lose it).
_PUBLISH_QUEUE = 10_000
_WAKE = '{"type":"wake"}'
#: Appends committed together at most.
_BATCH = 256
#: A stream's channel stays subscribed this long after its last live reader.
_LINGER = 10.0
_Pending = tuple[str, Append, "trio.MemorySendChannel[AppendPlan | Exception]"]


def _answer(answer: trio.MemorySendChannel[AppendPlan | Exception], result: object) -> None:
    try:
        answer.send_nowait(result)  # type: ignore[arg-type]
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the request is gone (its client left)


class Streams:
    """Owned by :func:`open_streams`."""

    def __init__(
        self,
        store: StreamStore,
        transport: Transport,
        cfg: DurableConfig,
        publish: trio.MemorySendChannel[str],
        appends: trio.MemorySendChannel[_Pending],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self._transport = transport
        self._publish = publish
        self._appends = appends
        self.batches = 0
        #: Wall-clock seconds: TTLs and Stream-Expires-At are wall-clock times.
        self.now = clock
        self._tickets: dict[str, trio.Event] = {}
        self._readers: dict[str, int] = {}
        #: Streams with no live reader left: since when (their channel lingers).
        self._idle: dict[str, float] = {}
        self.appends = 0
        self.wakes_sent = 0
        self.wakes_received = 0
        self.wakes_dropped = 0

    # -- writes ---------------------------------------------------------------

    async def create(self, path: str, req: Create) -> tuple[bool, StreamRow]:
        created, row = await self.store.create(path, req, self.now())
        if created:
            self._changed(path)
        return created, row

    async def append(self, path: str, req: Append) -> AppendPlan:
        """Append through the group commit; the plan once it is durable."""
        answer_send, answer_receive = trio.open_memory_channel[AppendPlan | Exception](1)
        try:
            self._appends.send_nowait((path, req, answer_send))
        except trio.ClosedResourceError:
            raise StoreUnavailable("the server is shutting down") from None
        result = await answer_receive.receive()
        if isinstance(result, Exception):
            raise result
        if result.changed:
            self._changed(path)
        return result

    async def delete(self, path: str) -> None:
        await self.store.delete(path, self.now())
        self._changed(path)

    def _changed(self, path: str) -> None:
        self._wake(path)
        try:
            self._publish.send_nowait(path)
        except trio.WouldBlock:
            self.wakes_dropped += 1

    # -- reads (a Source of chatd.durable.reads) --------------------------------

    async def read(
        self, path: str, pos: int | None, max_bytes: int
    ) -> tuple[StreamRow, list[tuple[int, int, bytes]]]:
        return await self.store.read(path, pos, max_bytes, self.now())

    async def head(self, path: str) -> StreamRow:
        return await self.store.head(path, self.now())

    @property
    def live_readers(self) -> int:
        return sum(self._readers.values())

    def status(self) -> dict[str, int]:
        return {
            "durable_appends": self.appends,
            "durable_append_batches": self.batches,
            "durable_live_readers": self.live_readers,
            "durable_wakes_sent": self.wakes_sent,
            "durable_wakes_received": self.wakes_received,
            "durable_wakes_dropped": self.wakes_dropped,
        }

    def ticket(self, path: str) -> trio.Event:
        """Set at the next change of ``path`` (take it before reading)."""
        event = self._tickets.get(path)
        if event is None:
            event = self._tickets[path] = trio.Event()
        return event

    @asynccontextmanager
    async def reading(self, path: str) -> AsyncIterator[None]:
        """A live reader of ``path`` is here: its channel is subscribed while any is."""
        count = self._readers.get(path, 0)
        self._readers[path] = count + 1
        if count == 0 and self._idle.pop(path, None) is None:
            self._transport.want(CHANNEL + path)
        try:
            yield
        finally:
            self._readers[path] -= 1
            if self._readers[path] == 0:
                del self._readers[path]
                # Kept a while: a long-poll client asks again at once, and a
                # SUBSCRIBE per request would cost Redis and a wake each time.
                self._idle[path] = trio.current_time()

    async def _unsubscriber(self) -> None:
        """Drop the channels of streams nobody has read live for ``_LINGER`` seconds."""
        while True:
            await trio.sleep(_LINGER / 2)
            cutoff = trio.current_time() - _LINGER
            for path in [p for p, since in self._idle.items() if since <= cutoff]:
                del self._idle[path]
                self._transport.unwant(CHANNEL + path)
                self._tickets.pop(path, None)

    def _wake(self, path: str) -> None:
        event = self._tickets.pop(path, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        tickets, self._tickets = self._tickets, {}
        for event in tickets.values():
            event.set()

    # -- tasks ------------------------------------------------------------------

    async def _committer(self, incoming: trio.MemoryReceiveChannel[_Pending]) -> None:
        """Appends waiting together commit together: one transaction, one crossing."""
        try:
            async for first in incoming:
                batch = [first]
                while len(batch) < _BATCH:
                    try:
                        batch.append(incoming.receive_nowait())
                    except trio.WouldBlock:
                        break
                results: list[AppendPlan | DSError] | list[Exception]
                try:
                    results = await self.store.append_many(
                        [(p, r) for p, r, _ in batch], self.now()
                    )
                except (Unavailable, StoreError) as exc:
                    results = [exc] * len(batch)
                except Exception:
                    # A bug must not end the service (and the server): this batch
                    # is refused, the next one is tried afresh.
                    log.exception("durable streams: a batch of appends failed")
                    results = [StoreError("internal error; nothing was stored")] * len(batch)
                self.batches += 1
                self.appends += len(batch)
                for (_, _, answer), result in zip(batch, results, strict=True):
                    _answer(answer, result)
        finally:
            # Every pending request is answered, on every path.
            while True:
                try:
                    *_, answer = incoming.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                _answer(answer, StoreUnavailable("the server is shutting down"))

    async def _receive(self, wakes: trio.MemoryReceiveChannel[str]) -> None:
        """Wakes the hub routes here: a path, or "" when anything may have been missed."""
        async for path in wakes:
            self.wakes_received += 1
            if path:
                self._wake(path)
            else:
                self._wake_all()

    async def _publisher(self, outgoing: trio.MemoryReceiveChannel[str]) -> None:
        """Publish changes to the other processes, every path waiting in one call."""
        async for first in outgoing:
            paths = {first}
            while True:
                try:
                    paths.add(outgoing.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await self._transport.publish_events([(CHANNEL + p, _WAKE) for p in paths])
                self.wakes_sent += len(paths)
            except Unavailable as exc:
                # Readers elsewhere resync when their pub/sub comes back.
                self.wakes_dropped += len(paths)
                log.debug("wakes not published: %s", exc)

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(self.cfg.expiry_sweep_interval)
            try:
                gone = await self.store.sweep(self.now())
            except Unavailable as exc:
                log.warning("expired streams not swept: %s", exc)
                continue
            if gone:
                log.info("deleted %d expired streams", gone)


@asynccontextmanager
async def open_streams(
    store: StreamStore,
    transport: Transport,
    cfg: DurableConfig,
    wakes: trio.MemoryReceiveChannel[str],
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Streams]:
    """Run the service for the duration of the block. ``wakes``: what the hub routes here."""
    publish_send, publish_receive = trio.open_memory_channel[str](_PUBLISH_QUEUE)
    # Unbounded in the channel, bounded in practice by HTTP connections.
    appends_send, appends_receive = trio.open_memory_channel[_Pending](math.inf)
    streams = Streams(store, transport, cfg, publish_send, appends_send, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(streams._committer, appends_receive, name="durable committer")
        nursery.start_soon(streams._receive, wakes, name="durable wakes")
        nursery.start_soon(streams._publisher, publish_receive, name="durable publisher")
        nursery.start_soon(streams._sweeper, name="durable expiry")
        nursery.start_soon(streams._unsubscriber, name="durable unsubscriber")
        yield streams
        appends_send.close()
        nursery.cancel_scope.cancel()
