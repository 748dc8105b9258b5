"""The group committer: every user message's one way into the log.

Sends arriving while a commit is in flight (or within
``[store].group_commit_window_ms``) commit together, in one transaction and
one round trip, in submission order; each is still answered on its own. The
answer goes back to the task that submitted the message: :meth:`Committer.submit`
takes the submitter's inbox (a session, or a channel), and the committer
hands it an :class:`~chatd.records.Outcome` without blocking. Nothing of the
submitter runs in the committer's task.

* **Poison isolation.** A batch the log rejects (one message it cannot store)
  is split in halves, recursively, so the bad message fails alone and its
  neighbours commit: about ``2 log2(n)`` extra round trips, never ``n``.
* **Every message is answered, on every path.** A batch that started
  committing finishes within a bounded shield (``bound`` and the shutdown's
  deadline); what the bound cut short is answered ``unavailable`` with "the
  outcome may be unknown", and queued messages are answered ``unavailable``
  when the committer stops.
* **The outbox.** Each commit's new outbox rows go to the relay's channel
  (``fresh``); the relay reports the ids it published
  (:meth:`Committer.mark_published`) and the next commit deletes them in its
  own transaction, or an idle flush does after ``_FLUSH_AFTER``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from chatd.config import StoreConfig
from chatd.errors import StoreError, StoreUnavailable
from chatd.histogram import BATCH_SIZES, Histogram
from chatd.ports import Log
from chatd.records import Committed, NewMessage, OutboxEvent, Outcome
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.committer")

#: With published rows to delete and no send to carry the delete, commit it alone after this.
_FLUSH_AFTER = 0.05
#: At most this many published ids wait for deletion; beyond that (Postgres has been
#: down for long) the oldest are forgotten, and a relay republishes them later: harmless.
_MAX_PUBLISHED = 100_000


class Inbox(Protocol):
    """Where an outcome goes: a trio channel, or a session's own inbox."""

    def send_nowait(self, outcome: Outcome) -> None: ...


@dataclass(slots=True)
class _Pending:
    msg: NewMessage
    tag: Any
    reply_to: Inbox
    answered: bool = False


class Committer:
    """Owned by :func:`open_committer`; its loop is the only task that commits batches."""

    def __init__(
        self,
        log: Log,
        cfg: StoreConfig,
        *,
        bound: float,
        fresh: trio.MemorySendChannel[list[OutboxEvent]],
        shutdown: ShutdownClock,
    ) -> None:
        self._log = log
        self._cfg = cfg
        self._bound = bound
        self._fresh = fresh
        self._shutdown = shutdown
        # None is a wake-up: there are published outbox rows to delete.
        self._send, self._receive = trio.open_memory_channel[_Pending | None](
            max(1024, cfg.group_commit_max * 4)
        )
        self._published: list[int] = []
        self._notify = False
        #: Messages committed, batches run, bad messages isolated, commits whose
        #: rows were left to the relay's sweep because its queue was full.
        self.committed = 0
        self.batches = 0
        #: Messages per commit transaction, for the metrics.
        self.batch_sizes = Histogram(BATCH_SIZES)
        self.isolated = 0
        self.publish_overflows = 0
        #: Sends whose id was stored already (a retry): answered with the original seq.
        self.duplicates = 0

    # -- for submitters ---------------------------------------------------

    async def submit(self, msg: NewMessage, tag: Any, reply_to: Inbox) -> None:
        """Queue ``msg``; its :class:`Outcome` (carrying ``tag``) goes to ``reply_to``.

        ``reply_to`` must have room for every outcome the submitter awaits (it is
        handed over without blocking). Submission order is commit order.
        """
        pending = _Pending(msg, tag, reply_to)
        # The queue is rarely full: skip the scheduler round when it isn't.
        # (A waiting sender keeps its place: send() queues behind earlier waiters.)
        try:
            try:
                self._send.send_nowait(pending)
            except trio.WouldBlock:
                await self._send.send(pending)
        except trio.ClosedResourceError:
            _answer(pending, StoreUnavailable("server is shutting down"))

    async def commit(self, msg: NewMessage) -> Committed:
        """Commit one message through the group committer; raises on failure."""
        send, receive = trio.open_memory_channel[Outcome](1)
        await self.submit(msg, None, send)
        outcome = await receive.receive()
        if isinstance(outcome.result, Exception):
            raise outcome.result
        return outcome.result

    async def commit_now(
        self, msg: NewMessage, finished: Sequence[str] = (), owner: str | None = None
    ) -> Committed:
        """Commit ``msg`` in its own transaction, in the caller's task, bypassing the queue.

        For a reply's final commit: it must not depend on the committer's task,
        which may already be gone when a shielded commit runs during shutdown.
        ``finished``: the reply's in-flight row, deleted in the same transaction;
        ``owner``: the process it was registered under (ReplyTaken if declared dead).
        """
        results, events = await self._log.commit([msg], [], self._notify, finished, owner)
        self._hand_over(events)
        if not results[0].duplicate:
            self.committed += 1
        return results[0]

    # -- for the relay ----------------------------------------------------

    def mark_published(self, ids: list[int]) -> None:
        """Outbox rows ``ids`` are published: delete them with the next commit."""
        was_empty = not self._published
        self._published.extend(ids)
        if len(self._published) > _MAX_PUBLISHED:
            del self._published[: len(self._published) - _MAX_PUBLISHED]
        if was_empty:
            try:
                self._send.send_nowait(None)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # busy (it will take them) or gone

    def set_notify(self, on: bool) -> None:
        """While this process cannot publish, its commits wake every relay (NOTIFY)."""
        self._notify = on

    # -- the loop ---------------------------------------------------------

    async def _run(self) -> None:
        window = self._cfg.group_commit_window_ms / 1000.0
        limit = self._cfg.group_commit_max
        try:
            while True:
                first = await self._receive.receive()
                if first is None:
                    # Published rows to delete: a send coming soon carries the delete.
                    with trio.move_on_after(_FLUSH_AFTER):
                        first = await self._next_pending()
                    if first is None:
                        if self._published:
                            await self._commit_bounded([])
                        continue
                batch = [first]
                if window > 0:
                    with trio.move_on_after(window):
                        while len(batch) < limit:
                            batch.append(await self._next_pending())
                while len(batch) < limit:
                    try:
                        item = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if item is not None:
                        batch.append(item)
                await self._commit_bounded(batch)
        finally:
            self._send.close()
            self._fail_queued(StoreUnavailable("server is shutting down"))
            if self._published:
                # Else a relay sweeps and republishes them later: harmless, but noisy.
                with self._shutdown.shield(1.0):
                    try:
                        await self._commit_batch([])
                    except StoreUnavailable:
                        pass

    async def _next_pending(self) -> _Pending:
        while (item := await self._receive.receive()) is None:
            pass
        return item

    def _fail_queued(self, err: Exception) -> None:
        while True:
            try:
                pending = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                return
            if pending is not None:
                _answer(pending, err)

    async def _commit_bounded(self, batch: list[_Pending]) -> None:
        # A batch that started committing finishes (bounded) even on shutdown.
        with self._shutdown.shield(self._bound):
            await self._commit_batch(batch)
        # Whatever the bound cut short may or may not have committed.
        unknown = StoreUnavailable(
            f"postgres: no outcome within {self._bound:g}s; "
            "it may or may not have committed: retry with the same id"
        )
        for p in batch:
            if not p.answered:
                _answer(p, unknown)

    async def _commit_batch(self, batch: list[_Pending], *, carry: bool = True) -> None:
        """Commit ``batch`` (and, with ``carry``, delete the published rows); answer each."""
        published: list[int] = []
        if carry:
            published, self._published = self._published, []
        try:
            results, events = await self._log.commit(
                [p.msg for p in batch], published, self._notify
            )
        except StoreUnavailable as exc:
            self._published[:0] = published  # not deleted: the next commit carries them
            log.warning("commit of %d message(s) failed: %s", len(batch), exc)
            err = StoreUnavailable(
                f"{exc.message}; the outcome may be unknown: retry with the same id"
            )
            for p in batch:
                _answer(p, err)
            return
        except StoreError as exc:
            self._published[:0] = published
            if len(batch) > 1:
                # One bad message must not fail its neighbours: isolate it by halves.
                half = len(batch) // 2
                await self._commit_batch(batch[:half], carry=carry)
                await self._commit_batch(batch[half:], carry=False)
                return
            if batch:
                self.isolated += 1
                log.error("commit rejected: %s", exc)
                _answer(batch[0], exc)
            return
        except BaseException:
            self._published[:0] = published
            raise
        self._hand_over(events)
        if batch:
            self.batches += 1
            self.batch_sizes.observe(len(batch))
        for p, result in zip(batch, results, strict=True):
            if result.duplicate:
                self.duplicates += 1
            else:
                self.committed += 1
            _answer(p, result)

    def _hand_over(self, events: list[OutboxEvent]) -> None:
        if not events:
            return
        try:
            self._fresh.send_nowait(events)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            # The rows stay in the outbox: the relay's sweep takes them.
            self.publish_overflows += 1


def _answer(p: _Pending, result: Committed | Exception) -> None:
    if p.answered:
        return
    p.answered = True
    try:
        p.reply_to.send_nowait(Outcome(p.msg, p.tag, result))
    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # the submitter is gone (its connection closed)


@asynccontextmanager
async def open_committer(
    log: Log,
    cfg: StoreConfig,
    *,
    bound: float,
    fresh: trio.MemorySendChannel[list[OutboxEvent]],
    shutdown: ShutdownClock,
) -> AsyncIterator[Committer]:
    """Run the group commit loop for the duration of the block.

    Leaving the block stops it: a batch committing finishes within its bound;
    queued messages are answered ``unavailable``.
    """
    committer = Committer(log, cfg, bound=bound, fresh=fresh, shutdown=shutdown)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer._run, name="committer")
        yield committer
        nursery.cancel_scope.cancel()
