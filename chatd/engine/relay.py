"""The relay: carries committed outbox rows from the log to the transport.

Two paths, both at-least-once (subscribers dedupe by seq):

* **Publish after commit.** The committer hands every commit's new outbox
  rows to the relay's channel; the publisher publishes everything queued in
  one transport call (one message per conversation, its events a line each)
  and reports the ids back (:meth:`Committer.mark_published`), whose next
  commit deletes them in the same transaction. No extra transaction per batch.
* **The sweep**, for rows nobody published: their publish failed (Redis was
  down), the publisher's queue was full, or the process died between commit
  and publish. It claims up to ``batch`` rows (SKIP LOCKED: safe with several
  chatd processes; a row that commits late is claimed by a later sweep, none
  is skipped by a cursor), publishes them, and only then deletes them; a
  failed publish puts them back. Normally it takes only rows older than
  ``claim_after`` (younger ones belong to their own process's publisher);
  after a failed publish, at start, and when another process NOTIFYs (its
  commits do while it cannot publish), it drains everything. It waits for a
  NOTIFY or ``poll_interval``, whichever comes first.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from chatd.backoff import Backoff
from chatd.config import RelayConfig, RetryConfig
from chatd.engine.committer import Committer
from chatd.errors import StoreError, Unavailable
from chatd.ports import Log, Transport
from chatd.records import OutboxEvent

log = logging.getLogger("chatd.relay")


class Relay:
    """Owned by :func:`open_relay`."""

    def __init__(
        self,
        log: Log,
        transport: Transport,
        cfg: RelayConfig,
        retry: RetryConfig,
        committer: Committer,
        fresh: trio.MemoryReceiveChannel[list[OutboxEvent]],
    ) -> None:
        self._log = log
        self._transport = transport
        self._cfg = cfg
        self._retry = retry
        self._committer = committer
        self._fresh = fresh
        #: Rows published by the sweep, and right after their commit.
        self.published = 0
        self.fresh_published = 0
        self.publish_failures = 0
        self.vacuums = 0
        self._vacuumed_at = 0  # published + fresh_published at the last vacuum
        self._may_vacuum = True
        # The sweep drains every row, not only old ones, until the outbox is
        # empty: at start (rows left by an earlier run) and after a failed publish.
        self._drain_all = True
        self._degraded = 0  # bumped on every failed publish
        #: While set, this process's commits NOTIFY every relay.
        self._notifying = False
        self._sleeping: trio.CancelScope | None = None
        self._last_error = ""

    @property
    def draining(self) -> bool:
        """True while the sweep takes every row, not only those older than ``claim_after``."""
        return self._drain_all

    async def drain_once(self, min_age: float = 0.0) -> int:
        """Sweep one batch of rows at least ``min_age`` seconds old; returns how many."""
        async with self._log.claim_outbox(self._cfg.batch, min_age) as events:
            if events:
                await self._transport.publish_events([(e.conv, e.payload) for e in events])
        self.published += len(events)
        return len(events)

    def _degrade(self) -> None:
        self._degraded += 1
        self._drain_all = True
        # Every relay, in every process, should drain now: this one may be cut off.
        self._notifying = True
        self._committer.set_notify(True)
        if self._sleeping is not None:
            self._sleeping.cancel()

    async def _publish_fresh(self) -> None:
        async for events in self._fresh:
            # Everything queued meanwhile goes in the same call, still in commit order.
            while True:
                try:
                    events += self._fresh.receive_nowait()
                except trio.WouldBlock:
                    break
            try:
                await self._transport.publish_events([(e.conv, e.payload) for e in events])
            except Unavailable as exc:
                log.debug("publish after commit failed, leaving it to the sweep: %s", exc)
                self.publish_failures += 1
                first = not self._notifying
                self._degrade()
                if first:
                    # This process may be cut off from Redis while others are not:
                    # wake every relay to take what it could not publish.
                    try:
                        await self._log.notify_relays()
                    except Unavailable as err:
                        log.debug("cannot NOTIFY the relays: %s", err)
                continue
            self.fresh_published += len(events)
            self._committer.mark_published([e.id for e in events])

    async def _sweep(self) -> None:
        backoff = Backoff.of(self._retry)
        while True:
            degraded = self._degraded
            drain_all = self._drain_all
            try:
                n = await self.drain_once(0.0 if drain_all else self._cfg.claim_after)
            except Unavailable as exc:
                if self._last_error != str(exc):
                    log.warning("relay cannot drain the outbox, retrying: %s", exc)
                self._last_error = str(exc)
                await backoff.sleep()
                continue
            if self._last_error:
                log.info("relay recovered")
                self._last_error = ""
            backoff.reset()
            if n < self._cfg.batch:
                if drain_all and degraded == self._degraded:
                    # Drained, and no publish failed meanwhile.
                    self._drain_all = False
                    self._notifying = False
                    self._committer.set_notify(False)
                if not self._drain_all:
                    await self._vacuum_if_due()
                    await self._wait_for_work()

    async def _vacuum_if_due(self) -> None:
        """VACUUM the outbox after every ``vacuum_every`` rows it lost.

        Every message inserts an outbox row and deletes it again. Autovacuum
        looks at a table at most once per ``autovacuum_naptime`` (a minute by
        default), and until then each dead row costs every commit and sweep
        that passes it: measured, the Postgres CPU per send doubled after 80k
        sends. A vacuum of the nearly empty table takes milliseconds.
        """
        every = self._cfg.vacuum_every
        removed = self.published + self.fresh_published
        if not self._may_vacuum or every == 0 or removed - self._vacuumed_at < every:
            return
        self._vacuumed_at = removed
        try:
            await self._log.vacuum_outbox()
        except Unavailable as exc:
            log.debug("outbox vacuum postponed: %s", exc)
            return
        except StoreError as exc:  # e.g. not the table's owner: autovacuum must do
            log.warning("cannot VACUUM the outbox, leaving it to autovacuum: %s", exc)
            self._may_vacuum = False
            return
        self.vacuums += 1

    async def _wait_for_work(self) -> None:
        # _degrade() cancels this wait: rows it left behind are drained at once.
        with trio.move_on_after(self._cfg.poll_interval) as self._sleeping:
            try:
                await self._log.wait_for_notify()
            except Unavailable as exc:
                log.debug("LISTEN unavailable, polling: %s", exc)
                await trio.sleep_forever()
            finally:
                self._sleeping = None
            self._drain_all = True  # another process cannot publish its commits


@asynccontextmanager
async def open_relay(
    log: Log,
    transport: Transport,
    cfg: RelayConfig,
    retry: RetryConfig,
    *,
    committer: Committer,
    fresh: trio.MemoryReceiveChannel[list[OutboxEvent]],
) -> AsyncIterator[Relay]:
    """Publish fresh commits and sweep the outbox for the duration of the block."""
    relay = Relay(log, transport, cfg, retry, committer, fresh)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay._publish_fresh, name="relay publisher")
        nursery.start_soon(relay._sweep, name="relay sweep")
        yield relay
        nursery.cancel_scope.cancel()
