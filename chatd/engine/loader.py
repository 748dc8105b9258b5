"""The loader: admission control for joins, so a storm of subscribes is a queue.

A feed whose clients join asks the loader for their snapshots
(:meth:`Loader.load`) and waits. The loader's task gathers every load queued
meanwhile, up to ``[store].join_batch`` conversations, and serves them
together: one :meth:`~chatd.ports.Transport.read_streams` call for their
replies in flight, one :meth:`~chatd.ports.Log.inflight` call for their
checkpoints (checkpoint mode), one :meth:`~chatd.ports.Log.snapshots` call
for every joining client's snapshot. At most ``[store].join_loads`` batches
run at once; the rest wait their turn in the queue, where no deadline runs
(each call keeps its own), so a thousand clients reconnecting after a
deploy cost a few round trips a second instead of a thousand concurrent
queries that time each other out, and a send never waits behind them for a
Postgres connection.

Each result goes back to the waiting feed; the feed's task delivers it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from chatd.config import StoreConfig
from chatd.errors import Unavailable
from chatd.ports import Log, Transport
from chatd.records import InFlight, Snapshot, SnapshotAsk

log = logging.getLogger("chatd.loader")


@dataclass
class Loaded:
    """What joining clients of one conversation get: its replies in flight (the
    longest known text of each) and one snapshot per client."""

    inflight: list[InFlight]
    snapshots: list[Snapshot]


@dataclass(eq=False)
class _Load:
    conv: str
    afters: tuple[int | None, ...]
    #: Reply ids the joining clients hold part of.
    held: frozenset[str]
    #: Replies in flight wanted too (joins); a resync needs only messages.
    streams: bool = True
    done: trio.Event = field(default_factory=trio.Event)
    result: Loaded | Unavailable | None = None
    #: The feed stopped waiting (cancelled): not worth loading any more.
    abandoned: bool = False


@dataclass
class LoaderCounters:
    """For operators: how joins were served."""

    loads: int = 0
    batches: int = 0
    #: Most loads that waited in the queue at once.
    queue_peak: int = 0


def longest(*sources: list[InFlight]) -> list[InFlight]:
    """Per reply, the source that knows the most of its text."""
    best: dict[str, InFlight] = {}
    for source in sources:
        for f in source:
            if f.stream not in best or len(f.text) > len(best[f.stream].text):
                best[f.stream] = f
    return list(best.values())


class Loader:
    """Owned by :func:`open_loader`."""

    def __init__(self, log: Log, transport: Transport, cfg: StoreConfig, checkpoints: bool) -> None:
        self._log = log
        self._transport = transport
        self._cfg = cfg
        #: The log holds in-flight replies' text too (checkpoint mode).
        self._checkpoints = checkpoints
        self._queue: deque[_Load] = deque()
        self._wake = trio.Event()
        self._slots = trio.Semaphore(cfg.join_loads)
        self.counters = LoaderCounters()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def load(
        self,
        conv: str,
        afters: tuple[int | None, ...],
        held: frozenset[str],
        *,
        streams: bool = True,
    ) -> Loaded:
        """The snapshots of clients joining ``conv`` (with its replies in flight
        unless not ``streams``); raises Unavailable if the log is."""
        req = _Load(conv, afters, held, streams)
        self._queue.append(req)
        self.counters.queue_peak = max(self.counters.queue_peak, len(self._queue))
        self._wake.set()
        try:
            await req.done.wait()
        except BaseException:
            req.abandoned = True
            raise
        assert req.result is not None
        if isinstance(req.result, Unavailable):
            raise req.result
        return req.result

    async def run(self) -> None:
        async with trio.open_nursery() as batches:
            while True:
                while not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                await self._slots.acquire()
                batch: list[_Load] = []
                while self._queue and len(batch) < self._cfg.join_batch:
                    req = self._queue.popleft()
                    if not req.abandoned:
                        batch.append(req)
                if batch:
                    batches.start_soon(self._serve, batch)
                else:
                    self._slots.release()

    async def _serve(self, batch: list[_Load]) -> None:
        try:
            self.counters.batches += 1
            self.counters.loads += len(batch)
            loaded = await self._load_batch(batch)
            for req, result in zip(batch, loaded, strict=True):
                req.result = result
        except Unavailable as exc:
            for req in batch:
                req.result = exc
        finally:
            self._slots.release()
            for req in batch:
                if req.result is None:  # cancelled: shutting down
                    req.result = Unavailable("the server is shutting down")
                req.done.set()

    async def _load_batch(self, batch: list[_Load]) -> list[Loaded]:
        inflight: list[list[InFlight]] = [[] for _ in batch]
        # Replies in flight first, then the log: a reply that commits in between
        # is reported as committed by the snapshot, and dropped by the feed.
        wanted = [i for i, r in enumerate(batch) if r.streams]
        convs = [batch[i].conv for i in wanted]
        if convs:
            try:
                found = await self._transport.read_streams(convs)
            except Unavailable as exc:
                log.debug("no in-flight replies for %d conversations: %s", len(convs), exc)
                found = [[] for _ in convs]
            if self._checkpoints:
                # Redis may have lost a partial (or all of them): the checkpoint
                # holds a prefix too. Per reply, the longer of the two knows more.
                try:
                    held = await self._log.inflight(convs)
                except Unavailable as exc:
                    log.debug("no checkpoints for %d conversations: %s", len(convs), exc)
                    held = [[] for _ in convs]
                found = [longest(a, b) for a, b in zip(found, held, strict=True)]
            for i, f in zip(wanted, found, strict=True):
                inflight[i] = f
        # Replies a client says it holds part of count too: the transport may
        # not have reported them, and a committed one is over for that client.
        # Clients of one conversation reconnecting together (after a deploy)
        # mostly hold the same cursor: each distinct cursor is read once, and
        # its snapshot (never modified) serves every client that holds it.
        asks, picks = [], []
        for r, found in zip(batch, inflight, strict=True):
            slot = {after: i for i, after in enumerate(dict.fromkeys(r.afters))}
            streams = tuple(sorted({f.stream for f in found} | r.held))
            asks.append(SnapshotAsk(r.conv, tuple(slot), streams))
            picks.append([slot[after] for after in r.afters])
        snaps = await self._log.snapshots(asks, self._cfg.snapshot_messages, self._cfg.max_catchup)
        return [
            Loaded(found, [s[i] for i in pick])
            for found, s, pick in zip(inflight, snaps, picks, strict=True)
        ]


@asynccontextmanager
async def open_loader(
    log: Log, transport: Transport, cfg: StoreConfig, *, checkpoints: bool = False
) -> AsyncIterator[Loader]:
    """Serve joins' snapshots for the duration of the block."""
    loader = Loader(log, transport, cfg, checkpoints)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run, name="loader")
        yield loader
        nursery.cancel_scope.cancel()
