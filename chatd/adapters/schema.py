"""Ordered SQL migrations, applied at start and by ``chatd migrate``.

Files ``chatd/migrations/NNNN_name.sql`` are applied in order, each in its
own transaction, and recorded in ``chatd_schema_migrations``. An advisory lock
lets several chatd processes start at once safely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_LOCK_KEY = 0x63686174  # "chat"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with this chatd, in order."""
    found = []
    for entry in resources.files("chatd.adapters.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def apply(pool: asyncpg.Pool) -> list[str]:
    """asyncio side: apply pending migrations; returns the names applied."""
    applied_now = []
    async with pool.acquire() as con:
        await con.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await con.execute(
                """CREATE TABLE IF NOT EXISTS chatd_schema_migrations (
                       version int PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                r["version"] for r in await con.fetch("SELECT version FROM chatd_schema_migrations")
            }
            for mig in available():
                if mig.version in done:
                    continue
                async with con.transaction():
                    await con.execute(mig.sql)
                    await con.execute(
                        "INSERT INTO chatd_schema_migrations (version, name) VALUES ($1, $2)",
                        mig.version,
                        mig.name,
                    )
                applied_now.append(f"{mig.version:04d}_{mig.name}")
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
