"""``chatd bench bridge``: what one crossing from Trio into asyncio costs, per bridge.

For each ``[server].asyncio_bridge`` in turn, in this process: an empty call
crossing sequentially and from 100 tasks at once, then a Redis ``PING`` and a
Postgres ``SELECT 1`` round trip through the bridge, sequentially. The raw
limit is the same round trip from plain asyncio (no Trio), measured in the
same run; the ratio is what the bridge costs a sequential caller.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from chatd.bench.common import machine
from chatd.config import Config

_CONCURRENT = 100


def add_parser(sub: Any) -> None:
    s = sub.add_parser("bridge", help="one crossing into asyncio, per bridge, vs plain asyncio")
    s.add_argument("--calls", type=int, default=20000, help="calls per measurement")
    s.add_argument("--bridge", default="trio-asyncio,thread", help="bridges to measure in turn")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


async def _noop() -> None:
    return None


async def _raw(config: Config, calls: int) -> dict[str, float]:
    import asyncpg
    import redis.asyncio as aioredis

    out: dict[str, float] = {}
    client = aioredis.Redis.from_url(config.redis.url)
    con = await asyncpg.connect(config.postgres.dsn)
    try:
        for name, fn in (
            ("redis_ping", client.ping),
            ("pg_select", lambda: con.fetchval("SELECT 1")),
        ):
            for _ in range(calls // 20):
                await fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                await fn()
            out[f"{name}_us"] = (time.perf_counter() - t0) / calls * 1e6
    finally:
        await client.aclose()
        await con.close()
    return out


async def _through(config: Config, kind: str, calls: int) -> dict[str, float]:
    import trio

    from chatd.adapters.bridge import open_bridge
    from chatd.chaos import Chaos

    async def _connect() -> tuple[Any, Any]:
        import asyncpg
        import redis.asyncio as aioredis

        return aioredis.Redis.from_url(config.redis.url), await asyncpg.connect(config.postgres.dsn)

    async def _close(client: Any, con: Any) -> None:
        await client.aclose()
        await con.close()

    out: dict[str, float] = {}
    async with open_bridge(Chaos(), postgres_timeout=10, redis_timeout=10, kind=kind) as bridge:
        client, con = await bridge.postgres(_connect)
        try:

            async def seq(fn: Any, *args: Any) -> float:
                for _ in range(calls // 20):
                    await bridge.redis(fn, *args)
                t0 = time.perf_counter()
                for _ in range(calls):
                    await bridge.redis(fn, *args)
                return (time.perf_counter() - t0) / calls * 1e6

            out["empty_us"] = await seq(_noop)
            t0 = time.perf_counter()

            async def crosser() -> None:
                for _ in range(calls // _CONCURRENT):
                    await bridge.redis(_noop)

            async with trio.open_nursery() as nursery:
                for _ in range(_CONCURRENT):
                    nursery.start_soon(crosser)
            out["empty_concurrent_us"] = (time.perf_counter() - t0) / calls * 1e6
            out["redis_ping_us"] = await seq(client.ping)
            out["pg_select_us"] = await seq(con.fetchval, "SELECT 1")
        finally:
            await bridge.postgres(_close, client, con)
    return out


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    kinds = [k.strip() for k in args.bridge.split(",") if k.strip()]
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    print(f"plain asyncio, {args.calls} sequential calls each...", flush=True)
    raw = asyncio.run(_raw(config, args.calls))
    results["raw"] = raw
    for kind in kinds:
        print(f"through the {kind} bridge...", flush=True)
        results[kind] = trio.run(_through, config, kind, args.calls)
    print()
    print(
        f"{'microseconds per call':<34}{'plain asyncio':>14}" + "".join(f"{k:>14}" for k in kinds)
    )
    rows = (
        ("empty crossing, sequential", "empty_us", False),
        (f"empty crossing, {_CONCURRENT} tasks at once", "empty_concurrent_us", False),
        ("Redis PING, sequential", "redis_ping_us", True),
        ("Postgres SELECT 1, sequential", "pg_select_us", True),
    )
    for label, key, has_raw in rows:
        first = f"{raw[key]:>14.1f}" if has_raw else f"{'':>14}"
        print(f"{label:<34}{first}" + "".join(f"{results[k][key]:>14.1f}" for k in kinds))
        if has_raw:
            ratios = "".join(f"{raw[key] / results[k][key]:>14.2f}" for k in kinds)
            print(f"{'  x plain asyncio (calls/s)':<34}{'1.00':>14}{ratios}")
    print("\nOne crossing per batch of work is what chatd pays; x plain asyncio: the bridge's")
    print("sequential calls/s over plain asyncio's, same servers, same run.")
    return results
