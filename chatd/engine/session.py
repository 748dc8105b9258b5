"""One client's session: two tasks over one :class:`~chatd.ports.Connection`.

* The **reader** parses frames and runs each op (:mod:`chatd.engine.ops`). It
  never waits on other clients: a send is submitted to the group committer,
  a subscribe is a request to the hub.
* The **writer** owns the session's inbox: frames queued by the feeds
  (:meth:`Session.deliver`), the outcomes of the sends this session
  submitted (the committer hands each to :meth:`Session.send_nowait`, as it
  would to a channel), and subscriptions whose access was revoked
  (:meth:`Session.revoke`). It turns outcomes into answers (and starts the
  replies asked for), and sends queued frames, many per socket write, each
  write within ``[limits].write_timeout``. The queue is bounded in frames and
  bytes: a client that lets it fill, or does not take a write in time, is
  closed with 4008.

Two more tasks when they are needed: the **keepalive** pings the client every
``[limits].ping_interval`` and ends a session whose peer does not answer
(4009); the **expiry** watch closes a token's session when the token expires
without a ``refresh`` (4003).

Shutdown: :meth:`Session.stop_taking_work` (frames still arriving are
answered ``unavailable``, retry elsewhere), then (once every send is answered
and the replies have ended) :meth:`Session.close`, which flushes the queue
and closes with 1001. When the session is cancelled instead, its sends are
still answered and the close still sent, within the shutdown's deadline.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import trio

from chatd.config import LimitsConfig, ServerConfig
from chatd.engine import answers
from chatd.engine.ops import OPS, SendTag, Services
from chatd.engine.replies import ShuttingDown
from chatd.errors import Unavailable
from chatd.histogram import ACK_SECONDS, Histogram
from chatd.identity import Identity
from chatd.limits import TokenBucket
from chatd.ports import Connection, ConnectionGone
from chatd.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_HELLO_TIMEOUT,
    CLOSE_NO_PONG,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    Limits,
    ProtocolError,
    Request,
    encode,
    error_frame,
    parse,
)
from chatd.records import Outcome
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.session")

_ids = itertools.count(1)
#: A client too stuck even to take the frame in flight is cut off after this.
_DROP_GRACE = 5.0
#: Longest wait for the client's side of the close handshake.
_CLOSE_WAIT = 1.0
# Frames queued together are written with one socket send up to this size.
_WRITE_BYTES = 64 * 1024


@dataclass
class SessionCounters:
    """What every session of the process counts, for operators."""

    slow_disconnects: int = 0
    hello_timeouts: int = 0
    dead_peers: int = 0
    expired_tokens: int = 0
    revoked_subscriptions: int = 0
    crashed: int = 0
    #: Times a client over its frame budget was not read from for a while.
    throttled: int = 0
    #: Client ops by (op, result): "ok" or the error code they were answered with.
    #: A send's result is its answer's: ok, duplicate, unavailable or internal.
    ops: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Seconds from a send's arrival to its answer.
    ack_seconds: Histogram = field(default_factory=lambda: Histogram(ACK_SECONDS))


class Session:
    """A connected client. Implements the feeds' ``Subscriber`` protocol."""

    def __init__(
        self,
        conn: Connection,
        services: Services,
        cfg: ServerConfig,
        limits: Limits,
        spend: LimitsConfig,
        shutdown: ShutdownClock,
        counters: SessionCounters,
    ) -> None:
        self.conn = conn
        self.services = services
        self.cfg = cfg
        self.limits = limits
        self._spend = spend
        self._shutdown = shutdown
        self._counters = counters
        self.id = next(_ids)
        self.identity: Identity | None = None
        self.sends = TokenBucket(spend.send_rate, spend.send_burst)
        self.reads = TokenBucket(spend.read_rate, spend.read_burst)
        self._frames = TokenBucket(spend.frame_rate, spend.frame_burst)
        self.subscriptions: set[str] = set()
        #: Subscriptions whose read access was revoked, for the writer to end.
        self._revoked: deque[str] = deque()
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._wakeup = trio.Event()
        self._inflight = trio.Semaphore(cfg.max_inflight_sends)
        #: Outcomes of this session's sends, in commit order (at most max_inflight_sends).
        self._outcomes: deque[Outcome] = deque()
        #: Set when a send is answered, while a shutdown waits for that.
        self._answered: trio.Event | None = None
        self.typing_busy = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._graceful = False
        #: The stream cannot carry a close frame (a write cut mid-frame, a dead peer).
        self._aborted = False
        self._scope: trio.CancelScope | None = None
        #: Shutting down: frames still read are answered "unavailable", not served.
        self._draining = False

    # -- outbound ---------------------------------------------------------

    def deliver(self, text: str) -> bool:
        """Queue a frame for the client without blocking; False once it is dropped."""
        if self._close_code is not None and not self._graceful:
            return False
        size = len(text)
        # The bound limits accumulation: one frame into an empty queue always fits
        # (a large snapshot), anything queued behind it counts.
        if self._queue and (
            len(self._queue) >= self.cfg.send_queue_frames
            or self._queued_bytes + size > self.cfg.send_queue_bytes
        ):
            self._counters.slow_disconnects += 1
            self._drop(
                CLOSE_SLOW_CONSUMER,
                "slow consumer: send queue full; reconnect and resume with 'after'",
            )
            return False
        self._queue.append(text)
        self._queued_bytes += size
        self._wakeup.set()
        return True

    @property
    def user(self) -> str:
        return self.identity.user if self.identity is not None else ""

    def revoke(self, conv: str) -> None:
        """Access to ``conv`` is gone: the writer ends the subscription (never blocks)."""
        self._revoked.append(conv)
        self._wakeup.set()

    def leave(self, conv: str) -> None:
        """End the subscription to ``conv`` (the client is told by the caller)."""
        self.subscriptions.discard(conv)
        self.services.hub.leave(self, conv)
        self.services.access.unwatch(self, conv)

    def send_nowait(self, outcome: Outcome) -> None:
        """The committer hands over a send's outcome (the session's inbox, never blocks)."""
        self._outcomes.append(outcome)
        self._wakeup.set()

    def reply(self, frame: dict[str, Any], ref: Any = None) -> None:
        if ref is not None:
            frame["ref"] = ref
        self.deliver(encode(frame))

    def subscription_failed(self, conv: str) -> None:
        # The client was told (an error frame); it may subscribe again.
        if conv in self.subscriptions:
            self.leave(conv)

    def _drop(self, code: int, reason: str) -> None:
        """Close with ``code`` now: the writer finishes the frame in flight (cutting
        it would corrupt the stream), then closes; a client too stuck even for
        that is cut off after ``_DROP_GRACE`` seconds."""
        if self._close_code is not None and not self._graceful:
            return
        self._close_code, self._close_reason, self._graceful = code, reason, False
        self._queue.clear()
        self._queued_bytes = 0
        self._wakeup.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + _DROP_GRACE)

    # -- shutdown, from the server ------------------------------------------

    def stop_taking_work(self) -> None:
        """Shutting down: every frame read from now on is answered ``unavailable``
        (retry elsewhere) instead of served; sends in flight are still answered."""
        self._draining = True

    @property
    def sends_in_flight(self) -> int:
        return self.cfg.max_inflight_sends - self._inflight.value

    async def sends_answered(self) -> None:
        """Return once every send submitted so far has been answered."""
        while self.sends_in_flight:
            self._answered = trio.Event()
            await self._answered.wait()
        self._answered = None

    def close(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        """Send what is queued, then close with ``code``."""
        if self._close_code is None:
            self._close_code, self._close_reason, self._graceful = code, reason, True
            self._wakeup.set()

    # -- lifecycle ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves, misbehaves or the server stops."""
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, nursery)
                    if self._spend.ping_interval > 0:
                        nursery.start_soon(self._keepalive)
                    await self._writer()
                    nursery.cancel_scope.cancel()
        except* ConnectionGone:
            pass  # the client went away; nothing to answer
        finally:
            for conv in list(self.subscriptions):
                self.services.hub.leave(self, conv)
            self.subscriptions.clear()
            self.services.access.unwatch(self)
            if not self.conn.is_closed:
                await self._last_words()

    async def _last_words(self) -> None:
        """Answer the sends still in flight, flush, close: within the shutdown's deadline."""
        if self._aborted:
            await self.conn.abort()
            return
        with self._shutdown.shield(_DROP_GRACE, "close"):
            try:
                while self.sends_in_flight and self._close_code != CLOSE_SLOW_CONSUMER:
                    if not self._outcomes:
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                        continue
                    self._answer(self._outcomes.popleft(), last=True)
                if self._close_code != CLOSE_SLOW_CONSUMER:
                    frames = list(self._queue)
                    self._queue.clear()
                    if frames:
                        await self.conn.send_frames(frames)
            except ConnectionGone:
                return
            with trio.move_on_after(_CLOSE_WAIT):
                await self.conn.aclose(
                    self._close_code or CLOSE_GOING_AWAY,
                    self._close_reason or "server shutting down",
                )

    async def _writer(self) -> None:
        """Answer outcomes and send queued frames; returns once the session is closing."""
        while True:
            while self._outcomes and (self._close_code is None or self._graceful):
                outcome = self._outcomes.popleft()
                if self._answer(outcome):
                    await self._start_reply(outcome)
            while self._revoked:
                self._end_revoked(self._revoked.popleft())
            while self._queue and (self._close_code is None or self._graceful):
                frames = [self._queue.popleft()]
                size = len(frames[0])
                while self._queue and size < _WRITE_BYTES:
                    frames.append(self._queue.popleft())
                    size += len(frames[-1])
                self._queued_bytes -= size
                with trio.move_on_after(self._spend.write_timeout) as write:
                    await self.conn.send_frames(frames)
                if write.cancelled_caught:
                    # Cut mid-frame: the stream is unusable, nothing more can be sent.
                    self._counters.slow_disconnects += 1
                    self._aborted = True
                    self._drop(
                        CLOSE_SLOW_CONSUMER,
                        f"slow consumer: a write took over {self._spend.write_timeout:g}s",
                    )
                    return
            if self._close_code is not None:
                return
            self._wakeup = trio.Event()
            if not self._queue and not self._outcomes and not self._revoked:
                await self._wakeup.wait()

    def _end_revoked(self, conv: str) -> None:
        if conv not in self.subscriptions:
            return
        self._counters.revoked_subscriptions += 1
        self.leave(conv)
        self.reply({"type": "unsubscribed", "conv": conv, "reason": "access revoked"})

    async def _keepalive(self) -> None:
        """Ping the client; a peer that does not answer in time is dead."""
        while True:
            await trio.sleep(self._spend.ping_interval)
            with trio.move_on_after(self._spend.ping_timeout) as pong:
                await self.conn.ping()
            if pong.cancelled_caught:
                self._counters.dead_peers += 1
                self._aborted = True  # no close frame: nobody is listening
                self._drop(CLOSE_NO_PONG, "no pong: the connection is dead")
                return

    async def watch_expiry(self) -> None:
        """Close the session when its token expires, unless a refresh extended it."""
        while self.identity is not None and self.identity.expires_at is not None:
            await trio.sleep_until(self.identity.expires_at)
            expires = self.identity.expires_at
            if expires is not None and trio.current_time() >= expires:
                self._counters.expired_tokens += 1
                self._drop(CLOSE_TOKEN_EXPIRED, "token expired: reconnect with a fresh token")
                return

    async def _reader(self, nursery: trio.Nursery) -> None:
        with trio.move_on_after(self.cfg.hello_timeout) as hello_scope:
            while not self.user:
                await self._handle_frame(await self.conn.get_message(), nursery, OPS)
        if hello_scope.cancelled_caught:
            self._counters.hello_timeouts += 1
            self._drop(CLOSE_HELLO_TIMEOUT, "no hello received in time")
            return
        while True:
            await self._handle_frame(await self.conn.get_message(), nursery, OPS)

    async def _handle_frame(self, data: str | bytes, nursery: trio.Nursery, ops: Any) -> None:
        wait = self._frames.reserve()
        if wait:
            # Over its frame budget: this client is not read from until the budget
            # refills; TCP flow control holds it back, not the server's CPU.
            self._counters.throttled += 1
            await trio.sleep(wait)
        ref = None
        req: Request | None = None
        try:
            req = parse(data, self.limits)
            ref = req.ref
            if self._draining and req.op != "ping":
                extra = {"conv": req.get("conv"), "id": req.get("id")} if req.op == "send" else {}
                raise ProtocolError(
                    "unavailable",
                    "the server is shutting down: retry on another server (same id)",
                    ref,
                    retryable=True,
                    **extra,
                )
            if not self.user and req.op != "hello":
                raise ProtocolError("not_authenticated", "send hello first", ref)
            await ops[req.op](self, req, nursery)
            if req.op != "send":  # a send is counted when it is answered
                self._counters.ops[req.op, "ok"] += 1
        except ProtocolError as exc:
            self._counters.ops[req.op if req is not None else "-", exc.code] += 1
            self.services.refusals.refuse(
                exc.code, f"{self.user or '-'}@{self.conn.remote}", exc.message
            )
            frame = error_frame(exc.code, exc.message, **exc.extra)
            self.reply(frame, exc.ref if exc.ref is not None else ref)
        except Unavailable as exc:
            self._counters.ops[req.op if req is not None else "-", "unavailable"] += 1
            self.reply(error_frame("unavailable", exc.message, retryable=True), ref)

    # -- sends and their answers ------------------------------------------------

    async def acquire_send_slot(self) -> None:
        # The reader checkpoints on every frame; skip a second yield when a slot is free.
        try:
            self._inflight.acquire_nowait()
        except trio.WouldBlock:
            await self._inflight.acquire()

    def _answer(self, outcome: Outcome, *, last: bool = False) -> bool:
        """Answer one send. True: it committed and asked for a reply, which
        :meth:`_start_reply` answers, unless these are the session's ``last`` words."""
        self._inflight.release()
        if self._answered is not None:
            self._answered.set()
        self._count_answer(outcome)
        # A retry whose first try's reply never started starts it now.
        if outcome.tag.wants_reply and self.services.replies.owed.settle(outcome) and not last:
            return True
        if answers.starts_reply(outcome):
            if not last:
                return True
            why = Unavailable("the server is shutting down; no reply")
            frames = answers.no_reply(outcome, why)
        else:
            frames = answers.answer(outcome)
        for frame in frames:
            self.reply(frame, answers.ref_of(outcome))
        return False

    def _count_answer(self, outcome: Outcome) -> None:
        result = outcome.result
        if isinstance(result, Unavailable):
            kind = "unavailable"
        elif isinstance(result, Exception):
            kind = "internal"
        else:
            kind = "duplicate" if result.duplicate else "ok"
        self._counters.ops["send", kind] += 1
        self._counters.ack_seconds.observe(trio.current_time() - outcome.tag.received)

    async def _start_reply(self, outcome: Outcome) -> None:
        tag: SendTag = outcome.tag
        frame = answers.ack(outcome)
        try:
            frame["stream"] = await self.services.replies.start(
                outcome.msg.conv, frame["seq"], tag.prompt, user=self.user, owner=self.id
            )
        except (ProtocolError, Unavailable) as why:
            if not isinstance(why, ShuttingDown):
                # Committed, no reply: a retry of the send may start it.
                self.services.replies.owed.owe(outcome.msg.conv, outcome.msg.client_id)
            for f in answers.no_reply(outcome, why):
                self.reply(f, tag.ref)
            return
        self.reply(frame, tag.ref)
