"""The relay: carries committed outbox rows from Postgres to Redis.

Two paths, both at-least-once (subscribers dedupe by seq):

* **Publish after commit.** The committer hands every commit's new outbox
  rows to :meth:`Relay.offer`; :meth:`Relay.run`'s publisher publishes all
  that is queued in one gateway crossing (one pipelined round trip, one
  message per conversation, its events newline-separated) and reports the
  ids to the store, whose next commit deletes them in the same transaction.
  No extra Postgres transaction per batch, no NOTIFY round trip.
* **The relay sweep**, for rows nobody published: their publish failed (Redis
  was down), or the process died between commit and publish. In one
  transaction and one crossing it claims and deletes up to N rows with
  ``FOR UPDATE SKIP LOCKED`` (safe with several chatd processes, and a row
  that commits late is simply claimed by a later batch: nothing is skipped
  by a cursor), publishes them, then commits; if the publish fails the
  transaction rolls back and the rows stay. Normally it takes only rows older
  than ``claim_after`` (younger ones belong to their own process's
  publisher); after a failed publish, at start, and when another process
  NOTIFYs (its commits do while it cannot publish) it drains everything.
  It wakes on those and on LISTEN/NOTIFY, and polls as a fallback.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import redis.asyncio as aioredis
import trio

from chatd.bus import Bus, channel
from chatd.config import Config
from chatd.errors import StoreError, Unavailable
from chatd.gateway import Gateway
from chatd.store import NOTIFY_CHANNEL, OutboxEvent, Store

log = logging.getLogger("chatd.relay")


async def _aio_publish(client: aioredis.Redis, events: list[tuple[str, str]]) -> None:
    """Publish ``(conv, payload)`` events, in order: one PUBLISH per conversation."""
    # Its events one per line: subscribers parse one Redis message per
    # conversation per batch.
    by_conv: dict[str, list[str]] = {}
    for conv, payload in events:
        by_conv.setdefault(conv, []).append(payload)
    async with client.pipeline(transaction=False) as pipe:
        for conv, payloads in by_conv.items():
            pipe.publish(channel(conv), "\n".join(payloads))
        await pipe.execute()


async def _aio_publish_fresh(client: aioredis.Redis, events: list[OutboxEvent]) -> None:
    await _aio_publish(client, [(e.conv, e.payload) for e in events])


async def _aio_relay_batch(
    pool: asyncpg.Pool, client: aioredis.Redis, limit: int, min_age: float
) -> int:
    async with pool.acquire() as con, con.transaction():
        # Losing this commit in a crash only republishes the rows: no need to wait
        # for the WAL flush.
        await con.execute("SET LOCAL synchronous_commit = off")
        # Deleted inside the transaction, which commits only after Redis accepted
        # every publish; a failed publish rolls the rows back into the outbox.
        rows = await con.fetch(
            "DELETE FROM outbox WHERE id IN "
            "(SELECT id FROM outbox "
            "WHERE created_at <= statement_timestamp() - make_interval(secs => $2) "
            "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) "
            "RETURNING id, conv_id, payload",
            limit,
            min_age,
        )
        if not rows:
            return 0
        await _aio_publish(
            client, [(r["conv_id"], r["payload"]) for r in sorted(rows, key=lambda r: r["id"])]
        )
        return len(rows)


async def _aio_vacuum(pool: asyncpg.Pool) -> None:
    # SKIP_LOCKED: another process's relay vacuuming it right now is as good.
    await pool.execute("VACUUM (SKIP_LOCKED) outbox")


async def _aio_notify(pool: asyncpg.Pool) -> None:
    await pool.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)


class _Listener:
    """A dedicated LISTEN connection; its callback sets an asyncio event."""

    def __init__(self) -> None:
        self.con: asyncpg.Connection | None = None
        self.event: asyncio.Event | None = None

    @property
    def alive(self) -> bool:
        return self.con is not None and not self.con.is_closed()

    async def aio_connect(self, dsn: str, connect_timeout: float) -> None:
        self.event = asyncio.Event()
        con = await asyncpg.connect(dsn, timeout=connect_timeout)
        event = self.event
        await con.add_listener(NOTIFY_CHANNEL, lambda *_: event.set())
        self.con = con

    async def aio_wait(self, seconds: float) -> bool:
        assert self.event is not None
        try:
            await asyncio.wait_for(self.event.wait(), seconds)
            return True
        except TimeoutError:
            return False
        finally:
            self.event.clear()

    async def aio_close(self) -> None:
        if self.con is not None:
            con, self.con = self.con, None
            await con.close(timeout=2.0)


class Relay:
    """Owned by the server's nursery; runs until cancelled."""

    def __init__(self, gateway: Gateway, store: Store, bus: Bus, config: Config) -> None:
        self.gateway = gateway
        self.store = store
        self.bus = bus
        self.config = config
        #: Rows published by the sweep, and right after their commit.
        self.published = 0
        self.fresh_published = 0
        self.failures = 0
        self.last_error = ""
        self.vacuums = 0
        self._vacuumed_at = 0  # published + fresh_published at the last vacuum
        self._may_vacuum = True
        self._listener = _Listener()
        self._fresh_send, self._fresh_receive = trio.open_memory_channel[list[OutboxEvent]](
            config.relay.publish_queue
        )
        # The sweep drains every row, not only old ones, until the outbox is
        # empty: at start (rows left by an earlier run) and after a failed publish.
        self._drain_all = True
        self._degraded = 0  # bumped on every failed or skipped publish
        self._sleeping: trio.CancelScope | None = None

    @property
    def draining(self) -> bool:
        """True while the sweep takes every row, not only those older than ``claim_after``."""
        return self._drain_all

    def offer(self, events: list[OutboxEvent]) -> None:
        """Publish a commit's new outbox rows soon (never blocks: the committer calls it)."""
        try:
            self._fresh_send.send_nowait(events)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._degrade()  # the rows stay in the outbox: the sweep takes them

    async def drain_once(self, min_age: float = 0.0) -> int:
        """Sweep one batch of rows at least ``min_age`` seconds old; returns how many."""
        n = await self.gateway.postgres_and_redis(
            _aio_relay_batch, self.store.pool, self.bus.client, self.config.relay.batch, min_age
        )
        self.published += n
        return n

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish fresh commits and sweep the outbox, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_fresh)
            nursery.start_soon(self._sweep)
            task_status.started()

    def _degrade(self) -> None:
        self._degraded += 1
        self._drain_all = True
        # Every relay, in every process, should drain now: this one may be cut off.
        self.store.notify_relays = True
        if self._sleeping is not None:
            self._sleeping.cancel()

    async def _publish_fresh(self) -> None:
        while True:
            events = await self._fresh_receive.receive()
            # Everything queued meanwhile goes in the same crossing, still in commit order.
            while True:
                try:
                    events += self._fresh_receive.receive_nowait()
                except trio.WouldBlock:
                    break
            try:
                await self.gateway.redis(_aio_publish_fresh, self.bus.client, events)
            except Unavailable as exc:
                log.debug("publish after commit failed, leaving it to the sweep: %s", exc)
                first = not self.store.notify_relays
                self._degrade()
                if first:
                    await self._notify_relays()
                continue
            self.fresh_published += len(events)
            self.store.mark_published([e.id for e in events])

    async def _notify_relays(self) -> None:
        # This process may be cut off from Redis while others are not: wake every
        # relay to take what it could not publish (later commits NOTIFY too).
        try:
            await self.gateway.postgres(_aio_notify, self.store.pool)
        except Unavailable as exc:
            log.debug("cannot NOTIFY the relays: %s", exc)

    async def _sweep(self) -> None:
        cfg = self.config.relay
        backoff = cfg.backoff_min
        try:
            while True:
                degraded = self._degraded
                drain_all = self._drain_all
                try:
                    n = await self.drain_once(0.0 if drain_all else cfg.claim_after)
                except Unavailable as exc:
                    self.failures += 1
                    if self.last_error != str(exc):
                        log.warning("relay cannot drain the outbox, retrying: %s", exc)
                    self.last_error = str(exc)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, cfg.backoff_max)
                    continue
                if self.last_error:
                    log.info("relay recovered")
                    self.last_error = ""
                backoff = cfg.backoff_min
                if n < cfg.batch:
                    if drain_all and degraded == self._degraded:
                        # Drained, and no publish failed meanwhile.
                        self._drain_all = False
                        self.store.notify_relays = False
                    if not self._drain_all:
                        await self._vacuum_if_due()
                        await self._wait_for_work()
        finally:
            with trio.move_on_after(2.0, shield=True):
                try:
                    await self.gateway.postgres(self._listener.aio_close, deadline=2.0)
                except Unavailable:
                    pass  # the connection is gone either way

    async def _vacuum_if_due(self) -> None:
        """VACUUM the outbox after every ``vacuum_every`` rows it lost.

        Every message inserts an outbox row and deletes it again. Autovacuum
        looks at a table at most once per ``autovacuum_naptime`` (a minute by
        default), and until then each dead row costs every commit and sweep
        that passes it: measured, the Postgres CPU per send doubled after 80k
        sends. A vacuum of the nearly empty table takes milliseconds.
        """
        every = self.config.relay.vacuum_every
        removed = self.published + self.fresh_published
        if not self._may_vacuum or every == 0 or removed - self._vacuumed_at < every:
            return
        self._vacuumed_at = removed
        try:
            await self.gateway.postgres(_aio_vacuum, self.store.pool)
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
        with trio.CancelScope() as self._sleeping:
            try:
                await self._wait_for_notify()
            finally:
                self._sleeping = None

    async def _wait_for_notify(self) -> None:
        poll = self.config.relay.poll_interval
        if not self._listener.alive:
            try:
                await self.gateway.postgres(
                    self._listener.aio_connect,
                    self.config.postgres.dsn,
                    self.config.postgres.connect_timeout,
                )
            except Unavailable as exc:
                log.debug("LISTEN unavailable, polling: %s", exc)
                await trio.sleep(poll)
                return
        try:
            if await self.gateway.postgres(self._listener.aio_wait, poll, deadline=poll + 1.0):
                self._drain_all = True  # another process cannot publish its commits
        except Unavailable:
            await trio.sleep(min(poll, self.config.relay.backoff_max))
