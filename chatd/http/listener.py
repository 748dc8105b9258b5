"""The listeners: WebSocket and plain HTTP on the public port, and the operator's own.

Each accepted connection on the public port has its first request head read
(:mod:`chatd.http.sniff`, bounded by ``[http].header_timeout``); a WebSocket
upgrade is served by trio-websocket in the same task
(:class:`chatd.adapters.websocket.WsAcceptor`), and anything else is served by hypercorn's
Trio connection handler with chatd's ASGI app. Both run their connections in
the ``handlers`` nursery that ``serve()`` owns and cuts at the shutdown's
deadline. Plain HTTP connections are capped (``[http].max_connections``);
past the cap one is answered 503 and closed.

hypercorn's ``TCPServer`` is its per-connection handler (what its own
``worker_serve`` runs for each accepted stream); chatd drives it directly
because the accept loop must be chatd's own to share the port.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext

from chatd.adapters.websocket import WsAcceptor
from chatd.config import HttpConfig
from chatd.http.sniff import Prefaced, plain_response, sniff

log = logging.getLogger("chatd.http")

#: The largest request head accepted (hypercorn's own default).
_HEAD_LIMIT = 16 * 1024
_REFUSAL_WRITE = 2.0
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class HttpFace:
    """hypercorn's per-connection handler, with chatd's limits and shutdown."""

    def __init__(self, cfg: HttpConfig, write_timeout: float = 10.0) -> None:
        self.cfg = cfg
        #: [limits].write_timeout: a response the client stops reading is cut after it.
        self._write_timeout = write_timeout or None
        hc = HypercornConfig()
        hc.keep_alive_timeout = cfg.keep_alive
        # No read timeout: hypercorn's applies to every read, also while a
        # response is being produced, so it stopped reading a connection whose
        # SSE or long-poll outlasted it (and ended the response as if the client
        # had left); the client, seeing a complete response, sent its next
        # request on that connection, and nobody read it until the keep-alive
        # timer reset it. Heads are bounded by sniffing (first request) and by
        # keep_alive (later ones: partial bytes do not restart the idle timer),
        # bodies by the apps' own deadline (header_timeout).
        hc.read_timeout = None
        hc.h11_max_incomplete_size = _HEAD_LIMIT
        hc.include_server_header = False
        hc.accesslog = None
        hc.errorlog = logging.getLogger("chatd.http.hypercorn")
        self._hconfig = hc
        self._context = WorkerContext(None)
        #: Plain HTTP connections open now, and refused at the cap since start.
        self.open = 0
        self.refused = 0

    async def serve(self, app: Callable[..., Awaitable[None]], stream: Any) -> None:
        """Serve one connection's HTTP requests until it closes (keep-alive included)."""
        if self.open >= self.cfg.max_connections:
            self.refused += 1
            await _refuse(stream, 503, b"Service Unavailable", b"too many HTTP connections\n")
            return
        self.open += 1
        if not isinstance(stream, Prefaced):
            stream = Prefaced(stream, b"")  # the operator's listener
        stream.write_timeout = self._write_timeout
        try:
            await TCPServer(ASGIWrapper(app), self._hconfig, self._context, {}, stream).run()
        finally:
            self.open -= 1

    async def close_idle(self) -> None:
        """Shutdown: idle keep-alive connections close now, busy ones after their response."""
        await self._context.terminated.set()


async def serve_public(
    listeners: list[trio.abc.Listener[Any]],
    handlers: trio.Nursery,
    face: HttpFace,
    app: Callable[..., Awaitable[None]],
    ws: WsAcceptor,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` until cancelled: WebSocket upgrades and plain HTTP."""

    async def dispatch(stream: trio.abc.Stream) -> None:
        sniffed = None
        try:
            with trio.move_on_after(face.cfg.header_timeout):
                sniffed = await sniff(stream, _HEAD_LIMIT)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if sniffed is None:  # gone, or no request head in time
            await trio.aclose_forcefully(stream)
        elif sniffed.kind == "websocket":
            await ws.serve(sniffed.stream)  # closes it
        else:
            await face.serve(app, sniffed.stream)  # hypercorn closes it

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, listener, handlers, dispatch)
        task_status.started()


async def _accept(
    listener: trio.abc.Listener[Any],
    handlers: trio.Nursery,
    dispatch: Callable[[trio.abc.Stream], Awaitable[None]],
) -> None:
    """Accept until cancelled, each connection in a task of ``handlers``.

    What ``trio.serve_listeners`` does, minus its closing of the stream when
    the handler returns: here each path closes its own (sniffing, or the
    server that took the connection), and nothing closes a stream twice.
    """
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY:
                    raise
                # Out of file descriptors or memory: the clients holding them
                # must leave first; wait rather than spin (as trio's own loop does).
                log.error("accept failed (%s): pausing 100 ms", exc.strerror)
                await trio.sleep(0.1)
                continue
            handlers.start_soon(dispatch, stream)


async def serve_operator(
    listeners: list[trio.abc.Listener[Any]],
    handlers: trio.Nursery,
    face: HttpFace,
    app: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The operator's own listener: plain HTTP only."""
    await trio.serve_listeners(
        partial(face.serve, app), listeners, handler_nursery=handlers, task_status=task_status
    )


async def _refuse(stream: Any, status: int, reason: bytes, body: bytes) -> None:
    with trio.move_on_after(_REFUSAL_WRITE):
        try:
            await stream.send_all(plain_response(status, reason, body))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)
