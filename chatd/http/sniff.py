"""One port, two protocols: read a connection's first request head, then hand it on.

Operators put one port behind a proxy, so WebSocket upgrades (served by
trio-websocket) and plain HTTP (served by hypercorn) arrive on the same
socket. Which one a connection is cannot be known before its first request
head has been read, so :func:`sniff` reads it (h11 parses it: no HTTP is
parsed by hand here), and the bytes read are replayed to whichever server
takes the connection through :class:`Prefaced`. Anything that is not a
clean WebSocket upgrade, malformed requests included, goes to hypercorn,
which answers them as HTTP should.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import h11
import trio

#: One read from the socket while sniffing.
_READ = 16384


class Prefaced(trio.abc.HalfCloseableStream):
    """A stream whose first bytes were already read: they are received again first.

    trio's streams are final classes, so the servers that take the connection
    learn its addresses from ``socket`` (hypercorn) and ``peer`` (chatd's
    WebSocket adapter) here.
    """

    def __init__(self, stream: trio.abc.Stream, preface: bytes) -> None:
        self.stream = stream
        self._preface = preface
        transport = getattr(stream, "transport_stream", stream)
        self.socket: Any = getattr(transport, "socket", None)
        self.tls = transport is not stream
        #: The peer's host (per-address limits) and host:port (logs).
        self.peer_host, self.peer = _peer(self.socket)
        #: A write making no progress for this long breaks the connection (None: no limit).
        self.write_timeout: float | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._preface:
            n = len(self._preface) if max_bytes is None else max_bytes
            data, self._preface = self._preface[:n], self._preface[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.write_timeout is None:
            await self.stream.send_all(data)
            return
        # hypercorn shields its writes from cancellation (a cut write would corrupt
        # the response), so a reader that stopped reading would hold its
        # connection, its handler and the shutdown for ever. This inner deadline
        # still applies; the stream is closed, which hypercorn takes as the end.
        with trio.move_on_after(self.write_timeout) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)
            raise trio.BrokenResourceError(f"the client took no data for {self.write_timeout:g}s")

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:  # TLS has no half-close; hypercorn expects this error
            raise AttributeError("send_eof")
        await send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass(frozen=True)
class Sniffed:
    kind: Literal["websocket", "http"]
    stream: Prefaced


async def sniff(stream: trio.abc.Stream, limit: int) -> Sniffed | None:
    """Read the first request head (the caller bounds the wait); None: the peer left."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
    seen = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            # Malformed or too large: hypercorn answers it (400 or 431).
            return Sniffed("http", Prefaced(stream, bytes(seen)))
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None  # includes a failed TLS handshake
            if not data:
                return None
            seen += data
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            kind: Literal["websocket", "http"] = "websocket" if _upgrade(event) else "http"
            return Sniffed(kind, Prefaced(stream, bytes(seen)))
        return None  # ConnectionClosed before a request


def _upgrade(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


def _peer(sock: Any) -> tuple[str, str]:
    try:
        host, port, *_ = sock.getpeername()
    except (OSError, AttributeError, ValueError):
        return "unknown", "unknown"
    return str(host), f"{host}:{port}"


def plain_response(status: int, reason: bytes, body: bytes) -> bytes:
    """A complete ``Connection: close`` response (h11 writes it), for refusals before
    any server took the connection."""
    conn = h11.Connection(h11.SERVER)
    # h11 answers only a request it has seen; a minimal one stands in for it.
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return b"".join(
        [
            conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b"",
            conn.send(h11.Data(data=body)) or b"",
            conn.send(h11.EndOfMessage()) or b"",
        ]
    )
