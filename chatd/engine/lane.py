"""The token lane: ships what is new in every reply to the transport, in batches.

A reply's token task only appends to the reply's text in memory and marks it
dirty (:meth:`Lane.mark`); it never touches the transport, so a Redis
outage cannot abort generation. The lane's one task ships every dirty reply
in one transport call per batch: the partial is extended (with a TTL) and a
delta with its offset is published, atomically per reply. A failed batch is
counted, not raised, and retried from the last offset the transport
acknowledged, so deltas stay contiguous. A reply the transport reports seized
(another process took it over) is given up at once.
"""

from __future__ import annotations

import logging

import trio

from chatd.backoff import Backoff
from chatd.config import RetryConfig, StreamsConfig
from chatd.engine.reply import Reply
from chatd.errors import BusUnavailable
from chatd.ports import Transport
from chatd.records import LaneOp

log = logging.getLogger("chatd.lane")


class Lane:
    """Owned by the replies service: :meth:`run` is its task."""

    def __init__(self, transport: Transport, cfg: StreamsConfig, retry: RetryConfig) -> None:
        self._transport = transport
        self._cfg = cfg
        self._retry = retry
        self._pending: dict[str, Reply] = {}
        self._dirty = trio.Event()
        #: False once the lane's task is gone (shutdown): replies then publish their end directly.
        self.alive = False
        self.deltas = 0
        self.failures = 0

    def mark(self, r: Reply) -> None:
        """``r`` has something new to ship (text, its start or its end)."""
        self._pending[r.id] = r
        self._dirty.set()

    async def run(self) -> None:
        backoff = Backoff.of(self._retry)
        interval = self._cfg.lane_interval_ms / 1000.0
        self.alive = True
        try:
            while True:
                await self._dirty.wait()
                if interval:
                    await trio.sleep(interval)
                self._dirty = trio.Event()
                # A reply not registered yet waits (custody marks it when it is):
                # what subscribers see must have an owner the log knows.
                batch = [r for r in self._pending.values() if r.registered or r.end_frame]
                self._pending.clear()
                if not batch:
                    continue
                try:
                    await self.send(batch)
                except BusUnavailable as exc:
                    self.failures += 1
                    log.debug("lane batch of %d reply(s) failed: %s", len(batch), exc)
                    self._retry_later(batch)
                    await backoff.sleep()
                    continue
                backoff.reset()
        finally:
            self.alive = False
            for r in self._pending.values():
                r.wake()

    def _retry_later(self, batch: list[Reply]) -> None:
        now = trio.current_time()
        for r in batch:
            if r.end_frame is not None and not r.given_up_at:
                r.given_up_at = now + self._cfg.partial_ttl
            if r.given_up_at and now > r.given_up_at:
                log.warning("dropping the end of reply %s: Redis unreachable for too long", r.id)
                r.end_sent = True  # its partial expires by TTL; the message is in the log
            else:
                self._pending.setdefault(r.id, r)
            r.wake()
        self._dirty.set()

    async def send(self, batch: list[Reply]) -> None:
        """Ship ``batch`` in one transport call; raises BusUnavailable."""
        ops: list[LaneOp] = []
        covers: list[tuple[int, int, bool]] = []
        for r in batch:
            n = len(r.parts)
            piece = "".join(r.parts[r.sent_parts : n])
            frames: list[str] = []
            if not r.start_sent:
                frames.append(r.start_frame())
            if piece:
                frames.append(r.delta_frame(r.sent_offset, piece))
            ending = r.end_frame is not None and n == len(r.parts)
            if ending:
                assert r.end_frame is not None
                frames.append(r.end_frame)
            ops.append(
                LaneOp(
                    conv=r.conv,
                    stream=r.id,
                    expect_bytes=r.sent_bytes,
                    text=piece,
                    parts=r.parts,
                    upto=n,
                    meta="" if ending else r.meta_json,
                    frames=tuple(frames),
                )
            )
            covers.append((n, r.sent_offset + len(piece), ending))
        try:
            results = await self._transport.lane(ops, self._cfg.partial_ttl)
        except BaseException:
            # Failed or cancelled mid-call: what the transport holds is unknown.
            for r in batch:
                r.sent_bytes = -1
            raise
        for r, (n, offset, ending), size in zip(batch, covers, results, strict=True):
            if size == -2:
                # Another process took this reply over (this one was presumed
                # dead): it ends it; this one stops, publishing nothing more.
                r.taken = True
                if r.scope is not None:
                    r.scope.cancel()
                r.wake()
                continue
            if offset > r.sent_offset:
                self.deltas += 1
            r.sent_parts, r.sent_offset, r.sent_bytes = n, offset, size
            r.start_sent = True
            if ending:
                r.end_sent = True
            elif len(r.parts) > n or r.end_frame is not None:
                self.mark(r)
            r.wake()
