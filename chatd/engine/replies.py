"""Replies: assistant messages generated token by token.

The supervisor task of :func:`open_replies` is the only task that starts
replies: a session asks with :meth:`Replies.start` (a request through a
channel, answered with the reply's id or the reason it cannot start), and
each reply runs in the supervisor's nursery (:mod:`chatd.engine.reply_run`).
Tokens go out on the transient lane (:mod:`chatd.engine.lane`); the leases,
checkpoints and takeovers that keep a reply from dying with its process are
:mod:`chatd.engine.custody`'s. On shutdown a generating reply is interrupted
and committed as ``interrupted`` with what it said, a committing one
finishes its commit, both within the shutdown's deadline.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import trio

from chatd.config import LimitsConfig, RetryConfig, StreamsConfig
from chatd.engine.committer import Committer
from chatd.engine.custody import Custody
from chatd.engine.hub import Hub
from chatd.engine.lane import Lane
from chatd.engine.owed import OwedReplies
from chatd.engine.reply import REPLY_ID_PREFIX, Reply, now_ms
from chatd.engine.reply_run import ReplyRunner
from chatd.entropy import token_hex
from chatd.errors import Unavailable
from chatd.model import Model
from chatd.ports import Log, Transport
from chatd.protocol import ProtocolError
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.replies")


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
    source: Callable[[Reply], AsyncIterator[str]] | None = None


class Replies:
    """Owned by :func:`open_replies`."""

    def __init__(
        self, cfg: StreamsConfig, limits: LimitsConfig, runner: ReplyRunner, custody: Custody
    ) -> None:
        self._cfg = cfg
        self._limits = limits
        self.runner = runner
        self.lane = runner.lane
        self.custody = custody
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
        #: Sends answered without their reply starting (a retry starts it).
        self.owed = OwedReplies()

    # -- for sessions -----------------------------------------------------

    async def start(
        self,
        conv: str,
        reply_to: int,
        prompt: str,
        *,
        user: str = "",
        owner: int = 0,
        source: Callable[[Reply], AsyncIterator[str]] | None = None,
    ) -> str:
        """Start a reply to message ``reply_to``, asked by ``user`` on connection
        ``owner``; returns its id. ``source``: its tokens come from there, not
        from the model (an agent streaming its reply in).

        Raises ProtocolError at a limit (``too_many_streams`` for the process,
        ``too_many_replies`` for the user or the connection), and
        :class:`ShuttingDown` once the server stops taking replies.
        """
        send, receive = trio.open_memory_channel[str | Exception](1)
        try:
            self._starts_send.send_nowait(_Start(conv, reply_to, prompt, user, owner, send, source))
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
        runner, custody = self.runner, self.custody
        return {
            "streams_active": len(self.active),
            "streams_started": self.started,
            "streams_completed": runner.completed,
            "streams_interrupted": runner.interrupted,
            "streams_failed": runner.failed,
            "streams_taken_over": runner.takeovers,
            "streams_owed": len(self.owed),
            "streams_started_by_retry": self.owed.paid,
            "lane_deltas": self.lane.deltas,
            "lane_failures": self.lane.failures,
            "stream_commit_retries": runner.commit_retries,
            "streams_found_stored": runner.found_stored,
            "checkpoints": custody.checkpoints,
            "fenced": custody.fenced,
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
                        id=REPLY_ID_PREFIX + token_hex(8),
                        conv=req.conv,
                        reply_to=req.reply_to,
                        prompt=req.prompt,
                        user=self._cfg.assistant_user,
                        started_ms=now_ms(),
                        source=req.source,
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
            await self.runner.run(r)
        finally:
            self.running -= 1
            self.active.pop(r.id, None)
            self._changed.set()
            self._changed = trio.Event()
            for counts, key in ((self._by_user, user), (self._by_owner, owner)):
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]

    async def _control(self, control: trio.MemoryReceiveChannel[str]) -> None:
        """Control messages from other chatd processes (stop a reply running here)."""
        async for data in control:
            try:
                msg = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(msg, dict) and msg.get("op") == "stop":
                self.stop(str(msg.get("conv")), str(msg.get("stream")))


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
    """Own the lane, the custody tasks, the supervisor and every reply's task for the
    duration of the block.

    Leaving it cancels them: generating replies are committed ``interrupted``,
    a committing one finishes, within the shutdown's deadline.
    """
    lane = Lane(transport, cfg, retry)
    custody = Custody(log, cfg, retry, lane)
    runner = ReplyRunner(
        cfg,
        retry,
        context_messages=context_messages,
        log=log,
        transport=transport,
        committer=committer,
        hub=hub,
        lane=lane,
        model=model,
        custody=custody,
        shutdown=shutdown,
    )
    replies = Replies(cfg, limits, runner, custody)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lane.run, name="lane")
        nursery.start_soon(custody.heartbeat, name="lease")
        nursery.start_soon(custody.registrar, name="registrar")
        nursery.start_soon(custody.reap, runner.take_over, name="reaper")
        if cfg.persistence == "checkpoint":
            nursery.start_soon(custody.checkpoint, name="checkpoints")
        nursery.start_soon(replies._supervise, name="replies")
        nursery.start_soon(replies._control, control, name="replies control")
        yield replies
        nursery.cancel_scope.cancel()
