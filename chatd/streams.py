"""Streams: assistant replies, token by token, on the transient lane.

Each reply is owned by a nursery of its own. Its token task reads the model
and appends to the stream's in-memory text; it never touches Redis, so a Redis
outage cannot abort generation. One lane task ships whatever is new in every
stream in one gateway crossing per batch: the partial text is extended in
Redis (with a TTL) and a delta is published carrying its offset (in code
points into the reply). A failed batch is counted, not raised, and retried
from the last offset Redis acknowledged, so deltas stay contiguous.

When generation ends the reply is committed to Postgres (shielded, bounded,
retried with backoff while Postgres is unavailable) through the normal outbox
path; the stream then ends with ``stream.end`` carrying its seq, and its
partial is deleted. If the model fails, the partial is discarded and
subscribers get ``stream.error``: Postgres never holds an incomplete reply.
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson
import trio

from chatd.bus import Bus, LaneOp
from chatd.config import Config
from chatd.errors import BusUnavailable, ModelError, StoreError, StoreUnavailable, Unavailable
from chatd.model import Model, ModelRequest
from chatd.protocol import ProtocolError, encode
from chatd.store import NewMessage, Store

log = logging.getLogger("chatd.streams")

#: Message ids starting with this are reserved for replies (clients may not use them).
STREAM_ID_PREFIX = "~"
#: How long a finished stream waits for its last frames to reach Redis.
_END_WAIT = 2.0
_LANE_BACKOFF_MAX = 2.0


@dataclass(eq=False)
class Stream:
    """One reply in flight."""

    id: str
    conv: str
    reply_to: int
    prompt: str
    user: str
    started_ms: int
    parts: list[str] = field(default_factory=list)
    length: int = 0
    state: str = "generating"  # -> committing -> ended
    stopped: bool = False
    truncated: bool = False
    scope: trio.CancelScope | None = None
    # What Redis has acknowledged.
    sent_parts: int = 0
    sent_offset: int = 0
    sent_bytes: int = 0  # -1: unknown, rewrite the partial whole
    start_sent: bool = False
    end_frame: str | None = None
    end_sent: bool = False
    given_up_at: float = 0.0
    flushed: trio.Event = field(default_factory=trio.Event)

    def append(self, token: str) -> None:
        self.parts.append(token)
        self.length += len(token)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def meta(self) -> dict[str, Any]:
        return {
            "reply_to": self.reply_to,
            "user": self.user,
            "role": "assistant",
            "ts": self.started_ms,
        }

    @cached_property
    def meta_json(self) -> str:
        # Sent with every lane batch while the reply lives; it never changes.
        return orjson.dumps(self.meta()).decode()


class Streams:
    """Every reply generating in this process; owned by the server's nursery."""

    def __init__(self, config: Config, store: Store, bus: Bus, model: Model) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.model = model
        self.active: dict[str, Stream] = {}
        self._pending: dict[str, Stream] = {}
        self._dirty = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._lane_alive = False
        #: Counters for the status op and benchmarks.
        self.started = 0
        self.completed = 0
        self.failed = 0
        self.deltas = 0
        self.lane_failures = 0
        self.commit_retries = 0

    async def run(
        self, *, task_status: trio.TaskStatus[Streams] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the lane task and every stream's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._lane_alive = True
            nursery.start_soon(self._lane)
            task_status.started(self)

    # -- control ----------------------------------------------------------

    def start_reply(self, conv: str, reply_to: int, prompt: str) -> str:
        """Start generating a reply to message ``reply_to``; returns the stream id."""
        if self._nursery is None:
            raise RuntimeError("streams are not running")
        if len(self.active) >= self.config.streams.max_streams:
            raise ProtocolError(
                "too_many_streams",
                f"this server is generating {len(self.active)} replies, its limit; retry later",
            )
        s = Stream(
            id=STREAM_ID_PREFIX + secrets.token_hex(8),
            conv=conv,
            reply_to=reply_to,
            prompt=prompt,
            user=self.config.streams.assistant_user,
            started_ms=_now_ms(),
        )
        self.active[s.id] = s
        self.started += 1
        self._mark(s)  # announce it (stream.start) right away
        self._nursery.start_soon(self._run, s, name=f"stream {s.id}")
        return s.id

    def stop(self, conv: str, stream: str) -> bool:
        """Stop a reply generating in this process; what it said so far is committed."""
        s = self.active.get(stream)
        if s is None or s.conv != conv or s.state != "generating":
            return False
        s.stopped = True
        if s.scope is not None:
            s.scope.cancel()
        return True

    def handle_control(self, data: str) -> None:
        """A control message from another chatd process (via Redis)."""
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(msg, dict) and msg.get("op") == "stop":
            self.stop(str(msg.get("conv")), str(msg.get("stream")))

    def status(self) -> dict[str, Any]:
        return {
            "streams_active": len(self.active),
            "streams_started": self.started,
            "streams_completed": self.completed,
            "streams_failed": self.failed,
            "lane_deltas": self.deltas,
            "lane_failures": self.lane_failures,
            "stream_commit_retries": self.commit_retries,
        }

    # -- one stream -------------------------------------------------------

    async def _run(self, s: Stream) -> None:
        end: dict[str, Any] | None = None
        try:
            error = await self._generate(s)
            if error is not None:
                log.warning("reply %s in %s failed: %s", s.id, s.conv, error)
                self.failed += 1
                end = _error_frame(s, "model_failed", str(error), retryable=True)
            else:
                s.state = "committing"
                end = await self._commit(s)
        finally:
            s.state = "ended"
            self.active.pop(s.id, None)
            if end is None:
                # Cancelled while generating: the server is shutting down.
                end = _error_frame(
                    s, "interrupted", "the server shut down during the reply", retryable=True
                )
            await self._finish(s, end)

    async def _generate(self, s: Stream) -> ModelError | None:
        cfg = self.config.streams
        error: ModelError | None = None
        try:
            context: list[dict[str, Any]] = []
            if self.model.wants_context:
                context = await self.store.history(
                    s.conv, s.reply_to + 1, self.config.model.context_messages
                )
            request = ModelRequest(s.conv, s.prompt, context)
            with trio.move_on_after(cfg.max_duration) as deadline:
                async with trio.open_nursery() as nursery:
                    s.scope = nursery.cancel_scope
                    if s.stopped:
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(self._tokens, s, request)
        except* ModelError as group:
            error = group.exceptions[0]  # type: ignore[assignment]
        except* Unavailable as group:
            error = ModelError(f"cannot read the conversation: {group.exceptions[0]}")
        except* Exception as group:
            # A bug in one reply must not take the server's other replies down.
            log.error("reply %s crashed", s.id, exc_info=group)
            error = ModelError("internal error while generating the reply")
        if error is not None:
            return error
        if deadline.cancelled_caught:
            return ModelError(f"the reply took longer than {cfg.max_duration:g}s")
        return None

    async def _tokens(self, s: Stream, request: ModelRequest) -> None:
        room = self.config.streams.max_reply_chars
        async with aclosing(self.model.generate(request)) as tokens:
            async for token in tokens:
                if s.length + len(token) > room:
                    s.append(token[: room - s.length])
                    s.truncated = True
                    self._mark(s)
                    return
                s.append(token)
                self._mark(s)

    async def _commit(self, s: Stream) -> dict[str, Any]:
        status = "stopped" if s.stopped or s.truncated else "complete"
        msg = NewMessage(s.conv, s.id, s.user, s.text, role="assistant", status=status)
        delay = 0.05
        last: Exception | None = None
        # The commit completes even if the server is shutting down, within a bound.
        with trio.move_on_after(self.config.streams.commit_timeout, shield=True):
            while True:
                try:
                    committed = await self.store.commit_one(msg)
                except StoreUnavailable as exc:
                    last = exc
                    self.commit_retries += 1
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                except StoreError as exc:
                    last = exc
                    break
                self.completed += 1
                return {
                    "type": "stream.end",
                    "conv": s.conv,
                    "stream": s.id,
                    "seq": committed.seq,
                    "status": status,
                    "length": len(msg.text),
                }
        self.failed += 1
        reason = f"{last}" if last else f"no commit within {self.config.streams.commit_timeout:g}s"
        log.error("reply %s in %s could not be committed and is lost: %s", s.id, s.conv, reason)
        return _error_frame(
            s, "commit_failed", f"the reply could not be stored: {reason}", retryable=True
        )

    async def _finish(self, s: Stream, end: dict[str, Any]) -> None:
        """Publish the end frame after the stream's last delta (bounded, even on shutdown)."""
        s.end_frame = encode(end)
        self._mark(s)
        with trio.move_on_after(_END_WAIT, shield=True):
            while not s.end_sent:
                if self._lane_alive:
                    await s.flushed.wait()
                    continue
                # The lane is gone (shutdown): one direct attempt.
                try:
                    await self._send([s])
                except BusUnavailable as exc:
                    log.info("end of reply %s not published: %s", s.id, exc)
                break

    # -- the lane ---------------------------------------------------------

    def _mark(self, s: Stream) -> None:
        self._pending[s.id] = s
        self._dirty.set()

    async def _lane(self) -> None:
        backoff = 0.05
        interval = self.config.streams.lane_interval_ms / 1000.0
        try:
            while True:
                await self._dirty.wait()
                if interval:
                    await trio.sleep(interval)
                self._dirty = trio.Event()
                batch = list(self._pending.values())
                self._pending.clear()
                try:
                    await self._send(batch)
                except BusUnavailable as exc:
                    self.lane_failures += 1
                    log.debug("lane batch of %d stream(s) failed: %s", len(batch), exc)
                    self._retry_later(batch)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, _LANE_BACKOFF_MAX)
                    continue
                backoff = 0.05
        finally:
            self._lane_alive = False
            for s in self._pending.values():
                _wake(s)

    def _retry_later(self, batch: list[Stream]) -> None:
        now = trio.current_time()
        for s in batch:
            if s.end_frame is not None and not s.given_up_at:
                s.given_up_at = now + self.config.streams.partial_ttl
            if s.given_up_at and now > s.given_up_at:
                log.warning("dropping the end of reply %s: Redis unreachable for too long", s.id)
                s.end_sent = True  # its partial expires by TTL; the message is in Postgres
            else:
                self._pending.setdefault(s.id, s)
            _wake(s)
        self._dirty.set()

    async def _send(self, batch: list[Stream]) -> None:
        ops: list[LaneOp] = []
        covers: list[tuple[int, int, bool]] = []
        for s in batch:
            n = len(s.parts)
            piece = "".join(s.parts[s.sent_parts : n])
            frames: list[str] = []
            if not s.start_sent:
                frames.append(
                    encode({"type": "stream.start", "conv": s.conv, "stream": s.id, **s.meta()})
                )
            if piece:
                frames.append(
                    encode(
                        {
                            "type": "delta",
                            "conv": s.conv,
                            "stream": s.id,
                            "offset": s.sent_offset,
                            "text": piece,
                        }
                    )
                )
            ending = s.end_frame is not None and n == len(s.parts)
            if ending:
                assert s.end_frame is not None
                frames.append(s.end_frame)
            ops.append(
                LaneOp(
                    conv=s.conv,
                    stream=s.id,
                    expect_bytes=s.sent_bytes,
                    text=piece,
                    parts=s.parts,
                    upto=n,
                    meta="" if ending else s.meta_json,
                    frames=tuple(frames),
                )
            )
            covers.append((n, s.sent_offset + len(piece), ending))
        try:
            results = await self.bus.lane(ops, self.config.streams.partial_ttl)
        except BaseException:
            # Failed or cancelled mid-call: what Redis holds is unknown.
            for s in batch:
                s.sent_bytes = -1
            raise
        for s, (n, offset, ending), size in zip(batch, covers, results, strict=True):
            if offset > s.sent_offset:
                self.deltas += 1
            s.sent_parts, s.sent_offset, s.sent_bytes = n, offset, size
            s.start_sent = True
            if ending:
                s.end_sent = True
            elif len(s.parts) > n or s.end_frame is not None:
                self._mark(s)
            _wake(s)


def _wake(s: Stream) -> None:
    s.flushed.set()
    s.flushed = trio.Event()


def _error_frame(s: Stream, code: str, message: str, *, retryable: bool) -> dict[str, Any]:
    return {
        "type": "stream.error",
        "conv": s.conv,
        "stream": s.id,
        "code": code,
        "message": message,
        "retryable": retryable,
    }


def _now_ms() -> int:
    # A wall-clock timestamp for clients; every duration uses Trio's clock.
    return int(time.time() * 1000)
