"""Replies: assistant messages generated token by token, on the transient lane.

Every reply's task is owned by the supervisor task of :func:`open_replies`,
which is the only task that starts replies: a session asks with
:meth:`Replies.start` (a request through a channel, answered with the
reply's id or the reason it cannot start). A reply's token task appends to
its text; the lane (:mod:`chatd.engine.lane`) ships it. When generation ends
the reply commits through :meth:`Committer.commit_now` (shielded, bounded,
retried with backoff while the log is unavailable), then ends with
``stream.end`` carrying its seq. If the model fails, the partial is
discarded and subscribers get ``stream.error``: the log never holds an
incomplete reply. On shutdown a generating reply is interrupted
(``stream.error`` ``interrupted``), a committing one finishes its commit;
both within the shutdown's deadline, and the end frame is also handed to
this process's own subscribers directly.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from chatd.backoff import Backoff
from chatd.config import LimitsConfig, RetryConfig, StreamsConfig
from chatd.engine.committer import Committer
from chatd.engine.hub import Hub
from chatd.engine.lane import Lane
from chatd.engine.reply import REPLY_ID_PREFIX, Reply, now_ms
from chatd.errors import BusUnavailable, ModelError, StoreError, StoreUnavailable, Unavailable
from chatd.model import Model, ModelRequest
from chatd.ports import Log, Transport
from chatd.protocol import ProtocolError, encode
from chatd.records import NewMessage
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.replies")

#: How long a finished reply waits for its last frames to reach the transport.
_END_WAIT = 2.0


class ShuttingDown(Unavailable):
    """The server is shutting down: retry on another server (or after the restart)."""


@dataclass
class _Start:
    conv: str
    reply_to: int
    prompt: str
    #: Who asked: the user, and its connection.
    user: str
    owner: int
    answer: trio.MemorySendChannel[str | Exception]


class Replies:
    """Owned by :func:`open_replies`."""

    def __init__(
        self,
        cfg: StreamsConfig,
        retry: RetryConfig,
        *,
        limits: LimitsConfig,
        context_messages: int,
        log: Log,
        committer: Committer,
        hub: Hub,
        lane: Lane,
        model: Model,
        shutdown: ShutdownClock,
    ) -> None:
        self._cfg = cfg
        self._retry = retry
        self._limits = limits
        self._context_messages = context_messages
        self._log = log
        self._committer = committer
        self._hub = hub
        self.lane = lane
        self._model = model
        self._shutdown = shutdown
        self._starts_send, self._starts = trio.open_memory_channel[_Start](math.inf)
        #: Replies generating or committing in this process.
        self.active: dict[str, Reply] = {}
        #: Replies running per user and per connection (the supervisor's, like active).
        self._by_user: Counter[str] = Counter()
        self._by_owner: Counter[int] = Counter()
        self._changed = trio.Event()
        #: Reply tasks alive (a reply's task outlives its entry in ``active``
        #: while it publishes its end).
        self.running = 0
        self.started = 0
        self.completed = 0
        self.failed = 0
        self.commit_retries = 0

    # -- for sessions -----------------------------------------------------

    async def start(
        self, conv: str, reply_to: int, prompt: str, *, user: str = "", owner: int = 0
    ) -> str:
        """Start a reply to message ``reply_to``, asked by ``user`` on connection
        ``owner``; returns its id.

        Raises ProtocolError at a limit (``too_many_streams`` for the process,
        ``too_many_replies`` for the user or the connection), and
        :class:`ShuttingDown` once the server stops taking replies.
        """
        send, receive = trio.open_memory_channel[str | Exception](1)
        try:
            self._starts_send.send_nowait(_Start(conv, reply_to, prompt, user, owner, send))
        except trio.ClosedResourceError:
            raise ShuttingDown("the server is shutting down; no new replies") from None
        try:
            answer = await receive.receive()
        except trio.EndOfChannel:
            raise ShuttingDown("the server is shutting down; no new replies") from None
        if isinstance(answer, Exception):
            raise answer
        return answer

    def stop(self, conv: str, stream: str) -> bool:
        """Stop a reply generating in this process; what it said so far is committed."""
        r = self.active.get(stream)
        if r is None or r.conv != conv or r.state != "generating":
            return False
        r.stopped = True
        if r.scope is not None:
            r.scope.cancel()
        return True

    def status(self) -> dict[str, Any]:
        return {
            "streams_active": len(self.active),
            "streams_started": self.started,
            "streams_completed": self.completed,
            "streams_failed": self.failed,
            "lane_deltas": self.lane.deltas,
            "lane_failures": self.lane.failures,
            "stream_commit_retries": self.commit_retries,
        }

    # -- for the server's shutdown -------------------------------------------

    def interrupt_all(self) -> None:
        """Take no new replies; interrupt every reply still generating."""
        self._starts_send.close()
        for r in self.active.values():
            if r.state == "generating":
                r.interrupted = True
                if r.scope is not None:
                    r.scope.cancel()

    async def wait_ended(self) -> None:
        """Return once no reply is left in this process."""
        while self.active:
            await self._changed.wait()

    # -- the supervisor -----------------------------------------------------

    async def _supervise(self) -> None:
        try:
            async with trio.open_nursery() as replies:
                async for req in self._starts:
                    refusal = self._over_a_limit(req)
                    if refusal is not None:
                        _answer(req, refusal)
                        continue
                    r = Reply(
                        id=REPLY_ID_PREFIX + secrets.token_hex(8),
                        conv=req.conv,
                        reply_to=req.reply_to,
                        prompt=req.prompt,
                        user=self._cfg.assistant_user,
                        started_ms=now_ms(),
                    )
                    self.active[r.id] = r
                    self._by_user[req.user] += 1
                    self._by_owner[req.owner] += 1
                    self.started += 1
                    self.lane.mark(r)  # announce it (stream.start) right away
                    replies.start_soon(self._run, r, req.user, req.owner, name=f"reply {r.id}")
                    _answer(req, r.id)
        finally:
            self._starts_send.close()
            while True:
                try:
                    req = self._starts.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                _answer(req, ShuttingDown("the server is shutting down; no new replies"))

    async def _control(self, control: trio.MemoryReceiveChannel[str]) -> None:
        """Control messages from other chatd processes (stop a reply running here)."""
        async for data in control:
            try:
                msg = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(msg, dict) and msg.get("op") == "stop":
                self.stop(str(msg.get("conv")), str(msg.get("stream")))

    # -- one reply ----------------------------------------------------------

    def _over_a_limit(self, req: _Start) -> ProtocolError | None:
        if len(self.active) >= self._cfg.max_streams:
            return ProtocolError(
                "too_many_streams",
                f"this server is generating {len(self.active)} replies, its limit; retry later",
            )
        if self._by_owner[req.owner] >= self._limits.replies_per_connection:
            return ProtocolError(
                "too_many_replies",
                f"at most {self._limits.replies_per_connection} replies at once per "
                "connection; wait for one to end",
            )
        if self._by_user[req.user] >= self._limits.replies_per_user:
            return ProtocolError(
                "too_many_replies",
                f"at most {self._limits.replies_per_user} replies at once per user; "
                "wait for one to end",
            )
        return None

    async def _run(self, r: Reply, user: str, owner: int) -> None:
        self.running += 1
        try:
            await self._lifecycle(r)
        finally:
            self.running -= 1
            for counts, key in ((self._by_user, user), (self._by_owner, owner)):
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]

    async def _lifecycle(self, r: Reply) -> None:
        end: dict[str, Any] | None = None
        try:
            error = await self._generate(r)
            if r.interrupted:
                end = r.error(
                    "interrupted", "the server shut down during the reply", retryable=True
                )
            elif error is not None:
                log.warning("reply %s in %s failed: %s", r.id, r.conv, error)
                self.failed += 1
                end = r.error("model_failed", str(error), retryable=True)
            else:
                r.state = "committing"
                end = await self._commit(r)
        finally:
            r.state = "ended"
            del self.active[r.id]
            self._changed.set()
            self._changed = trio.Event()
            if end is None:  # cancelled while generating: the server is stopping
                end = r.error(
                    "interrupted", "the server shut down during the reply", retryable=True
                )
            await self._finish(r, end)

    async def _generate(self, r: Reply) -> ModelError | None:
        error: ModelError | None = None
        try:
            context: list[dict[str, Any]] = []
            if self._model.wants_context:
                context = await self._log.history(r.conv, r.reply_to + 1, self._context_messages)
            request = ModelRequest(r.conv, r.prompt, context)
            with trio.move_on_after(self._cfg.max_duration) as deadline:
                async with trio.open_nursery() as nursery:
                    r.scope = nursery.cancel_scope
                    if r.stopped or r.interrupted:
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(self._tokens, r, request)
        except* ModelError as group:
            error = group.exceptions[0]  # type: ignore[assignment]
        except* Unavailable as group:
            error = ModelError(f"cannot read the conversation: {group.exceptions[0]}")
        except* Exception as group:
            # A bug in one reply must not take the server's other replies down.
            log.error("reply %s crashed", r.id, exc_info=group)
            error = ModelError("internal error while generating the reply")
        if error is not None:
            return error
        if deadline.cancelled_caught:
            return ModelError(f"the reply took longer than {self._cfg.max_duration:g}s")
        return None

    async def _tokens(self, r: Reply, request: ModelRequest) -> None:
        room = self._cfg.max_reply_chars
        async with aclosing(self._model.generate(request)) as tokens:
            async for token in tokens:
                if "\x00" in token:
                    # Postgres cannot store U+0000: a model emitting one must not
                    # make its whole reply uncommittable.
                    token = token.replace("\x00", "\ufffd")
                if r.length + len(token) > room:
                    r.append(token[: room - r.length])
                    r.truncated = True
                    self.lane.mark(r)
                    return
                r.append(token)
                self.lane.mark(r)

    async def _commit(self, r: Reply) -> dict[str, Any]:
        status = "stopped" if r.stopped or r.truncated else "complete"
        msg = NewMessage(r.conv, r.id, r.user, r.text, role="assistant", status=status)
        backoff = Backoff.of(self._retry)
        last: Exception | None = None
        # The commit completes even if the server is shutting down, within a bound.
        with self._shutdown.shield(self._cfg.commit_timeout):
            while True:
                try:
                    committed = await self._committer.commit_now(msg)
                except StoreUnavailable as exc:
                    last = exc
                    self.commit_retries += 1
                    await backoff.sleep()
                    continue
                except StoreError as exc:
                    last = exc
                    break
                self.completed += 1
                return r.end(committed.seq, status, len(msg.text))
        self.failed += 1
        reason = f"{last}" if last else f"no commit within {self._cfg.commit_timeout:g}s"
        log.error("reply %s in %s could not be committed and is lost: %s", r.id, r.conv, reason)
        return r.error("commit_failed", f"the reply could not be stored: {reason}", retryable=True)

    async def _finish(self, r: Reply, end: dict[str, Any]) -> None:
        """Publish the end frame after the reply's last delta (bounded, even on shutdown)."""
        r.end_frame = encode(end)
        self.lane.mark(r)
        if self._shutdown.started:
            # This process's own clients are about to be closed: give them the end now.
            self._hub.deliver_local(r.conv, r.end_frame)
        with self._shutdown.shield(_END_WAIT):
            while not r.end_sent:
                if self.lane.alive:
                    await r.flushed.wait()
                    continue
                try:  # the lane is gone (shutdown): one direct attempt
                    await self.lane.send([r])
                except BusUnavailable as exc:
                    log.info("end of reply %s not published: %s", r.id, exc)
                break
        if not r.end_sent:
            # The transport is down: local clients still learn the end (the lane
            # keeps trying to publish it for the others).
            self._hub.deliver_local(r.conv, r.end_frame)


def _answer(req: _Start, answer: str | Exception) -> None:
    try:
        req.answer.send_nowait(answer)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the asker is gone


@asynccontextmanager
async def open_replies(
    cfg: StreamsConfig,
    retry: RetryConfig,
    *,
    limits: LimitsConfig,
    context_messages: int,
    log: Log,
    committer: Committer,
    hub: Hub,
    transport: Transport,
    model: Model,
    shutdown: ShutdownClock,
    control: trio.MemoryReceiveChannel[str],
) -> AsyncIterator[Replies]:
    """Own the lane, the supervisor and every reply's task for the duration of the block.

    Leaving it cancels them: generating replies end ``interrupted``, a
    committing one finishes (bounded by the shutdown's deadline).
    """
    lane = Lane(transport, cfg, retry)
    replies = Replies(
        cfg,
        retry,
        limits=limits,
        context_messages=context_messages,
        log=log,
        committer=committer,
        hub=hub,
        lane=lane,
        model=model,
        shutdown=shutdown,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run, name="lane")
        nursery.start_soon(replies._supervise, name="replies")
        nursery.start_soon(replies._control, control, name="replies control")
        yield replies
        nursery.cancel_scope.cancel()
