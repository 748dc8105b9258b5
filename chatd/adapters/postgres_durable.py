"""Durable Streams on PostgreSQL (migration 0008): the :class:`~chatd.ports.StreamStore`.

Each operation is one crossing of the bridge and one transaction. Appends are
group-committed: a batch of them (from every writer waiting) is one
transaction that locks its streams' rows (``FOR UPDATE``), which serializes
every writer of a stream, producers included, and commits the data, the new
tails and the producers' state together — so a retried append is never
stored twice, and an acknowledged one is on disk. Creates and deletes also take a transaction-scoped
advisory lock on the path, so two racing PUTs of one path agree.

The protocol's rules are :mod:`chatd.durable.model`'s; functions prefixed
``_aio_`` run on the asyncio side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import asyncpg
import orjson
import trio

from chatd.adapters.bridge import Bridge
from chatd.durable.model import (
    Append,
    AppendPlan,
    Create,
    DSError,
    Producer,
    StreamRow,
    check_create,
    check_existing,
    check_source,
    chunk_body,
    fork_chunks,
    fork_position,
    new_stream,
    plan_append,
    window,
)

Chunk = tuple[int, int, bytes]
_ROW = (
    "id, path, content_type, ttl, expires_at, closed, tail, touched, closed_by, "
    "stream_seq, fork_of, fork_pos, deleted, refs"
)
#: Rows one read fetches at most (the byte budget usually stops it sooner).
_READ_ROWS = 10_000


def _row(r: asyncpg.Record) -> StreamRow:
    closed_by = r["closed_by"]
    return StreamRow(
        id=r["id"],
        path=r["path"],
        content_type=r["content_type"],
        ttl=r["ttl"],
        expires_at=r["expires_at"],
        closed=r["closed"],
        tail=r["tail"],
        touched=r["touched"],
        closed_by=tuple(orjson.loads(closed_by)) if closed_by else None,  # type: ignore[arg-type]
        stream_seq=r["stream_seq"],
        fork_of=r["fork_of"],
        fork_pos=r["fork_pos"],
        deleted=r["deleted"],
        refs=r["refs"],
    )


async def _find(
    con: asyncpg.Connection, path: str, now: float, *, lock: bool = False
) -> StreamRow | None:
    """The stream at ``path`` (soft-deleted included); an expired one is deleted first."""
    r = await con.fetchrow(
        f"SELECT {_ROW} FROM ds_streams WHERE path = $1" + (" FOR UPDATE" if lock else ""), path
    )
    if r is None:
        return None
    row = _row(r)
    if not row.deleted and row.expired(now):
        await _delete(con, row)
        r = await con.fetchrow(f"SELECT {_ROW} FROM ds_streams WHERE path = $1", path)
        return None if r is None else _row(r)
    return row


async def _live(con: asyncpg.Connection, path: str, now: float, *, lock: bool) -> StreamRow:
    row = await _find(con, path, now, lock=lock)
    if row is None:
        raise DSError(404, f"no stream at {path}")
    if row.deleted:
        raise DSError(410, f"the stream at {path} was deleted")
    return row


async def _delete(con: asyncpg.Connection, row: StreamRow) -> None:
    """Remove ``row`` (soft-delete it while forks read it); cascade to a soft-deleted source."""
    while True:
        refs = await con.fetchval("SELECT refs FROM ds_streams WHERE id = $1 FOR UPDATE", row.id)
        if refs is None:
            return
        if refs > 0:
            await con.execute("UPDATE ds_streams SET deleted = true WHERE id = $1", row.id)
            return
        await con.execute("DELETE FROM ds_streams WHERE id = $1", row.id)
        if row.fork_of is None:
            return
        r = await con.fetchrow(
            f"UPDATE ds_streams SET refs = refs - 1 WHERE path = $1 RETURNING {_ROW}", row.fork_of
        )
        if r is None:
            return
        source = _row(r)
        if not (source.deleted and source.refs == 0):
            return
        row = source


async def _insert_chunks(con: asyncpg.Connection, sid: int, chunks: Sequence[Chunk]) -> None:
    if chunks:
        await con.execute(
            "INSERT INTO ds_chunks (stream_id, pos, stop, data) "
            "SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bytea[])",
            sid,
            [c[0] for c in chunks],
            [c[1] for c in chunks],
            [c[2] for c in chunks],
        )


async def _chunks(
    con: asyncpg.Connection, sid: int, pos: int, stop: int, max_bytes: int | None
) -> list[Chunk]:
    """The chunks of stream ``sid`` ending in ``(pos, stop]``, about ``max_bytes`` of them."""
    if max_bytes is None:
        rows = await con.fetch(
            "SELECT pos, stop, data FROM ds_chunks WHERE stream_id = $1 AND stop > $2 "
            "AND pos < $3 ORDER BY stop",
            sid,
            pos,
            stop,
        )
    else:
        # Stop once the bytes before a row reach the budget (window() trims exactly).
        rows = await con.fetch(
            "SELECT pos, stop, data FROM (SELECT pos, stop, data, "
            "sum(octet_length(data)) OVER (ORDER BY stop) - octet_length(data) AS before "
            "FROM ds_chunks WHERE stream_id = $1 AND stop > $2 AND pos < $3 "
            "ORDER BY stop LIMIT $5) c WHERE before < $4 ORDER BY stop",
            sid,
            pos,
            stop,
            max_bytes,
            _READ_ROWS,
        )
    return [(r["pos"], r["stop"], bytes(r["data"])) for r in rows]


async def _aio_create(
    pool: asyncpg.Pool, path: str, req: Create, now: float
) -> tuple[bool, StreamRow]:
    check_create(req)
    async with pool.acquire() as con, con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock(hashtext($1))", path)
        row = await _find(con, path, now, lock=True)
        if row is not None:
            check_existing(row, req, path)
            return False, row
        source = None
        chunks: list[Chunk] = []
        if req.fork_of is not None:
            source = check_source(await _find(con, req.fork_of, now, lock=True), req.fork_of)
        row = new_stream(0, path, req, now, source)
        if source is not None:
            pos = fork_position(source, req)
            chunks = fork_chunks(await _chunks(con, source.id, 0, pos, None), pos)
            row = replace(row, tail=pos, fork_pos=pos)
            await con.execute("UPDATE ds_streams SET refs = refs + 1 WHERE id = $1", source.id)
        body = chunk_body(row, req.body, allow_empty=True)
        if body:
            row = replace(row, tail=body[-1][1])
        row = replace(row, closed=req.closed)
        sid = await con.fetchval(
            "INSERT INTO ds_streams (path, content_type, ttl, expires_at, closed, tail, touched, "
            "fork_of, fork_pos) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            path,
            row.content_type,
            row.ttl,
            row.expires_at,
            row.closed,
            row.tail,
            now,
            row.fork_of,
            row.fork_pos,
        )
        await _insert_chunks(con, sid, chunks + body)
        return True, replace(row, id=sid)


async def _aio_append_many(
    pool: asyncpg.Pool, items: Sequence[tuple[str, Append]], now: float
) -> list[AppendPlan | DSError]:
    """Every append in one transaction (group commit): the streams' rows locked in
    path order (so two batches never deadlock), the rules applied in order in
    Python, then all writes in three statements."""
    async with pool.acquire() as con, con.transaction():
        rows: dict[str, StreamRow] = {}
        for r in await con.fetch(
            f"SELECT {_ROW} FROM ds_streams WHERE path = ANY($1::text[]) ORDER BY path FOR UPDATE",
            sorted({path for path, _ in items}),
        ):
            rows[r["path"]] = _row(r)
        for path, row in list(rows.items()):
            if not row.deleted and row.expired(now):
                del rows[path]
                found = await _find(con, path, now, lock=True)  # deletes it
                if found is not None:
                    rows[path] = found
        wanted = [(rows[p].id, req.producer[0]) for p, req in items if req.producer and p in rows]
        producers: dict[tuple[int, str], Producer] = {}
        if wanted:
            for r in await con.fetch(
                "SELECT p.stream_id, p.producer_id, p.epoch, p.seq FROM ds_producers AS p "
                "JOIN unnest($1::bigint[], $2::text[]) AS w(stream_id, producer_id) "
                "USING (stream_id, producer_id)",
                [w[0] for w in wanted],
                [w[1] for w in wanted],
            ):
                producers[(r["stream_id"], r["producer_id"])] = Producer(r["epoch"], r["seq"])
        before = dict(rows)
        results: list[AppendPlan | DSError] = []
        chunks: list[tuple[int, int, int, bytes]] = []
        touched: dict[tuple[int, str], Producer] = {}
        for path, req in items:
            row = rows.get(path)
            try:
                if row is None:
                    raise DSError(404, f"no stream at {path}")
                if row.deleted:
                    raise DSError(410, f"the stream at {path} was deleted")
                key = (row.id, req.producer[0]) if req.producer else None
                plan = plan_append(row, producers.get(key) if key else None, req, now)
            except DSError as exc:
                results.append(exc)
                continue
            if plan.changed:
                rows[path] = plan.row
                chunks += [(row.id, *c) for c in plan.chunks]
            if plan.producer is not None and key is not None:
                producers[key] = touched[key] = plan.producer
            results.append(plan)
        if chunks:
            await con.execute(
                "INSERT INTO ds_chunks (stream_id, pos, stop, data) "
                "SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[])",
                *(list(col) for col in zip(*chunks, strict=True)),
            )
        changed = [row for path, row in rows.items() if row is not before.get(path)]
        if changed:
            await con.execute(
                "UPDATE ds_streams AS s SET tail = u.tail, touched = u.touched, closed = u.closed, "
                "closed_by = u.closed_by, stream_seq = u.stream_seq FROM unnest($1::bigint[], "
                "$2::bigint[], $3::float8[], $4::bool[], $5::text[], $6::text[]) "
                "AS u(id, tail, touched, closed, closed_by, stream_seq) WHERE s.id = u.id",
                [r.id for r in changed],
                [r.tail for r in changed],
                [r.touched for r in changed],
                [r.closed for r in changed],
                [orjson.dumps(r.closed_by).decode() if r.closed_by else None for r in changed],
                [r.stream_seq for r in changed],
            )
        if touched:
            await con.execute(
                "INSERT INTO ds_producers (stream_id, producer_id, epoch, seq) "
                "SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[]) "
                "ON CONFLICT (stream_id, producer_id) "
                "DO UPDATE SET epoch = EXCLUDED.epoch, seq = EXCLUDED.seq",
                [k[0] for k in touched],
                [k[1] for k in touched],
                [p.epoch for p in touched.values()],
                [p.seq for p in touched.values()],
            )
        return results


async def _aio_head(pool: asyncpg.Pool, path: str, now: float) -> StreamRow:
    async with pool.acquire() as con, con.transaction():
        return await _live(con, path, now, lock=False)


async def _aio_read(
    pool: asyncpg.Pool, path: str, pos: int | None, max_bytes: int, now: float
) -> tuple[StreamRow, list[Chunk]]:
    async with pool.acquire() as con, con.transaction():
        row = await _live(con, path, now, lock=False)
        if row.ttl is not None:  # a read renews a sliding TTL
            await con.execute("UPDATE ds_streams SET touched = $2 WHERE id = $1", row.id, now)
            row = replace(row, touched=now)
        if pos is None or pos >= row.tail:
            return row, []
        # Chunks past the tail read above are left for the next read: the
        # answer's data and its Stream-Next-Offset agree.
        return row, window(await _chunks(con, row.id, pos, row.tail, max_bytes), pos, max_bytes)


async def _aio_delete(pool: asyncpg.Pool, path: str, now: float) -> None:
    async with pool.acquire() as con, con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock(hashtext($1))", path)
        row = await _live(con, path, now, lock=True)
        await _delete(con, row)


async def _aio_sweep(pool: asyncpg.Pool, now: float) -> int:
    rows = await pool.fetch(
        "SELECT path FROM ds_streams WHERE NOT deleted AND "
        "(expires_at <= $1 OR touched + ttl <= $1) LIMIT 1000",
        now,
    )
    for r in rows:
        async with pool.acquire() as con, con.transaction():
            await _find(con, r["path"], now, lock=True)  # deletes it if it is still expired
    return len(rows)


class PostgresStreams:
    """Durable Streams in Postgres; every call crosses the bridge once."""

    def __init__(self, bridge: Bridge, pool: asyncpg.Pool, reads: trio.Semaphore) -> None:
        self._bridge = bridge
        self._pool = pool
        #: Shared with the log's reads, so streams cannot take every connection.
        self._reads = reads

    async def create(self, path: str, req: Create, now: float) -> tuple[bool, StreamRow]:
        return await self._bridge.postgres(_aio_create, self._pool, path, req, now)

    async def append_many(
        self, items: Sequence[tuple[str, Append]], now: float
    ) -> list[AppendPlan | DSError]:
        return await self._bridge.postgres(_aio_append_many, self._pool, items, now)

    async def head(self, path: str, now: float) -> StreamRow:
        async with self._reads:
            return await self._bridge.postgres(_aio_head, self._pool, path, now)

    async def read(
        self, path: str, pos: int | None, max_bytes: int, now: float
    ) -> tuple[StreamRow, list[Chunk]]:
        async with self._reads:
            return await self._bridge.postgres(_aio_read, self._pool, path, pos, max_bytes, now)

    async def delete(self, path: str, now: float) -> None:
        await self._bridge.postgres(_aio_delete, self._pool, path, now)

    async def sweep(self, now: float) -> int:
        return await self._bridge.postgres(_aio_sweep, self._pool, now, deadline=30.0)
