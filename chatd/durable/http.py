"""Durable Streams over HTTP: ``/v1/stream/<path>`` (PROTOCOL.md v1 of durable-streams).

``PUT`` creates (or forks), ``POST`` appends (idempotent producers, closing),
``GET`` reads (catch-up, ``live=long-poll``, ``live=sse``), ``HEAD``,
``DELETE``, ``OPTIONS`` (CORS). Access: anonymous mode lets everyone in
(development); with ``[auth].mode = "jwt"`` every request needs
``Authorization: Bearer <token>`` whose grants claim names the streams
(``"streams": {"agents/*": "rw"}``): ``r`` to read, ``w`` to write. The
protocol's rules live in :mod:`chatd.durable.model`; this module parses
requests, shapes answers and runs the live reads.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson
import trio

from chatd.durable.answers import (
    WRITE_TIMEOUT,
    answer,
    answer_error,
    cursor_headers,
    cursor_value,
    data_answer,
    etag,
    header_map,
    meta,
    sse_data,
    sse_event,
    url,
)
from chatd.durable.model import (
    Append,
    Create,
    DSError,
    StreamRow,
    is_text,
    is_true,
    offset,
    parse_expires,
    parse_int_header,
    parse_offset,
    parse_ttl,
)
from chatd.durable.service import Streams
from chatd.errors import Unavailable
from chatd.identity import Identity
from chatd.tokens import TokenError

log = logging.getLogger("chatd.durable")

PREFIX = "/v1/stream/"
Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Verify = Callable[[str], Awaitable[Identity]]
Chunk = tuple[int, int, bytes]

_EXPOSED = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, "
    "Stream-Expires-At, ETag, Location, Producer-Epoch, Producer-Seq, Producer-Expected-Seq, "
    "Producer-Received-Seq, Stream-SSE-Data-Encoding, Content-Type"
)
_ALLOWED_HEADERS = (
    "Authorization, Content-Type, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Closed, "
    "Stream-Seq, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, Producer-Id, "
    "Producer-Epoch, Producer-Seq"
)
_SECURITY = [
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"cross-origin"),
]
_CATCHUP_CACHE = b"private, max-age=60, stale-while-revalidate=300"


class DurableHTTP:
    """The ASGI side of Durable Streams for one listener."""

    def __init__(
        self, streams: Streams, *, anonymous: bool, verify: Verify | None, write_timeout: float
    ) -> None:
        self._streams = streams
        self._cfg = streams.cfg
        self._anonymous = anonymous
        self._verify = verify
        self._write_timeout = write_timeout or WRITE_TIMEOUT
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests += 1
        method = scope["method"]
        headers = header_map(scope)
        cors = self._cors(headers)
        try:
            path = _stream_path(scope["path"])
            if method == "OPTIONS":
                await answer(send, 204, self._preflight(cors))
                return
            await self._authorize(method, path, headers)
            if method == "PUT":
                await self._put(path, headers, await self._body(receive), send, cors, scope)
            elif method == "POST":
                await self._post(path, headers, await self._body(receive), send, cors)
            elif method in ("GET", "HEAD"):
                await self._get(path, headers, scope, send, cors, head=method == "HEAD")
            elif method == "DELETE":
                await self._streams.delete(path)
                await answer(send, 204, cors)
            else:
                raise DSError(405, f"{method} is not a Durable Streams method")
        except DSError as exc:
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            await answer_error(send, exc.status, exc.message, cors + extra, method == "HEAD")
        except Unavailable as exc:
            await answer_error(
                send,
                503,
                f"storage unavailable, retry: {exc}",
                [*cors, (b"retry-after", b"1")],
                method == "HEAD",
            )

    # -- access -------------------------------------------------------------------

    def _cors(self, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
        origins = self._cfg.cors_origins
        origin = headers.get("origin")
        out = list(_SECURITY)
        if "*" in origins:
            out.append((b"access-control-allow-origin", b"*"))
        elif origin and origin in origins:
            out += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        else:
            return out
        out.append((b"access-control-expose-headers", _EXPOSED.encode()))
        return out

    def _preflight(self, cors: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [
            *cors,
            (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
            (b"access-control-allow-headers", _ALLOWED_HEADERS.encode()),
            (b"access-control-max-age", b"86400"),
        ]

    async def _authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        if self._anonymous:
            return
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or self._verify is None:
            raise DSError(401, "Authorization: Bearer <token> is required")
        try:
            identity = await self._verify(auth[len("Bearer ") :].strip())
        except TokenError as exc:
            raise DSError(401, f"token refused: {exc}") from None
        need = "r" if method in ("GET", "HEAD") else "w"
        if need not in identity.grants.stream_rights(path):
            raise DSError(403, f"no {'read' if need == 'r' else 'write'} access to stream {path}")
        source = headers.get("stream-forked-from")
        if method == "PUT" and source is not None:
            if "r" not in identity.grants.stream_rights(_source_path(source)):
                raise DSError(403, f"no read access to the fork's source {source}")

    async def _body(self, receive: Receive) -> bytes:
        chunks, size, limit = [], 0, self._cfg.max_append_bytes
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise DSError(400, "the client left before its body arrived")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise DSError(413, f"the body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    # -- writes -------------------------------------------------------------------

    async def _put(
        self,
        path: str,
        headers: dict[str, str],
        body: bytes,
        send: Send,
        cors: list[tuple[bytes, bytes]],
        scope: Scope,
    ) -> None:
        sub = headers.get("stream-fork-sub-offset")
        source = headers.get("stream-forked-from")
        req = Create(
            content_type=headers.get("content-type"),
            ttl=parse_ttl(headers.get("stream-ttl")),
            expires_at=parse_expires(headers.get("stream-expires-at")),
            closed=is_true(headers.get("stream-closed")),
            body=body,
            fork_of=_source_path(source) if source is not None else None,
            fork_offset=headers.get("stream-fork-offset"),
            fork_sub=parse_int_header("Stream-Fork-Sub-Offset", sub) if sub is not None else None,
        )
        if req.fork_offset is not None:
            parse_offset(req.fork_offset)  # malformed: 400 before anything is touched
        created, row = await self._streams.create(path, req)
        out = [*cors, *meta(row)]
        if created:
            out.append((b"location", url(scope, PREFIX + path).encode()))
        await answer(send, 201 if created else 200, out)

    async def _post(
        self,
        path: str,
        headers: dict[str, str],
        body: bytes,
        send: Send,
        cors: list[tuple[bytes, bytes]],
    ) -> None:
        ids = [headers.get(h) for h in ("producer-id", "producer-epoch", "producer-seq")]
        producer = None
        if any(v is not None for v in ids):
            pid, epoch, seq = ids
            if pid is None or epoch is None or seq is None:
                raise DSError(400, "Producer-Id, Producer-Epoch and Producer-Seq go together")
            if not pid:
                raise DSError(400, "Producer-Id must not be empty")
            producer = (
                pid,
                parse_int_header("Producer-Epoch", epoch),
                parse_int_header("Producer-Seq", seq),
            )
        req = Append(
            content_type=headers.get("content-type"),
            body=body,
            close=is_true(headers.get("stream-closed")),
            producer=producer,
            stream_seq=headers.get("stream-seq"),
        )
        plan = await self._streams.append(path, req)
        out = [*cors, *((k.lower().encode(), v.encode()) for k, v in plan.headers.items())]
        await answer(send, plan.status, out)

    # -- reads --------------------------------------------------------------------

    async def _get(
        self,
        path: str,
        headers: dict[str, str],
        scope: Scope,
        send: Send,
        cors: list[tuple[bytes, bytes]],
        *,
        head: bool,
    ) -> None:
        if head:
            row = await self._streams.store.head(path, self._streams.now())
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
        if live == "sse":
            await self._sse(path, pos, cursor, send, cors)
        elif live == "long-poll":
            await self._long_poll(path, pos, cursor, send, cors)
        else:
            await self._catch_up(path, pos, headers, send, cors)

    async def _read(self, path: str, pos: int | None) -> tuple[StreamRow, int, list[Chunk]]:
        """The stream, the position read from (``now``: the tail) and the chunks there."""
        row, chunks = await self._streams.store.read(
            path, pos, self._cfg.read_chunk_bytes, self._streams.now()
        )
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
        cors: list[tuple[bytes, bytes]],
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
        cors: list[tuple[bytes, bytes]],
    ) -> None:
        deadline = trio.current_time() + self._cfg.long_poll_timeout
        async with self._streams.reading(path):
            while True:
                ticket = self._streams.ticket(path)
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
                if row.closed or trio.current_time() >= deadline:
                    break
                with trio.move_on_at(deadline):
                    await ticket.wait()
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
        cors: list[tuple[bytes, bytes]],
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
        async with self._streams.reading(path):
            with trio.move_on_at(end):
                while True:
                    ticket = self._streams.ticket(path)
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
                    if chunks or at_tail:
                        # A data event and its control event go in one write.
                        events.append(("control", orjson.dumps(control).decode()))
                        await self._events(send, events)
                    if row.closed and at_tail:
                        break
                    if at_tail:
                        await ticket.wait()
                    try:
                        row, start, chunks = await self._read(path, start)
                    except DSError:
                        break  # deleted while read: the stream just ends
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


# -- answers --------------------------------------------------------------------


def _stream_path(raw: str) -> str:
    path = raw[len(PREFIX) :] if raw.startswith(PREFIX) else ""
    if not path or len(path) > 1024:
        raise DSError(404, "a stream's URL is /v1/stream/<path> (at most 1024 characters)")
    if path.split("/", 1)[0] == "__ds" or any(p in ("", ".", "..") for p in path.split("/")):
        raise DSError(404, f"no stream at {path!r} (reserved or malformed path)")
    return path


def _source_path(value: str) -> str:
    """``Stream-Forked-From``: the source's URL path (or its stream path)."""
    value = unquote(value.strip())
    if value.startswith(PREFIX):
        return value[len(PREFIX) :]
    return value.lstrip("/")
