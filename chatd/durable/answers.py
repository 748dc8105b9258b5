"""How Durable Streams answers are shaped: headers, bodies, ETags, cursors, SSE events.

Every write to a client has a deadline (a reader that stops reading is cut).
"""

from __future__ import annotations

import base64
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio

from chatd.durable.model import StreamRow, format_expires, is_json, offset

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Chunk = tuple[int, int, bytes]
Headers = list[tuple[bytes, bytes]]

#: Cursors count 20-second intervals from 2024-10-09 00:00 UTC (the protocol's default).
_CURSOR_EPOCH = 1728432000.0
_CURSOR_INTERVAL = 20.0
WRITE_TIMEOUT = 10.0
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def header_map(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def url(scope: Scope, path: str) -> str:
    """An absolute URL of ``path`` on the host the client asked for."""
    host = header_map(scope).get("host")
    if not host:
        server = scope.get("server") or ("localhost", None)
        host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}{path}"


def meta(row: StreamRow) -> list[tuple[bytes, bytes]]:
    out = [
        (b"content-type", row.content_type.encode()),
        (b"stream-next-offset", offset(row.tail).encode()),
    ]
    if row.ttl is not None:
        out.append((b"stream-ttl", str(row.ttl).encode()))
    if row.expires_at is not None:
        out.append((b"stream-expires-at", format_expires(row.expires_at).encode()))
    if row.closed:
        out.append((b"stream-closed", b"true"))
    return out


def body_of(row: StreamRow, chunks: list[Chunk]) -> bytes:
    if is_json(row.content_type):
        return b"[" + b",".join(c[2] for c in chunks) + b"]"
    return b"".join(c[2] for c in chunks)


def data_answer(
    row: StreamRow, start: int, chunks: list[Chunk]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    end = chunks[-1][1] if chunks else start
    out = [
        (b"content-type", row.content_type.encode()),
        (b"stream-next-offset", offset(end).encode()),
    ]
    if end >= row.tail:
        out.append((b"stream-up-to-date", b"true"))
        if row.closed:
            out.append((b"stream-closed", b"true"))
    return out, body_of(row, chunks)


def etag(row: StreamRow, start: int, chunks: list[Chunk]) -> str:
    end = chunks[-1][1] if chunks else start
    closed = ":c" if row.closed and end >= row.tail else ""
    return f'"{row.id}:{start}:{end}{closed}"'


def cursor_value(given: str | None) -> str:
    """The protocol's cursor: the current interval, always past the client's."""
    now = int((time.time() - _CURSOR_EPOCH) // _CURSOR_INTERVAL)
    if given is not None and given.isdigit() and int(given) >= now:
        return str(int(given) + max(1, random.randint(1, 3600) // int(_CURSOR_INTERVAL)))
    return str(now)


def cursor_headers(given: str | None, row: StreamRow) -> list[tuple[bytes, bytes]]:
    return [] if row.closed else [(b"stream-cursor", cursor_value(given).encode())]


def sse_event(kind: str, data: str) -> str:
    """One SSE event. Every line break of the data (CR, LF or CRLF: SSE honours
    all three) starts a new ``data:`` line, so stored text can never end the
    event or forge another one."""
    lines = _LINE_BREAK.split(data)
    body = "".join(f"data: {line}\n" if line[:1] == " " else f"data:{line}\n" for line in lines)
    return f"event: {kind}\n{body}\n"


def sse_data(row: StreamRow, chunks: list[Chunk], binary: bool) -> str:
    data = body_of(row, chunks)
    if binary:
        return base64.b64encode(data).decode()
    return data.decode("utf-8", errors="replace")


async def answer(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> None:
    if status not in (204, 304):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    with trio.fail_after(WRITE_TIMEOUT):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def answer_error(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]], head: bool
) -> None:
    body = b"" if head else orjson.dumps({"error": message})
    headers = [*headers, (b"content-type", b"application/json")]
    await answer(send, status, headers, body)
