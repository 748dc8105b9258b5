"""One WebSocket client's session: hello, the op loop and a bounded send queue.

The reader never waits on other clients: sends go to the group committer and
are acknowledged from its callback, subscriptions are handled by the hub's
feeds. Frames to the client go through a queue bounded in frames and bytes;
a client that lets it fill is disconnected with close code 4008.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import TextMessage

from chatd.errors import ChatdError, Unavailable
from chatd.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_HELLO_TIMEOUT,
    CLOSE_SLOW_CONSUMER,
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    Request,
    encode,
    error_frame,
    parse,
)
from chatd.store import Committed, NewMessage

if TYPE_CHECKING:
    from chatd.server import Server

log = logging.getLogger("chatd.session")

_ids = itertools.count(1)
_DROP_GRACE = 5.0
# Frames queued together are written with one socket send up to this size.
_WRITE_BYTES = 64 * 1024


_SHORT_HEADS = [bytes((0x81, n)) for n in range(126)]


def _text_frame(text: str) -> bytes:
    """One unmasked, final WebSocket text frame (RFC 6455 section 5.2)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        return _SHORT_HEADS[n] + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


async def _send_frames(ws: WebSocketConnection, frames: list[str]) -> None:
    """Send ``frames`` as WebSocket text messages with one socket write.

    trio-websocket writes each message separately (one syscall and two
    scheduler rounds each: its send lock, then the socket); under fan-out that
    dominated the server's CPU. This frames them itself (byte for byte what
    the connection's wsproto would write; wsproto's per-frame work was the
    largest part of the send path), writes them under the connection's own
    send lock, as ``send_message`` does per message (pinned: trio-websocket
    0.12), and takes the lock without a scheduler round when it is free (the
    socket write still checkpoints).
    """
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    proto = ws._wsproto
    conn = proto.connection
    if conn is not None and conn.state is ConnectionState.OPEN and not conn._proto.extensions:
        # What wsproto would write (a server's frames are unmasked, and
        # trio-websocket negotiates no extension), without its per-frame work.
        data = b"".join([_text_frame(text) for text in frames])
    else:  # closing, or an extension: wsproto's own path (and its errors)
        data = b"".join([proto.send(TextMessage(data=text)) for text in frames])
    lock = ws._stream_lock
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


class Session:
    """A connected client. Implements the hub's ``Subscriber`` protocol."""

    def __init__(self, server: Server, ws: WebSocketConnection) -> None:
        self.server = server
        self.ws = ws
        self.id = next(_ids)
        self.user = ""
        self.subscriptions: set[str] = set()
        cfg = server.config.server
        self._limits = Limits(cfg.max_text_chars, server.config.store.history_max)
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._max_frames = cfg.send_queue_frames
        self._max_bytes = cfg.send_queue_bytes
        self._wakeup = trio.Event()
        self._inflight = trio.Semaphore(cfg.max_inflight_sends)
        self._typing_busy = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._scope: trio.CancelScope | None = None

    # -- outbound ---------------------------------------------------------

    def deliver(self, text: str) -> bool:
        """Queue a frame for the client without blocking."""
        if self._close_code is not None:
            return False
        size = len(text)
        # The bound limits accumulation: one frame into an empty queue always fits
        # (a large snapshot), anything queued behind it counts.
        if self._queue and (
            len(self._queue) >= self._max_frames or self._queued_bytes + size > self._max_bytes
        ):
            self._drop(
                CLOSE_SLOW_CONSUMER,
                "slow consumer: send queue full; reconnect and resume with 'after'",
            )
            self.server.slow_disconnects += 1
            return False
        self._queue.append(text)
        self._queued_bytes += size
        self._wakeup.set()
        return True

    def subscription_failed(self, conv: str) -> None:
        # The client was told (an error frame); it may subscribe again.
        self.subscriptions.discard(conv)

    def reply(self, frame: dict[str, Any], ref: Any = None) -> None:
        if ref is not None:
            frame["ref"] = ref
        self.deliver(encode(frame))

    def _drop(self, code: int, reason: str) -> None:
        """Close with ``code``: the writer finishes the frame in flight (cutting
        it would corrupt the stream), then closes; a client too stuck even for
        that is cut off after ``_DROP_GRACE`` seconds."""
        if self._close_code is not None:
            return
        self._close_code, self._close_reason = code, reason
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + _DROP_GRACE)

    async def _writer(self) -> None:
        """Send queued frames; returns once the session is closing."""
        while True:
            while self._queue and self._close_code is None:
                frames = [self._queue.popleft()]
                size = len(frames[0])
                while self._queue and size < _WRITE_BYTES:
                    frames.append(self._queue.popleft())
                    size += len(frames[-1])
                self._queued_bytes -= size
                await _send_frames(self.ws, frames)
            if self._close_code is not None:
                return
            self._wakeup = trio.Event()
            if not self._queue:
                await self._wakeup.wait()

    # -- lifecycle --------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves, misbehaves or the server stops."""
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, nursery)
                    await self._writer()
                    nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass  # the client went away; nothing to answer
        finally:
            for conv in list(self.subscriptions):
                self.server.hub.forget(self, conv)
            self.subscriptions.clear()
            if self.ws.closed is None:
                # Our own close (slow consumer, hello timeout) or server shutdown.
                code = self._close_code or CLOSE_GOING_AWAY
                reason = self._close_reason or "server shutting down"
                with trio.move_on_after(1.0, shield=True):
                    await self.ws.aclose(code, reason)

    async def _reader(self, nursery: trio.Nursery) -> None:
        with trio.move_on_after(self.server.config.server.hello_timeout) as hello_scope:
            while not self.user:
                await self._handle_frame(await self.ws.get_message(), nursery)
        if hello_scope.cancelled_caught:
            self._drop(CLOSE_HELLO_TIMEOUT, "no hello received in time")
            return
        while True:
            await self._handle_frame(await self.ws.get_message(), nursery)

    # -- ops --------------------------------------------------------------

    async def _handle_frame(self, data: str | bytes, nursery: trio.Nursery) -> None:
        ref = None
        try:
            req = parse(data, self._limits)
            ref = req.ref
            if not self.user and req.op != "hello":
                raise ProtocolError("not_authenticated", "send hello first", ref)
            await getattr(self, f"_op_{req.op}")(req, nursery)
        except ProtocolError as exc:
            self.reply(error_frame(exc.code, exc.message), exc.ref if exc.ref is not None else ref)
        except Unavailable as exc:
            self.reply(error_frame("unavailable", exc.message, retryable=True), ref)

    async def _op_hello(self, req: Request, nursery: trio.Nursery) -> None:
        if self.user:
            raise ProtocolError(
                "already_authenticated", f"already said hello as {self.user!r}", req.ref
            )
        self.user = self.server.authenticate(req)
        self.reply({"type": "welcome", "user": self.user, "protocol": PROTOCOL_VERSION}, req.ref)

    async def _op_ping(self, req: Request, nursery: trio.Nursery) -> None:
        self.reply({"type": "pong"}, req.ref)

    async def _op_subscribe(self, req: Request, nursery: trio.Nursery) -> None:
        conv = req["conv"]
        if conv in self.subscriptions:
            raise ProtocolError(
                "already_subscribed", f"already subscribed to {conv!r}; unsubscribe first", req.ref
            )
        if len(self.subscriptions) >= self.server.config.server.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.server.config.server.max_subscriptions} subscriptions per connection",
                req.ref,
            )
        self.subscriptions.add(conv)
        self.server.hub.join(self, conv, req.get("after"), req.ref, req.get("streams"))

    async def _op_unsubscribe(self, req: Request, nursery: trio.Nursery) -> None:
        conv = req["conv"]
        if conv not in self.subscriptions:
            raise ProtocolError("not_subscribed", f"not subscribed to {conv!r}", req.ref)
        self.subscriptions.discard(conv)
        self.server.hub.forget(self, conv)
        self.reply({"type": "unsubscribed", "conv": conv}, req.ref)

    async def _op_send(self, req: Request, nursery: trio.Nursery) -> None:
        conv, client_id, ref = req["conv"], req["id"], req.ref
        text, wants_reply = req["text"], req["reply"]
        # The reader checkpoints on every frame; skip a second yield when a slot is free.
        try:
            self._inflight.acquire_nowait()
        except trio.WouldBlock:
            await self._inflight.acquire()

        def on_done(result: Committed | ChatdError) -> None:
            self._inflight.release()
            if isinstance(result, Committed):
                frame: dict[str, Any] = {
                    "type": "ack",
                    "conv": conv,
                    "id": client_id,
                    "seq": result.seq,
                }
                failed: ProtocolError | None = None
                if result.duplicate:
                    # The original send started its reply (if it asked for one).
                    frame["duplicate"] = True
                elif wants_reply:
                    try:
                        frame["stream"] = self.server.streams.start_reply(conv, result.seq, text)
                    except ProtocolError as exc:
                        failed = exc
                self.reply(frame, ref)
                if failed is not None:
                    self.reply(
                        error_frame(failed.code, failed.message, retryable=True, conv=conv), ref
                    )
            elif isinstance(result, Unavailable):
                self.reply(
                    error_frame(
                        "unavailable", result.message, retryable=True, conv=conv, id=client_id
                    ),
                    ref,
                )
            else:
                self.reply(
                    error_frame(
                        "internal", "the message could not be stored", conv=conv, id=client_id
                    ),
                    ref,
                )

        await self.server.store.submit(NewMessage(conv, client_id, self.user, text), on_done)

    async def _op_stop(self, req: Request, nursery: trio.Nursery) -> None:
        conv, stream = req["conv"], req["stream"]
        streams = self.server.streams
        if not streams.stop(conv, stream):
            # Perhaps generating in another chatd process: ask them all.
            if not await self.server.bus.stream_exists(conv, stream):
                raise ProtocolError(
                    "unknown_stream", f"no reply {stream!r} is generating in {conv!r}", req.ref
                )
            await self.server.bus.publish_control(
                encode({"op": "stop", "conv": conv, "stream": stream})
            )
        self.reply({"type": "stopping", "conv": conv, "stream": stream}, req.ref)

    async def _op_history(self, req: Request, nursery: trio.Nursery) -> None:
        conv, limit = req["conv"], req["limit"]
        messages = await self.server.store.history(conv, req.get("before"), limit + 1)
        more = len(messages) > limit
        messages = messages[-limit:] if more else messages
        self.reply({"type": "history", "conv": conv, "messages": messages, "more": more}, req.ref)

    async def _op_typing(self, req: Request, nursery: trio.Nursery) -> None:
        # Ephemeral and best-effort: at most one publish in flight per client.
        if not self._typing_busy:
            self._typing_busy = True
            nursery.start_soon(self._publish_typing, req["conv"])

    async def _publish_typing(self, conv: str) -> None:
        try:
            await self.server.bus.publish(
                conv,
                encode({"type": "typing", "conv": conv, "user": self.user, "_from": self.user}),
            )
        except Unavailable as exc:
            log.debug("typing for %s dropped: %s", conv, exc)
        finally:
            self._typing_busy = False

    async def _op_status(self, req: Request, nursery: trio.Nursery) -> None:
        self.reply({"type": "status", **(await self.server.status())}, req.ref)
