"""The client ops: one function per op of the wire protocol, and :data:`OPS`, the table.

Each op runs in the session's reader task with a validated request
(:func:`chatd.protocol.parse`) from a client that said hello. It answers
through the session's queue, raises :class:`~chatd.protocol.ProtocolError`
for a request it refuses (no grant, over a limit), or
:class:`~chatd.errors.Unavailable` when a backing service cannot serve it.
Every op on a conversation checks the client's rights first (read: subscribe,
history; write: send, typing, stop).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from chatd.errors import Unavailable
from chatd.identity import Identity
from chatd.limits import RefusalLog, TokenBucket
from chatd.protocol import PROTOCOL_VERSION, ProtocolError, Request, encode
from chatd.records import NewMessage, fit_newest

if TYPE_CHECKING:
    from chatd.engine.access import Access
    from chatd.engine.committer import Committer
    from chatd.engine.hub import Hub
    from chatd.engine.replies import Replies
    from chatd.engine.session import Session
    from chatd.ports import Log, Transport

log = logging.getLogger("chatd.session")


@dataclass(slots=True)
class SendTag:
    """What the session's writer needs to answer one send (the committer never looks)."""

    ref: Any
    wants_reply: bool
    prompt: str
    #: When the send arrived (Trio's clock): its answer's latency is measured from here.
    received: float


@dataclass(frozen=True)
class Services:
    """What a session may use."""

    log: Log
    hub: Hub
    committer: Committer
    replies: Replies
    transport: Transport
    access: Access
    #: Resolves a ``hello`` or ``refresh`` to an identity; raises ProtocolError.
    identify: Callable[[Request], Awaitable[Identity]]
    #: The server's health and counters, for the ``status`` op.
    status: Callable[[], Awaitable[dict[str, Any]]]
    refusals: RefusalLog
    #: History pages read at once ([limits].history_in_flight).
    history_slots: trio.Semaphore
    #: Largest history page in bytes ([store].page_bytes).
    page_bytes: int


def _limited(bucket: TokenBucket, what: str, req: Request, cost: float = 1.0, **extra: Any) -> None:
    wait = bucket.take(cost)
    if wait:
        ms = max(1, round(wait * 1000))
        raise ProtocolError(
            "rate_limited",
            f"more than {bucket.rate:g} {what}/s (burst {bucket.burst}): retry in {ms} ms",
            req.ref,
            retryable=True,
            retry_after_ms=ms,
            **extra,
        )


def _welcome(identity: Identity, kind: str) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": kind, "user": identity.user, "protocol": PROTOCOL_VERSION}
    if identity.expires_at is not None:
        frame["expires_in"] = max(0, round(identity.expires_at - trio.current_time()))
    return frame


async def op_hello(s: Session, req: Request, nursery: trio.Nursery) -> None:
    if s.identity is not None:
        raise ProtocolError("already_authenticated", f"already said hello as {s.user!r}", req.ref)
    s.identity = await s.services.identify(req)
    if s.identity.expires_at is not None:
        nursery.start_soon(s.watch_expiry)
    s.reply(_welcome(s.identity, "welcome"), req.ref)


async def op_refresh(s: Session, req: Request, nursery: trio.Nursery) -> None:
    assert s.identity is not None
    fresh = await s.services.identify(req)
    if fresh.user != s.identity.user:
        raise ProtocolError(
            "unauthorized", f"the token is for {fresh.user!r}, not {s.identity.user!r}", req.ref
        )
    s.identity = fresh
    # The new token's grants apply at once to the subscriptions already running.
    for conv in sorted(s.subscriptions):
        if "r" not in await s.services.access.rights(fresh, conv):
            s.revoke(conv)
    s.reply(_welcome(fresh, "refreshed"), req.ref)


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
    _limited(s.reads, "subscriptions and history pages", req)
    identity = s.identity
    assert identity is not None
    await s.services.access.require(identity, conv, "r", req.ref)
    if "r" not in identity.grants.rights(conv):
        s.services.access.watch(s, conv)  # a membership allows it: re-checked
    s.subscriptions.add(conv)
    s.services.hub.join(s, conv, req.get("after"), req.ref, req.get("streams"))


async def op_unsubscribe(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv = req["conv"]
    if conv not in s.subscriptions:
        raise ProtocolError("not_subscribed", f"not subscribed to {conv!r}", req.ref)
    s.leave(conv)
    s.reply({"type": "unsubscribed", "conv": conv}, req.ref)


async def op_send(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv, client_id = req["conv"], req["id"]
    _limited(s.sends, "sends", req, conv=conv, id=client_id)
    identity = s.identity
    assert identity is not None
    await s.services.access.require(identity, conv, "w", req.ref)
    await s.acquire_send_slot()
    text = req["text"]
    msg = NewMessage(conv, client_id, identity.user, text)
    await s.services.committer.submit(
        msg, SendTag(req.ref, req["reply"], text, trio.current_time()), s
    )


async def op_stop(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv, stream = req["conv"], req["stream"]
    assert s.identity is not None
    await s.services.access.require(s.identity, conv, "w", req.ref)
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
    _limited(s.reads, "subscriptions and history pages", req, cost=max(1.0, limit / 50))
    assert s.identity is not None
    await s.services.access.require(s.identity, conv, "r", req.ref)
    async with s.services.history_slots:
        messages = await s.services.log.history(conv, req.get("before"), limit + 1)
    more = len(messages) > limit
    messages = messages[-limit:] if more else messages
    # A page of large messages is cut to the byte budget: the client pages on
    # with ``before`` as for any page.
    fitted = fit_newest(messages, s.services.page_bytes)
    more = more or len(fitted) < len(messages)
    s.reply({"type": "history", "conv": conv, "messages": fitted, "more": more}, req.ref)


async def op_typing(s: Session, req: Request, nursery: trio.Nursery) -> None:
    conv = req["conv"]
    assert s.identity is not None
    await s.services.access.require(s.identity, conv, "w", req.ref)
    # Ephemeral and best-effort: at most one publish in flight per client.
    if not s.typing_busy:
        s.typing_busy = True
        nursery.start_soon(_publish_typing, s, conv)


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
    assert s.identity is not None
    if not s.identity.grants.operator:
        raise ProtocolError("forbidden", "status is for operators (an operator grant)", req.ref)
    s.reply({"type": "status", **(await s.services.status())}, req.ref)


#: Every op a client may send, and the function that serves it.
OPS: dict[str, Callable[[Session, Request, trio.Nursery], Awaitable[None]]] = {
    "hello": op_hello,
    "refresh": op_refresh,
    "ping": op_ping,
    "subscribe": op_subscribe,
    "unsubscribe": op_unsubscribe,
    "send": op_send,
    "stop": op_stop,
    "history": op_history,
    "typing": op_typing,
    "status": op_status,
}
