"""Durable Streams reads: catch-up, long-poll and SSE, from any :class:`Source`.

Two kinds of stream are read alike: chatd's own durable streams
(:class:`~chatd.durable.service.Streams`) and its conversations
(:class:`~chatd.durable.conversations.Conversations`). A live read takes its
source's ticket *before* each read and waits on it when nothing was new, so a
change between the read and the wait is never missed.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson
import trio

from chatd.config import DurableConfig
from chatd.durable.answers import (
    Headers,
    Receive,
    Scope,
    Send,
    answer,
    cursor_headers,
    cursor_value,
    data_answer,
    etag,
    meta,
    sse_data,
    sse_event,
)
from chatd.durable.model import DSError, StreamRow, is_text, offset, parse_offset
from chatd.errors import StoreError, Unavailable

Chunk = tuple[int, int, bytes]
_CATCHUP_CACHE = b"private, max-age=60, stale-while-revalidate=300"


class Source(Protocol):
    """Where a stream's data and its changes come from."""

    async def read(
        self, path: str, pos: int | None, max_bytes: int
    ) -> tuple[StreamRow, list[Chunk]]: ...

    async def head(self, path: str) -> StreamRow: ...

    def ticket(self, path: str) -> trio.Event:
        """Set at the stream's next change."""
        ...

    def reading(self, path: str) -> AbstractAsyncContextManager[None]:
        """Held by a live reader for as long as it waits for changes."""
        ...


class Reader:
    """GET and HEAD of one kind of stream."""

    def __init__(
        self, source: Source, cfg: DurableConfig, write_timeout: float, draining: trio.Event
    ) -> None:
        self._source = source
        self._cfg = cfg
        self._write_timeout = write_timeout
        #: Set when the server drains: live reads answer now (the client resumes
        #: from its offset elsewhere, or here after the restart).
        self._draining = draining

    @staticmethod
    async def _wait(ticket: trio.Event, stop: trio.Event) -> None:
        """Until the stream changes, or the read should end (``stop``)."""
        if stop.is_set():
            return
        async with trio.open_nursery() as nursery:

            async def until(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, ticket)
            nursery.start_soon(until, stop)

    async def get(
        self,
        path: str,
        headers: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
        cors: Headers,
        *,
        head: bool,
    ) -> None:
        if head:
            row = await self._source.head(path)
            await answer(send, 200, [*cors, *meta(row), (b"cache-control", b"no-store")])
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        for name, values in query.items():
            if name in ("offset", "live", "cursor") and len(values) > 1:
                raise DSError(400, f"the query parameter {name!r} is given more than once")
        raw = query.get("offset", [None])[0]
        live = query.get("live", [None])[0]
        if live not in (None, "long-poll", "sse"):
            raise DSError(400, f"live must be 'long-poll' or 'sse', got {live!r}")
        if live is not None and raw is None:
            raise DSError(400, f"live={live} needs an offset")
        if raw == "":
            raise DSError(400, "offset must not be empty")
        pos = parse_offset(raw, None)
        cursor = query.get("cursor", [None])[0]
        if live is not None and self._draining.is_set():
            # Refused, not answered empty: clients retry (elsewhere, or here once
            # restarted) instead of taking an instant end for a broken proxy.
            raise DSError(503, "the server is shutting down: retry", {"Retry-After": "1"})
        if live is not None:
            refused: Exception | None = None
            # The read ends, answered as usual, when the server drains or its client
            # leaves (hypercorn says so through receive): never left to its timeout.
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, stop)
                nursery.start_soon(_until_set, self._draining, stop)
                try:
                    if live == "sse":
                        await self._sse(path, pos, cursor, send, cors, stop)
                    else:
                        await self._long_poll(path, pos, cursor, send, cors, stop)
                except (DSError, Unavailable, StoreError, trio.TooSlowError) as exc:
                    refused = exc  # answered by the caller, not wrapped in a group
                nursery.cancel_scope.cancel()
            if refused is not None:
                raise refused
        else:
            await self._catch_up(path, pos, headers, send, cors)

    async def _read(self, path: str, pos: int | None) -> tuple[StreamRow, int, list[Chunk]]:
        """The stream, the position read from (``now``: the tail) and the chunks there."""
        row, chunks = await self._source.read(path, pos, self._cfg.read_chunk_bytes)
        start = row.tail if pos is None else pos
        if start > row.tail:
            raise DSError(400, "the offset is past the stream's tail")
        return row, start, chunks

    async def _catch_up(
        self,
        path: str,
        pos: int | None,
        headers: dict[str, str],
        send: Send,
        cors: Headers,
    ) -> None:
        row, start, chunks = await self._read(path, pos)
        out, body = data_answer(row, start, chunks)
        if pos is None:
            out.append((b"cache-control", b"no-store"))
        else:
            tag = etag(row, start, chunks)
            out.append((b"etag", tag.encode()))
            if headers.get("if-none-match") == tag:
                await answer(send, 304, [*cors, *out])
                return
            up_to_date = (not chunks or chunks[-1][1] == row.tail) and not row.closed
            out.append((b"cache-control", b"no-store" if up_to_date else _CATCHUP_CACHE))
        await answer(send, 200, [*cors, *out], body)

    async def _long_poll(
        self,
        path: str,
        pos: int | None,
        cursor: str | None,
        send: Send,
        cors: Headers,
        stop: trio.Event,
    ) -> None:
        deadline = trio.current_time() + self._cfg.long_poll_timeout
        async with self._source.reading(path):
            while True:
                ticket = self._source.ticket(path)
                row, start, chunks = await self._read(path, pos)
                pos = start  # "now" is the tail when the wait began
                if chunks:
                    out, body = data_answer(row, start, chunks)
                    out += [
                        (b"etag", etag(row, start, chunks).encode()),
                        *cursor_headers(cursor, row),
                    ]
                    out.append((b"cache-control", b"no-store"))
                    await answer(send, 200, [*cors, *out], body)
                    return
                if row.closed or trio.current_time() >= deadline or stop.is_set():
                    break
                with trio.move_on_at(deadline):
                    await self._wait(ticket, stop)
        out = [
            (b"stream-next-offset", offset(row.tail).encode()),
            (b"stream-up-to-date", b"true"),
            (b"cache-control", b"no-store"),
            *cursor_headers(cursor, row),
        ]
        if row.closed:
            out.append((b"stream-closed", b"true"))
        await answer(send, 204, [*cors, *out])

    async def _sse(
        self,
        path: str,
        pos: int | None,
        cursor: str | None,
        send: Send,
        cors: Headers,
        stop: trio.Event,
    ) -> None:
        # The first read answers 404/410 as a plain error, before the stream starts.
        row, start, chunks = await self._read(path, pos)
        binary = not is_text(row.content_type)
        out = [
            *cors,
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache, no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        if binary:
            out.append((b"stream-sse-data-encoding", b"base64"))
        await self._write(send, {"type": "http.response.start", "status": 200, "headers": out})
        end = trio.current_time() + self._cfg.sse_max_seconds
        told = None  # the last control event sent: a wake with no change repeats nothing
        async with self._source.reading(path):
            with trio.move_on_at(end):
                while True:
                    ticket = self._source.ticket(path)
                    events = []
                    if chunks:
                        events.append(("data", sse_data(row, chunks, binary)))
                        start = chunks[-1][1]
                    at_tail = start >= row.tail
                    control: dict[str, Any] = {"streamNextOffset": offset(start)}
                    if row.closed and at_tail:
                        control["streamClosed"] = True
                        control["upToDate"] = True
                    else:
                        control["streamCursor"] = cursor_value(cursor)
                        if at_tail:
                            control["upToDate"] = True
                    state = (start, row.closed)
                    if chunks or (at_tail and state != told):
                        # A data event and its control event go in one write.
                        events.append(("control", orjson.dumps(control).decode()))
                        await self._events(send, events)
                        told = state
                    if row.closed and at_tail:
                        break
                    if at_tail:
                        if stop.is_set():
                            break  # ended cleanly: the client resumes from the last control
                        await self._wait(ticket, stop)
                    try:
                        row, start, chunks = await self._read(path, start)
                    except (DSError, Unavailable):
                        # Deleted, or the store is down: the response ends (its
                        # status is long sent); the client resumes from its offset.
                        break
        await self._write(send, {"type": "http.response.body", "body": b"", "more_body": False})

    async def _events(self, send: Send, events: list[tuple[str, str]]) -> None:
        text = "".join(sse_event(kind, data) for kind, data in events)
        await self._write(
            send, {"type": "http.response.body", "body": text.encode(), "more_body": True}
        )

    async def _write(self, send: Send, message: dict[str, Any]) -> None:
        """Every write to a client has a deadline: a reader that stops reading is cut."""
        with trio.fail_after(self._write_timeout):
            await send(message)


async def _until_disconnect(receive: Receive, stop: trio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    stop.set()


async def _until_set(event: trio.Event, stop: trio.Event) -> None:
    await event.wait()
    stop.set()
