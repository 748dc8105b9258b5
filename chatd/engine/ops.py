"""The client ops: one function per op of the wire protocol, and :data:`OPS`, the table.

Each op runs in the session's reader task with a validated request
(:func:`chatd.protocol.parse`). It answers through the session's queue,
raises :class:`~chatd.protocol.ProtocolError` for a request it refuses, or
:class:`~chatd.errors.Unavailable` when a backing service cannot serve it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from chatd.errors import Unavailable
from chatd.protocol import PROTOCOL_VERSION, ProtocolError, Request, encode
from chatd.records import NewMessage

if TYPE_CHECKING:
    from chatd.engine.committer import Committer
    from chatd.engine.hub import Hub
    from chatd.engine.replies import Replies
    from chatd.engine.session import Session
    from chatd.ports import Log, Transport

log = logging.getLogger("chatd.session")


@dataclass(slots=True)
class SendTag:
    """What the session's acker needs to answer one send (the committer never looks)."""

    ref: Any
    wants_reply: bool
    prompt: str


@dataclass(frozen=True)
class Services:
    """What a session may use."""

    log: Log
    hub: Hub
    committer: Committer
    replies: Replies
    transport: Transport
    #: Resolves a ``hello`` to a user name; raises ProtocolError (``unauthorized``).
    identify: Callable[[Request], str]
    #: The server's health and counters, for the ``status`` op.
    status: Callable[[], Awaitable[dict[str, Any]]]


async def op_hello(s: Session, req: Request, nursery: trio.Nursery) -> None:
    if s.user:
        raise ProtocolError("already_authenticated", f"already said hello as {s.user!r}", req.ref)
    s.user = s.services.identify(req)
    s.reply({"type": "welcome", "user": s.user, "protocol": PROTOCOL_VERSION}, req.ref)


async def op_ping(s: Session, req: Request, nursery: trio.Nursery) -> None:
    s.reply({"type": "pong"}, req.ref)


async def op_subscribe(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv = req["conv"]
    if conv in s.subscriptions:
        raise ProtocolError(
            "already_subscribed", f"already subscribed to {conv!r}; unsubscribe first", req.ref
        )
    if len(s.subscriptions) >= s.cfg.max_subscriptions:
        raise ProtocolError(
            "too_many_subscriptions",
            f"at most {s.cfg.max_subscriptions} subscriptions per connection",
            req.ref,
        )
    s.subscriptions.add(conv)
    s.services.hub.join(s, conv, req.get("after"), req.ref, req.get("streams"))


async def op_unsubscribe(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv = req["conv"]
    if conv not in s.subscriptions:
        raise ProtocolError("not_subscribed", f"not subscribed to {conv!r}", req.ref)
    s.subscriptions.discard(conv)
    s.services.hub.leave(s, conv)
    s.reply({"type": "unsubscribed", "conv": conv}, req.ref)


async def op_send(s: Session, req: Request, nursery: trio.Nursery) -> None:
    await s.acquire_send_slot()
    text = req["text"]
    msg = NewMessage(req["conv"], req["id"], s.user, text)
    await s.services.committer.submit(msg, SendTag(req.ref, req["reply"], text), s)


async def op_stop(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv, stream = req["conv"], req["stream"]
    if not s.services.replies.stop(conv, stream):
        # Perhaps generating in another chatd process: ask them all.
        transport = s.services.transport
        if not await transport.stream_exists(conv, stream):
            raise ProtocolError(
                "unknown_stream", f"no reply {stream!r} is generating in {conv!r}", req.ref
            )
        await transport.publish_control(encode({"op": "stop", "conv": conv, "stream": stream}))
    s.reply({"type": "stopping", "conv": conv, "stream": stream}, req.ref)


async def op_history(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv, limit = req["conv"], req["limit"]
    messages = await s.services.log.history(conv, req.get("before"), limit + 1)
    more = len(messages) > limit
    messages = messages[-limit:] if more else messages
    s.reply({"type": "history", "conv": conv, "messages": messages, "more": more}, req.ref)


async def op_typing(s: Session, req: Request, nursery: trio.Nursery) -> None:
    # Ephemeral and best-effort: at most one publish in flight per client.
    if not s.typing_busy:
        s.typing_busy = True
        nursery.start_soon(_publish_typing, s, req["conv"])


async def _publish_typing(s: Session, conv: str) -> None:
    try:
        await s.services.transport.publish(
            conv, encode({"type": "typing", "conv": conv, "user": s.user, "_from": s.user})
        )
    except Unavailable as exc:
        log.debug("typing for %s dropped: %s", conv, exc)
    finally:
        s.typing_busy = False


async def op_status(s: Session, req: Request, nursery: trio.Nursery) -> None:
    s.reply({"type": "status", **(await s.services.status())}, req.ref)


#: Every op a client may send, and the function that serves it.
OPS: dict[str, Callable[[Session, Request, trio.Nursery], Awaitable[None]]] = {
    "hello": op_hello,
    "ping": op_ping,
    "subscribe": op_subscribe,
    "unsubscribe": op_unsubscribe,
    "send": op_send,
    "stop": op_stop,
    "history": op_history,
    "typing": op_typing,
    "status": op_status,
}
