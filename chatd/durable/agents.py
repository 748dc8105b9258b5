"""Bring your own agent: an application that runs its model itself streams a
reply into a conversation through a durable stream.

1. ``POST /v1/conversations/<conv>/replies`` (body optional:
   ``{"reply_to": <seq>}``) starts a reply in this process, exactly like one a
   user asked chatd's model for, and creates its stream
   ``/v1/stream/replies/<conv>/<reply id>`` (``text/plain; charset=utf-8``).
2. The agent appends the reply's text to that stream as it generates it,
   best with an idempotent producer (a retried append is stored once). Each
   append is in Postgres before it is acknowledged: the reply is persisted as
   it is generated, through the protocol.
3. chatd follows the stream: every append goes out to the conversation's
   WebSocket subscribers as the reply's deltas (the same lane, checkpoints,
   stop and takeover as chatd's own replies).
4. The agent closes the stream (``Stream-Closed: true``): the reply is
   committed to the conversation as ``complete``. A producer silent for
   ``[durable].agent_idle_timeout`` gets its reply committed ``interrupted``
   (or failed, if it never said anything). When the reply ends any other way
   (a user stopped it, the server stopped), chatd closes the stream, so the
   agent's next append answers 409 with ``Stream-Closed: true``.
"""

from __future__ import annotations

import codecs
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from chatd.config import DurableConfig
from chatd.durable.model import Append, Create, DSError
from chatd.durable.service import Streams
from chatd.engine.reply import Reply
from chatd.errors import ModelError, Unavailable

#: Reply streams live under this path: created only by a reply's start.
PREFIX = "replies/"
CONTENT_TYPE = "text/plain; charset=utf-8"
Start = Callable[..., Awaitable[str]]
Head = Callable[[str], Awaitable[int]]
#: Agents have no connection: each reply counts as its own "connection", so
#: only the per-user and per-process limits apply to them.
_owners = itertools.count(-1, -1)
#: While the stream is missing or the store is down, look again this often.
_RETRY = 0.5


def reply_path(conv: str, reply_id: str) -> str:
    return f"{PREFIX}{conv}/{reply_id}"


def reply_conv(path: str) -> str | None:
    """The conversation a reply stream's path belongs to, or None."""
    if not path.startswith(PREFIX):
        return None
    conv, _, rest = path[len(PREFIX) :].partition("/")
    return conv if conv and rest and "/" not in rest else None


class AgentReplies:
    """Replies whose tokens an agent appends to a durable stream."""

    def __init__(self, streams: Streams, start: Start, head: Head, cfg: DurableConfig) -> None:
        self._streams = streams
        self._start = start
        self._head = head
        self._cfg = cfg

    async def start(self, conv: str, user: str, reply_to: int | None) -> tuple[str, str]:
        """Start a reply in ``conv`` asked by ``user``; its id and its stream's path."""
        if reply_to is None:
            reply_to = await self._head(conv)
        reply_id = await self._start(
            conv, reply_to, "", user=user, owner=next(_owners), source=self._follow
        )
        path = reply_path(conv, reply_id)
        # Created after the reply started (its id names it): the reply's reader
        # waits for it (a creation wakes it), within the idle timeout.
        await self._streams.create(
            path,
            Create(
                content_type=CONTENT_TYPE,
                ttl=self._cfg.reply_stream_ttl or None,
                expires_at=None,
                closed=False,
                body=b"",
            ),
        )
        return reply_id, path

    def _follow(self, r: Reply) -> AsyncIterator[str]:
        return self._tokens(r, reply_path(r.conv, r.id))

    async def _tokens(self, r: Reply, path: str) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pos = 0
        idle = self._cfg.agent_idle_timeout
        heard = trio.current_time()
        try:
            async with self._streams.reading(path):
                while True:
                    ticket = self._streams.ticket(path)
                    row, chunks = None, []
                    try:
                        row, chunks = await self._streams.read(path, pos, 1 << 20)
                    except (DSError, Unavailable):
                        pass  # not created yet, or the store is down: look again
                    if chunks:
                        pos = chunks[-1][1]
                        heard = trio.current_time()
                        text = decoder.decode(b"".join(c[2] for c in chunks))
                        if text:
                            yield text
                        continue
                    if row is not None and row.closed and pos >= row.tail:
                        rest = decoder.decode(b"", final=True)
                        if rest:
                            yield rest
                        return
                    left = heard + idle - trio.current_time()
                    if left <= 0:
                        if r.length == 0:
                            raise ModelError(f"the agent sent nothing within {idle:g}s")
                        r.interrupted = True  # committed as what it said so far
                        return
                    with trio.move_on_after(min(left, _RETRY) if row is None else left):
                        await ticket.wait()
        finally:
            # However the reply ends, its stream is closed: the agent learns it
            # at its next append (409, Stream-Closed: true).
            with trio.move_on_after(2.0, shield=True):
                try:
                    await self._streams.append(path, Append(None, b"", close=True))
                except (DSError, Unavailable):
                    pass
