"""Postgres for the relay: the sweep's claim (a transaction held across two
crossings), LISTEN/NOTIFY on a connection of its own, VACUUM, outbox stats."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg

from chatd.adapters import schema
from chatd.records import OutboxEvent

NOTIFY_CHANNEL = "chatd_outbox"


async def aio_stats(pool: asyncpg.Pool) -> dict[str, Any]:
    row = await pool.fetchrow(
        "SELECT count(*) AS outbox, "
        "coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest "
        "FROM outbox"
    )
    applied = await pool.fetchval("SELECT array_agg(version) FROM chatd_schema_migrations")
    pending = {m.version for m in schema.available()} - set(applied or ())
    return {
        "outbox_rows": row["outbox"],
        "outbox_oldest_s": round(row["oldest"], 3),
        "migrations_pending": len(pending),
    }


async def aio_notify(pool: asyncpg.Pool) -> None:
    await pool.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)


async def aio_vacuum(pool: asyncpg.Pool) -> None:
    # SKIP_LOCKED: another process's relay vacuuming it right now is as good.
    await pool.execute("VACUUM (SKIP_LOCKED) outbox")


# -- the sweep's claim: a transaction held across two crossings ---------------


@dataclass
class Claim:
    """Claimed outbox rows: deleted in a transaction still open (``con`` None: no rows)."""

    events: list[OutboxEvent]
    pool: asyncpg.Pool
    con: asyncpg.Connection | None = None
    tr: Any = None

    async def finish(self, commit: bool) -> None:
        con = self.con
        assert con is not None
        try:
            if commit:
                await self.tr.commit()
            else:
                await self.tr.rollback()
        except BaseException:
            con.terminate()  # the transaction dies with the connection
            raise
        finally:
            await self._release()

    async def abandon(self) -> None:
        """Nobody will finish this claim (its caller gave up, or could not reach
        Postgres to): give the rows back. Idempotent, and safe beside a
        ``finish`` that was cut short."""
        if self.con is not None:
            self.con.terminate()
        await self._release()

    async def _release(self) -> None:
        # Taken before the await: the connection goes back to the pool once.
        con, self.con = self.con, None
        if con is not None:
            await self.pool.release(con)


async def aio_claim(pool: asyncpg.Pool, limit: int, min_age: float) -> Claim:
    con = await pool.acquire()
    try:
        tr = con.transaction()
        await tr.start()
        # Losing this commit in a crash only republishes the rows: no need to wait
        # for the WAL flush.
        await con.execute("SET LOCAL synchronous_commit = off")
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
            await tr.commit()
            await pool.release(con)
            return Claim([], pool)
    except BaseException:
        con.terminate()
        await pool.release(con)
        raise
    events = sorted(
        (OutboxEvent(r["id"], r["conv_id"], r["payload"]) for r in rows), key=lambda e: e.id
    )
    return Claim(events, pool, con, tr)


# -- LISTEN: a connection of its own ----------------------------------------------


class Listener:
    """A dedicated LISTEN connection; its callback sets an asyncio event (asyncio side)."""

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

    async def aio_wait(self) -> None:
        assert self.event is not None
        await self.event.wait()
        self.event.clear()

    async def aio_close(self) -> None:
        if self.con is not None:
            con, self.con = self.con, None
            await con.close(timeout=2.0)
