"""A client :class:`~chatd.ports.Connection` on trio-websocket.

This is the only module that knows trio-websocket's internals. The session
writer sends every frame queued for a client with one socket write:
trio-websocket writes each message separately (one syscall and two
scheduler rounds each: its send lock, then the socket), and under fan-out
that dominated the server's CPU. :func:`_write_frames` frames the messages
itself (byte for byte what the connection's wsproto would write; wsproto's
per-frame work was the largest part of the send path) and writes them under
the connection's own send lock, as ``send_message`` does per message.

The internals it uses (``_wsproto``, ``_stream_lock``, ``_stream``,
``_close_reason``, ``_abort_web_socket``) are those of trio-websocket 0.12,
pinned in pyproject.toml. If they are missing, :data:`FAST_PATH` is False and
frames go through the public ``send_message``, slower but correct;
``tests/test_websocket_adapter.py`` fails loudly on a version without them.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer
from wsproto.connection import ConnectionState
from wsproto.events import TextMessage

from chatd.ports import ConnectionGone

log = logging.getLogger("chatd.websocket")

_INTERNALS = ("_wsproto", "_stream_lock", "_stream", "_close_reason", "_abort_web_socket")
#: The trio-websocket release whose internals :func:`_write_frames` was written against.
PINNED = "0.12."
FAST_PATH = trio_websocket.__version__.startswith(PINNED)
if not FAST_PATH:  # pragma: no cover - only on an unpinned install
    log.warning(
        "trio-websocket %s is not %sx: sending frames one by one (slower)",
        trio_websocket.__version__,
        PINNED,
    )

_SHORT_HEADS = [bytes((0x81, n)) for n in range(126)]


def text_frame(text: str) -> bytes:
    """One unmasked, final WebSocket text frame (RFC 6455 section 5.2)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        return _SHORT_HEADS[n] + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def has_internals(ws: WebSocketConnection) -> bool:
    return all(hasattr(ws, name) for name in _INTERNALS)


async def _write_frames(ws: WebSocketConnection, frames: list[str]) -> None:
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    proto = ws._wsproto
    conn = proto.connection
    if conn is not None and conn.state is ConnectionState.OPEN and not conn._proto.extensions:
        # What wsproto would write (a server's frames are unmasked, and
        # trio-websocket negotiates no extension), without its per-frame work.
        data = b"".join([text_frame(text) for text in frames])
    else:  # closing, or an extension: wsproto's own path (and its errors)
        data = b"".join([proto.send(TextMessage(data=text)) for text in frames])
    lock = ws._stream_lock
    # Without a scheduler round when the lock is free (the socket write still checkpoints).
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        await ws._stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
        raise ConnectionClosed(ws._close_reason) from None
    finally:
        lock.release()


class _NoListener(trio.abc.Listener[trio.abc.Stream]):
    """trio-websocket's server wants a listener; chatd's own accept loop feeds it instead."""

    async def accept(self) -> trio.abc.Stream:  # pragma: no cover - never run
        raise trio.ClosedResourceError("chatd accepts connections itself")

    async def aclose(self) -> None:  # pragma: no cover - never run
        pass


class WsAcceptor:
    """Serves one already-accepted stream as a WebSocket connection, in the caller's task.

    trio-websocket serves only the listeners it accepts from; chatd shares
    its port with HTTP, so it accepts, reads the request head, and hands the
    stream here. ``_handle_connection`` is what trio-websocket's accept loop
    runs per connection (pinned internals, like the rest of this module);
    calling it directly costs no extra task or hand-off per handshake.
    """

    def __init__(self, handler: Any, **options: Any) -> None:
        self._server = WebSocketServer(handler, [_NoListener()], **options)

    async def serve(self, stream: trio.abc.Stream) -> None:
        await self._server._handle_connection(stream)


def handshake_headers(request: WebSocketRequest) -> tuple[str, str | None, str | None]:
    """The peer's address, and the ``Origin`` and ``Host`` headers of its handshake.

    trio-websocket lists every header but ``Host``, which wsproto keeps on its
    request event (pinned internals again).
    """
    stream = getattr(getattr(request, "_connection", None), "_stream", None)
    remote = request.remote
    # On chatd's shared port the stream is chatd.http.sniff.Prefaced, which
    # trio-websocket cannot see through: it names the peer itself.
    address = getattr(stream, "peer_host", None) or str(getattr(remote, "address", remote))
    origin = None
    for key, value in request.headers:
        if key.lower() == b"origin":
            origin = value.decode("latin-1")
    event = getattr(request, "_event", None)
    host = getattr(event, "host", None)
    return address, origin, host if isinstance(host, str) else None


def _gone(exc: ConnectionClosed) -> ConnectionGone:
    reason = exc.reason
    return ConnectionGone(getattr(reason, "code", None), getattr(reason, "reason", "") or "")


class WsConnection:
    """A server-side WebSocket as the session sees it."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        remote = ws.remote
        self.remote = getattr(getattr(ws, "_stream", None), "peer", None) or (
            f"{remote.address}:{remote.port}" if hasattr(remote, "address") else str(remote)
        )
        self._fast = FAST_PATH and has_internals(ws)

    async def get_message(self) -> str | bytes:
        try:
            return await self.ws.get_message()
        except ConnectionClosed as exc:
            raise _gone(exc) from None

    async def send_frames(self, frames: list[str]) -> None:
        try:
            if self._fast:
                await _write_frames(self.ws, frames)
            else:
                for text in frames:
                    await self.ws.send_message(text)
        except ConnectionClosed as exc:
            raise _gone(exc) from None

    async def aclose(self, code: int, reason: str) -> None:
        await self.ws.aclose(code, reason)

    async def abort(self) -> None:
        if self._fast:
            await self.ws._abort_web_socket()
        else:  # pragma: no cover - only on an unpinned install
            await self.ws.aclose(1006)

    async def ping(self) -> None:
        try:
            await self.ws.ping()
        except ConnectionClosed as exc:
            raise _gone(exc) from None

    @property
    def is_closed(self) -> bool:
        return self.ws.closed is not None
