"""The relay: drains the outbox from Postgres to Redis.

Each batch, in one transaction and one gateway crossing: claim and delete up
to N outbox rows with ``FOR UPDATE SKIP LOCKED`` (safe with several chatd
processes, and a row that commits late is simply claimed by a later batch:
nothing is skipped by a cursor), publish them with one pipelined round trip
(one message per conversation, its events newline-separated), then commit.
If the publish fails the transaction rolls back and the rows stay. Publishing
is therefore at-least-once; subscribers dedupe by seq.

The relay wakes on LISTEN/NOTIFY and falls back to polling, since a
notification is a wake-up, not a guarantee.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import redis.asyncio as aioredis
import trio

from chatd.bus import Bus, channel
from chatd.config import Config
from chatd.errors import Unavailable
from chatd.gateway import Gateway
from chatd.store import NOTIFY_CHANNEL, Store

log = logging.getLogger("chatd.relay")


async def _aio_relay_batch(pool: asyncpg.Pool, client: aioredis.Redis, limit: int) -> int:
    async with pool.acquire() as con, con.transaction():
        # Deleted inside the transaction, which commits only after Redis accepted
        # every publish; a failed publish rolls the rows back into the outbox.
        rows = await con.fetch(
            "DELETE FROM outbox WHERE id IN "
            "(SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) "
            "RETURNING id, conv_id, payload",
            limit,
        )
        if not rows:
            return 0
        # One PUBLISH per conversation, its events in id (= seq) order, one per
        # line: subscribers parse one Redis message per conversation per batch.
        by_conv: dict[str, list[str]] = {}
        for r in sorted(rows, key=lambda r: r["id"]):
            by_conv.setdefault(r["conv_id"], []).append(r["payload"])
        async with client.pipeline(transaction=False) as pipe:
            for conv, payloads in by_conv.items():
                pipe.publish(channel(conv), "\n".join(payloads))
            await pipe.execute()
        return len(rows)


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
        self.published = 0
        self.failures = 0
        self.last_error = ""
        self._listener = _Listener()

    async def drain_once(self) -> int:
        """Relay one batch; returns how many rows were published."""
        n = await self.gateway.postgres_and_redis(
            _aio_relay_batch, self.store.pool, self.bus.client, self.config.relay.batch
        )
        self.published += n
        return n

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config.relay
        backoff = cfg.backoff_min
        task_status.started()
        try:
            while True:
                try:
                    n = await self.drain_once()
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
                    await self._wait_for_work()
        finally:
            with trio.move_on_after(2.0, shield=True):
                try:
                    await self.gateway.postgres(self._listener.aio_close, deadline=2.0)
                except Unavailable:
                    pass  # the connection is gone either way

    async def _wait_for_work(self) -> None:
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
            await self.gateway.postgres(self._listener.aio_wait, poll, deadline=poll + 1.0)
        except Unavailable:
            await trio.sleep(min(poll, self.config.relay.backoff_max))
