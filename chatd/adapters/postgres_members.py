"""Postgres for access control: the ``conversation_members`` table (migration 0005)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg


async def aio_memberships(
    pool: asyncpg.Pool, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    rows = await pool.fetch(
        "SELECT m.conv_id, m.user_id, m.can_read, m.can_write "
        "FROM unnest($1::text[], $2::text[]) AS p(conv_id, user_id) "
        "JOIN conversation_members AS m USING (conv_id, user_id)",
        [c for c, _ in pairs],
        [u for _, u in pairs],
    )
    return {
        (r["conv_id"], r["user_id"]): ("r" if r["can_read"] else "")
        + ("w" if r["can_write"] else "")
        for r in rows
    }


async def aio_set_membership(pool: asyncpg.Pool, conv: str, user: str, rights: str) -> None:
    if not rights:
        await pool.execute(
            "DELETE FROM conversation_members WHERE conv_id = $1 AND user_id = $2", conv, user
        )
        return
    await pool.execute(
        "INSERT INTO conversation_members (conv_id, user_id, can_read, can_write) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (conv_id, user_id) DO UPDATE "
        "SET can_read = EXCLUDED.can_read, can_write = EXCLUDED.can_write, granted_at = now()",
        conv,
        user,
        "r" in rights,
        "w" in rights,
    )


async def aio_members(pool: asyncpg.Pool, conv: str) -> dict[str, str]:
    rows = await pool.fetch(
        "SELECT user_id, can_read, can_write FROM conversation_members WHERE conv_id = $1",
        conv,
    )
    return {
        r["user_id"]: ("r" if r["can_read"] else "") + ("w" if r["can_write"] else "") for r in rows
    }
