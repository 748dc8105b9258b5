"""Postgres for replies in flight: process leases, reply rows, checkpoints, takeover
(migrations 0006, 0007). Functions run on the asyncio side, through the bridge."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import orjson

from chatd.records import Checkpoint, InFlight, Orphan, Registration


async def aio_heartbeat(pool: asyncpg.Pool, process: str, lease: float) -> bool:
    row = await pool.fetchrow(
        "INSERT INTO chatd_processes AS p (id, lease_until) "
        "VALUES ($1, now() + make_interval(secs => $2)) "
        "ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until "
        "WHERE NOT p.dead AND p.lease_until > now() "
        "RETURNING true AS ok",
        process,
        lease,
    )
    return row is not None


async def aio_register_replies(
    pool: asyncpg.Pool, owner: str, batch: Sequence[Registration]
) -> None:
    await pool.execute(
        "INSERT INTO replies_in_flight (stream_id, conv_id, owner, meta) "
        "SELECT s, c, $1, m FROM unnest($2::text[], $3::text[], $4::text[]) AS b(s, c, m) "
        "ON CONFLICT (stream_id) DO NOTHING",
        owner,
        [r.stream for r in batch],
        [r.conv for r in batch],
        [r.meta for r in batch],
    )


async def aio_checkpoint(pool: asyncpg.Pool, owner: str, pieces: Sequence[Checkpoint]) -> None:
    await pool.execute(
        "UPDATE replies_in_flight AS r SET body = r.body || p.text, "
        "length = r.length + char_length(p.text), updated_at = now() "
        "FROM unnest($2::text[], $3::int[], $4::text[]) AS p(stream_id, old_length, text) "
        "WHERE r.stream_id = p.stream_id AND r.owner = $1 AND r.length = p.old_length",
        owner,
        [p.stream for p in pieces],
        [p.old_length for p in pieces],
        [p.text for p in pieces],
    )


async def aio_take_orphans(pool: asyncpg.Pool, taker: str) -> list[Orphan]:
    # One statement, so its outcome is all or nothing: processes past their lease
    # are marked dead, and every reply a dead process owns changes hands, marked
    # taken. Row locks make two takers exclusive: the second re-checks the owner
    # after the first committed, and skips. The taker's own taken rows come back
    # too: if the answer to an earlier call was lost, they are found again here.
    # Only a live taker (its own lease current) declares others dead or takes
    # anything: a process cut off past its lease would otherwise declare
    # itself dead and take its own replies over, ended or not.
    rows = await pool.fetch(
        "WITH me AS ("
        "  SELECT 1 FROM chatd_processes WHERE id = $1 AND NOT dead AND lease_until >= now()"
        "), newly AS ("
        "  UPDATE chatd_processes SET dead = true"
        "  WHERE lease_until < now() AND NOT dead AND EXISTS (SELECT 1 FROM me) RETURNING id"
        "), forgotten AS ("
        "  DELETE FROM chatd_processes WHERE dead AND lease_until < now() - interval '1 day'"
        ") "
        "UPDATE replies_in_flight AS r SET owner = $1, taken = true, updated_at = now() "
        "WHERE EXISTS (SELECT 1 FROM me) AND ("
        "   r.owner IN (SELECT id FROM newly) "
        "   OR r.owner IN (SELECT id FROM chatd_processes WHERE dead) "
        "   OR (r.owner = $1 AND r.taken)) "
        "RETURNING r.stream_id, r.conv_id, r.meta, r.body",
        taker,
    )
    return [Orphan(r["stream_id"], r["conv_id"], orjson.loads(r["meta"]), r["body"]) for r in rows]


async def aio_inflight(pool: asyncpg.Pool, convs: Sequence[str]) -> list[list[InFlight]]:
    rows = await pool.fetch(
        "SELECT conv_id, stream_id, meta, body FROM replies_in_flight "
        "WHERE conv_id = ANY($1::text[])",
        list(convs),
    )
    by_conv: dict[str, list[InFlight]] = {c: [] for c in convs}
    for r in rows:
        by_conv[r["conv_id"]].append(InFlight(r["stream_id"], orjson.loads(r["meta"]), r["body"]))
    return [by_conv[c] for c in convs]


async def aio_drop_reply(pool: asyncpg.Pool, stream: str, owner: str) -> bool:
    # The outer SELECT sees the row as it was before the DELETE (one snapshot).
    row = await pool.fetchrow(
        "WITH d AS (DELETE FROM replies_in_flight WHERE stream_id = $1 AND owner = $2 "
        "RETURNING 1) "
        "SELECT EXISTS (SELECT 1 FROM d) AS dropped, "
        "EXISTS (SELECT 1 FROM replies_in_flight WHERE stream_id = $1) AS held",
        stream,
        owner,
    )
    return bool(row["dropped"]) or not row["held"]
