"""The :class:`~chatd.ports.Log` on PostgreSQL (asyncpg, through the bridge).

The relay's queries are in :mod:`.postgres_outbox`, the membership queries in
:mod:`.postgres_members`; this module has the pool, the commit and the reads.

Round trips: a group commit is one call of the ``chatd_commit()`` SQL function
(migration 0004); snapshots for every client joining a conversation together
are one call of ``chatd_snapshot()`` (0003); a sweep claims, then commits or
rolls back: two. Functions prefixed ``_aio_`` run on the asyncio side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import trio

from chatd.adapters import postgres_replies as replies
from chatd.adapters import schema
from chatd.adapters.bridge import Bridge
from chatd.adapters.postgres_members import aio_members, aio_memberships, aio_set_membership
from chatd.adapters.postgres_outbox import (
    Listener,
    aio_claim,
    aio_notify,
    aio_stats,
    aio_vacuum,
)
from chatd.backoff import Backoff
from chatd.config import PostgresConfig
from chatd.errors import ReplyTaken, StoreUnavailable
from chatd.records import (
    Checkpoint,
    Committed,
    InFlight,
    NewMessage,
    Orphan,
    OutboxEvent,
    Registration,
    Snapshot,
    SnapshotAsk,
    event_template,
    message,
)
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.postgres")

_COLUMNS = "seq, client_id, user_id, role, status, body, created_at"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _millis(t: datetime) -> int:
    # Exact (no float rounding), so it matches the commit function's floor(epoch * 1000).
    return (t - _EPOCH) // _MS


def message_dict(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """A stored row as a wire message."""
    return message(
        row["seq"],
        row["client_id"],
        row["user_id"],
        row["role"],
        row["status"],
        row["body"],
        _millis(row["created_at"]),
    )


async def _aio_create_pool(cfg: PostgresConfig) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        cfg.dsn,
        min_size=cfg.pool_min,
        max_size=cfg.pool_max,
        timeout=cfg.connect_timeout,
        command_timeout=cfg.command_timeout,
        # Idle connections are recycled so a restarted server is rediscovered quickly.
        max_inactive_connection_lifetime=60.0,
        reset=_keep_session,
    )


async def _keep_session(con: asyncpg.Connection) -> None:
    """Release a connection as it is (asyncpg still rolls back an open transaction).

    asyncpg's default reset (unlock advisory locks, CLOSE ALL, UNLISTEN *,
    RESET ALL) is a round trip on every release: as costly as the work itself
    for a one-statement commit. chatd never changes session state on pool
    connections (LISTEN uses its own connection; the migration lock is
    released in a ``finally``).
    """


_COMMIT = "SELECT * FROM chatd_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
# A reply's final commit also deletes its in-flight row, in the same statement
# (so the same transaction): a data-modifying CTE runs whether read or not.
_COMMIT_FINISHING = (
    "WITH gone AS (DELETE FROM replies_in_flight WHERE stream_id = ANY($11::text[])) " + _COMMIT
)


_OWNER_DEAD = "SELECT dead FROM chatd_processes WHERE id = $1 FOR SHARE"


async def _aio_commit(
    pool: asyncpg.Pool,
    msgs: Sequence[NewMessage],
    published: Sequence[int],
    notify: bool,
    finished: Sequence[str],
    owner: str | None,
) -> tuple[list[Committed], list[OutboxEvent]]:
    templates = [event_template(m) for m in msgs]
    extra = [list(finished)] if finished else []
    args = (
        [m.conv for m in msgs],
        [m.client_id for m in msgs],
        [m.user for m in msgs],
        [m.role for m in msgs],
        [m.status for m in msgs],
        [m.text for m in msgs],
        [t[0] for t in templates],
        [t[1] for t in templates],
        list(published),
        notify,
        *extra,
    )
    sql = _COMMIT_FINISHING if finished else _COMMIT
    if owner is None:
        rows = await pool.fetch(sql, *args)
    else:
        async with pool.acquire() as con, con.transaction():
            # A takeover declares a process dead while holding that row's lock:
            # it waits for this transaction (and then finds the reply's row gone),
            # or it came first and this commit sees the process dead.
            dead = await con.fetchval(_OWNER_DEAD, owner)
            if dead:
                raise ReplyTaken(owner)
            rows = await con.fetch(sql, *args)
    results = []
    events = []
    for m, r in zip(msgs, rows, strict=True):
        msg = message(
            r["seq"],
            m.client_id,
            r["user_id"],
            r["role"],
            r["status"],
            r["body"],
            _millis(r["created_at"]),
        )
        results.append(Committed(m.conv, m.client_id, r["seq"], r["duplicate"], msg))
        if r["outbox_id"] is not None:
            events.append(OutboxEvent(r["outbox_id"], m.conv, r["payload"]))
    return results, events


async def _aio_snapshots(
    pool: asyncpg.Pool, asks: Sequence[SnapshotAsk], limit: int, max_catchup: int
) -> list[list[Snapshot]]:
    # One round trip for every client joining every asked conversation, all on
    # one database snapshot: one row per (join, message), numbered by join.
    convs = [a.conv for a in asks for _ in a.afters]
    afters = [after for a in asks for after in a.afters]
    streams = sorted({s for a in asks for s in a.streams})
    rows = await pool.fetch(
        "SELECT a.n, s.* FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS a(conv, after, n), "
        "LATERAL chatd_snapshot(a.conv, a.after, $3, $4, $5) AS s ORDER BY a.n, s.seq",
        convs,
        afters,
        limit,
        max_catchup,
        streams,
    )
    by_join: list[list[asyncpg.Record]] = [[] for _ in afters]
    for r in rows:
        by_join[r["n"] - 1].append(r)
    out: list[list[Snapshot]] = []
    joins = iter(by_join)
    for ask in asks:
        # The stream ids of every ask went in together: keep this ask's own.
        mine = frozenset(ask.streams)
        snaps = []
        for _ in ask.afters:
            group = next(joins)
            first = group[0]
            messages = [message_dict(r) for r in group if r["seq"] is not None]
            done = mine.intersection(first["committed_streams"])
            snaps.append(Snapshot(messages, first["head"], first["recovered"], done))
        out.append(snaps)
    return out


async def _aio_after(pool: asyncpg.Pool, conv: str, after: int, limit: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM messages WHERE conv_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        conv,
        after,
        limit,
    )
    return [message_dict(r) for r in rows]


async def _aio_find(pool: asyncpg.Pool, conv: str, client_id: str) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM messages WHERE conv_id = $1 AND client_id = $2",
        conv,
        client_id,
    )
    return None if row is None else message_dict(row)


async def _aio_history(
    pool: asyncpg.Pool, conv: str, before: int | None, limit: int
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM messages WHERE conv_id = $1 AND seq < $2 "
        "ORDER BY seq DESC LIMIT $3",
        conv,
        before if before is not None else 2**62,
        limit,
    )
    return [message_dict(r) for r in reversed(rows)]


class PostgresLog:
    """Postgres access for the engine. Every call crosses through the bridge."""

    def __init__(self, bridge: Bridge, pool: asyncpg.Pool, cfg: PostgresConfig) -> None:
        self.bridge = bridge
        self.pool = pool
        self._cfg = cfg
        self._listener = Listener()
        # Reads take at most this many pool connections at once; the rest wait
        # their turn here, outside the call's deadline (a queue is not an
        # outage), so commits, the relay and leases always find a connection.
        self._reads = trio.Semaphore(cfg.reads_in_flight)
        #: The same bound, for the other readers of this pool (Durable Streams).
        self.reads = self._reads

    async def commit(
        self,
        msgs: Sequence[NewMessage],
        published: Sequence[int],
        notify: bool,
        finished: Sequence[str] = (),
        owner: str | None = None,
    ) -> tuple[list[Committed], list[OutboxEvent]]:
        return await self.bridge.postgres(
            _aio_commit, self.pool, msgs, published, notify, finished, owner
        )

    async def heartbeat(self, process: str, lease: float) -> bool:
        return await self.bridge.postgres(replies.aio_heartbeat, self.pool, process, lease)

    async def register_replies(self, owner: str, batch: Sequence[Registration]) -> None:
        await self.bridge.postgres(replies.aio_register_replies, self.pool, owner, batch)

    async def checkpoint(self, owner: str, pieces: Sequence[Checkpoint]) -> None:
        await self.bridge.postgres(replies.aio_checkpoint, self.pool, owner, pieces)

    async def take_orphans(self, taker: str) -> list[Orphan]:
        return await self.bridge.postgres(replies.aio_take_orphans, self.pool, taker)

    async def inflight(self, convs: Sequence[str]) -> list[list[InFlight]]:
        async with self._reads:
            return await self.bridge.postgres(replies.aio_inflight, self.pool, convs)

    async def drop_reply(self, stream: str, owner: str) -> bool:
        return await self.bridge.postgres(replies.aio_drop_reply, self.pool, stream, owner)

    async def snapshots(
        self, asks: Sequence[SnapshotAsk], limit: int, max_catchup: int
    ) -> list[list[Snapshot]]:
        async with self._reads:
            return await self.bridge.postgres(_aio_snapshots, self.pool, asks, limit, max_catchup)

    async def after(self, conv: str, after: int, limit: int) -> list[dict[str, Any]]:
        async with self._reads:
            return await self.bridge.postgres(_aio_after, self.pool, conv, after, limit)

    async def history(self, conv: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        async with self._reads:
            return await self.bridge.postgres(_aio_history, self.pool, conv, before, limit)

    async def find(self, conv: str, client_id: str) -> dict[str, Any] | None:
        async with self._reads:
            return await self.bridge.postgres(_aio_find, self.pool, conv, client_id)

    @asynccontextmanager
    async def claim_outbox(self, limit: int, min_age: float) -> AsyncIterator[list[OutboxEvent]]:
        claim = await self.bridge.postgres(aio_claim, self.pool, limit, min_age)
        if claim.con is None:
            yield []
            return
        try:
            yield claim.events
        except BaseException:
            # Give the rows back, even when cancelled (bounded: a claim left open
            # holds its rows until its connection goes).
            with trio.move_on_after(self._cfg.command_timeout + 1.0, shield=True):
                try:
                    await self.bridge.postgres(claim.finish, False)
                except StoreUnavailable as exc:
                    log.debug("rolling back a claim failed (its connection goes): %s", exc)
                    await self.bridge.cleanup(claim.abandon)
            raise
        try:
            await self.bridge.postgres(claim.finish, True)
        except BaseException:
            # Not finished (refused, or cut short): the connection goes, its
            # transaction with it, and the rows are there for the next sweep
            # (published again: at least once). Left open, they stayed locked
            # until the pool closed, and the outbox never drained.
            with trio.move_on_after(self._cfg.command_timeout + 1.0, shield=True):
                await self.bridge.cleanup(claim.abandon)
            raise

    async def notify_relays(self) -> None:
        await self.bridge.postgres(aio_notify, self.pool)

    async def wait_for_notify(self) -> None:
        if not self._listener.alive:
            await self.bridge.postgres(
                self._listener.aio_connect, self._cfg.dsn, self._cfg.connect_timeout
            )
        # No deadline of its own: it is a wait, not a request (the caller bounds it).
        await self.bridge.postgres(self._listener.aio_wait, deadline=math.inf)

    async def vacuum_outbox(self) -> None:
        await self.bridge.postgres(aio_vacuum, self.pool)

    async def stats(self) -> dict[str, Any]:
        return await self.bridge.postgres(aio_stats, self.pool)

    async def memberships(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        async with self._reads:
            return await self.bridge.postgres(aio_memberships, self.pool, pairs)

    async def set_membership(self, conv: str, user: str, rights: str) -> None:
        await self.bridge.postgres(aio_set_membership, self.pool, conv, user, rights)

    async def members(self, conv: str) -> dict[str, str]:
        return await self.bridge.postgres(aio_members, self.pool, conv)


async def _connect_with_retry(bridge: Bridge, cfg: PostgresConfig) -> asyncpg.Pool:
    # A server that is still starting (or briefly down) is waited for, within a bound.
    deadline = trio.current_time() + max(cfg.connect_timeout, 1.0) * 3
    backoff = Backoff(0.1, 1.0)
    while True:
        try:
            return await bridge.postgres(_aio_create_pool, cfg, deadline=cfg.connect_timeout * 2)
        except StoreUnavailable as exc:
            delay = backoff.next()
            if trio.current_time() + delay > deadline:
                raise StoreUnavailable(
                    f"cannot connect to Postgres: {exc.message} (is it running? check "
                    "[postgres].dsn or CHATD_POSTGRES_DSN)"
                ) from exc
            await trio.sleep(delay)


@asynccontextmanager
async def open_postgres_log(
    bridge: Bridge,
    cfg: PostgresConfig,
    *,
    migrate: bool = True,
    shutdown: ShutdownClock | None = None,
) -> AsyncIterator[PostgresLog]:
    """Open the pool (and apply migrations) for the lifetime of the server.

    Closing (the LISTEN connection, then the pool) takes at most 5 s, and ends
    by the shutdown's final deadline.
    """
    pool = await _connect_with_retry(bridge, cfg)
    pglog = PostgresLog(bridge, pool, cfg)
    try:
        if migrate:
            applied = await bridge.postgres(schema.apply, pool, deadline=60.0)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        yield pglog
    finally:
        with (shutdown or ShutdownClock(5.0)).shield(5.0, "final"):
            try:
                await bridge.postgres(pglog._listener.aio_close, deadline=2.0)
                await bridge.postgres(pool.close, deadline=3.0)
            except StoreUnavailable as exc:
                log.warning("Postgres pool did not close cleanly: %s", exc)
