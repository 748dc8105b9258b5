"""Conversations as Durable Streams: ``/v1/conversations/<conv>``, read-only, JSON mode.

A conversation's stream holds its committed messages, each exactly the
``message`` event WebSocket subscribers receive, in seq order. Offsets follow
seqs: the offset after message ``n`` is ``offset(n)``, so a client resuming
from an offset asks Postgres for ``seq > n`` and gets every later message
once, in order — across chatd restarts too, since the offset is the seq.
Replies in progress are not in it (their tokens are transient until the
reply commits); the committed reply is.

Changes come from the hub, as for WebSocket clients: while live readers wait
on a conversation, one watcher per conversation subscribes to it like a
client and sets the readers' ticket at each message (and at its snapshot,
which closes the window between reading and subscribing).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import trio

from chatd.durable.model import DSError, StreamRow
from chatd.engine.hub import Hub
from chatd.ports import Log
from chatd.protocol import conv_error
from chatd.records import message_event

Chunk = tuple[int, int, bytes]
PREFIX = "/v1/conversations/"
#: Watchers are hub subscribers: their ids stay clear of sessions' (counted from 1).
_ids = itertools.count(1 << 48)
_WAKING = ('{"type":"message"', '{"type":"snapshot"')
#: A conversation stays joined this long after its last live reader.
_LINGER = 10.0
#: Messages one read returns at most (and the byte budget).
_PAGE = 500


class _Watcher:
    """One conversation's subscription on behalf of its live readers."""

    user = "durable-reader"

    def __init__(self) -> None:
        self.id = next(_ids)
        self.readers = 0
        self.ticket = trio.Event()

    def deliver(self, text: str) -> bool:
        if text.startswith(_WAKING):
            self.wake()
        return True

    def subscription_failed(self, conv: str) -> None:
        self.wake()  # readers read again: the log answers, or they fail

    def wake(self) -> None:
        ticket, self.ticket = self.ticket, trio.Event()
        ticket.set()


class Conversations:
    """A :class:`~chatd.durable.reads.Source` over the log and the hub."""

    def __init__(self, log: Log, hub: Hub) -> None:
        self._log = log
        self._hub = hub
        self._watchers: dict[str, _Watcher] = {}
        #: Watchers with no reader left: since when (they linger, see _LINGER).
        self._idle: dict[str, float] = {}

    async def last_seq(self, conv: str) -> int:
        """The conversation's latest seq (0: none yet)."""
        last = await self._log.history(conv, None, 1)
        return last[-1]["seq"] if last else 0

    async def head(self, path: str) -> StreamRow:
        return _row(path, await self.last_seq(path))

    async def read(
        self, path: str, pos: int | None, max_bytes: int
    ) -> tuple[StreamRow, list[Chunk]]:
        if pos is None:
            return await self.head(path), []
        msgs = await self._log.after(path, pos, _PAGE)
        chunks: list[Chunk] = []
        size = 0
        for m in msgs:
            data = orjson.dumps(message_event(path, m))
            if chunks and size + len(data) > max_bytes:
                break
            chunks.append((m["seq"] - 1, m["seq"], data))
            size += len(data)
        if not chunks:
            return await self.head(path), []
        last = chunks[-1][1]
        if len(chunks) < len(msgs) or len(msgs) == _PAGE:
            # More may follow: the tail says so (not up to date yet).
            return _row(path, max(last, await self.last_seq(path))), chunks
        return _row(path, last), chunks

    def ticket(self, path: str) -> trio.Event:
        watcher = self._watchers.get(path)
        return watcher.ticket if watcher is not None else trio.Event()

    @asynccontextmanager
    async def reading(self, path: str) -> AsyncIterator[None]:
        watcher = self._watchers.get(path)
        if watcher is None:
            watcher = self._watchers[path] = _Watcher()
            self._hub.join(watcher, path, None, None)
        self._idle.pop(path, None)
        watcher.readers += 1
        try:
            yield
        finally:
            watcher.readers -= 1
            if watcher.readers == 0:
                # Kept a while: a long-poll client asks again at once, and a
                # join per request would cost a snapshot read each time.
                self._idle[path] = trio.current_time()

    async def _sweep(self) -> None:
        """Leave the conversations nobody has read live for ``_LINGER`` seconds."""
        while True:
            await trio.sleep(_LINGER / 2)
            cutoff = trio.current_time() - _LINGER
            for path in [p for p, since in self._idle.items() if since <= cutoff]:
                del self._idle[path]
                self._hub.leave(self._watchers.pop(path), path)


@asynccontextmanager
async def open_conversations(log: Log, hub: Hub) -> AsyncIterator[Conversations]:
    """Conversations as streams, for the duration of the block (its sweep task)."""
    conversations = Conversations(log, hub)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conversations._sweep, name="conversation streams")
        yield conversations
        nursery.cancel_scope.cancel()


def conversation_id(raw: str) -> str:
    conv = raw[len(PREFIX) :] if raw.startswith(PREFIX) else ""
    problem = conv_error(conv)
    if problem:
        raise DSError(404, f"no conversation {conv!r}: {problem}")
    return conv


def _row(conv: str, head: int) -> StreamRow:
    # id 0: ETags then name the conversation's range by seqs alone, which is
    # what they are (a conversation is never recreated under another id).
    return StreamRow(id=0, path=conv, content_type="application/json", tail=head)
