"""``chatd bench reads``: is read latency independent of table size?

Loads realistic data (see ``load``) up to each size in turn, and at each size
measures, for random conversations, the latency of a snapshot (subscribe),
a catch-up after a cursor (subscribe with ``after``) and a history page,
through chatd's WebSocket API and as raw SQL beside it (plain asyncpg, the
same queries chatd runs). The claim holds if the curves are flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from chatd.bench.common import machine, pct, start_chatd
from chatd.bench.load import (
    DEFAULT_MIX,
    Generator,
    Mix,
    _migrate,
    fmt_bytes,
    load_events,
    parse_size,
)
from chatd.config import Config

OPS = ("snapshot", "catchup", "history")


def add_parser(sub: Any) -> None:
    s = sub.add_parser("reads", help="snapshot/catch-up/history latency against table size")
    s.add_argument(
        "--sizes", default="100k,1M", help="comma-separated table sizes, e.g. 100k,1M,10M"
    )
    s.add_argument("--samples", type=int, default=300, help="requests per operation and size")
    s.add_argument("--mix", type=Path, default=DEFAULT_MIX, help="event mix (TOML)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    s.add_argument("--plot", metavar="PNG", help="plot latency against size (needs matplotlib)")


def _picks(convs: list[tuple[str, int]], n: int, seed: int) -> list[tuple[str, int, int]]:
    """(conv, head, cursor/before) for n random conversations."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conv, head = convs[rng.randrange(len(convs))]
        out.append((conv, head, rng.randint(1, head)))
    return out


async def _raw(dsn: str, picks: list[tuple[str, int, int]]) -> dict[str, list[float]]:
    import asyncpg

    cols = "seq, client_id, user_id, role, status, body, created_at"
    con = await asyncpg.connect(dsn)
    lat: dict[str, list[float]] = {op: [] for op in OPS}
    try:
        for conv, head, pos in picks:
            t0 = time.perf_counter()
            async with con.transaction(isolation="repeatable_read", readonly=True):
                await con.fetchval("SELECT head FROM conversations WHERE id = $1", conv)
                await con.fetch(
                    f"SELECT {cols} FROM messages WHERE conv_id = $1 ORDER BY seq DESC LIMIT 50",
                    conv,
                )
            lat["snapshot"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            async with con.transaction(isolation="repeatable_read", readonly=True):
                await con.fetchval("SELECT head FROM conversations WHERE id = $1", conv)
                await con.fetch(
                    f"SELECT {cols} FROM messages WHERE conv_id = $1 AND seq > $2 ORDER BY seq",
                    conv,
                    max(0, head - 20),
                )
            lat["catchup"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await con.fetch(
                f"SELECT {cols} FROM messages WHERE conv_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT 50",
                conv,
                pos,
            )
            lat["history"].append(time.perf_counter() - t0)
    finally:
        await con.close()
    return lat


async def _chatd(url: str, picks: list[tuple[str, int, int]]) -> dict[str, list[float]]:
    import trio
    from trio_websocket import open_websocket_url

    lat: dict[str, list[float]] = {op: [] for op in OPS}
    async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
        await ws.send_message(json.dumps({"op": "hello", "user": "bench"}))
        await ws.get_message()

        async def call(frame: dict[str, Any], want: str) -> float:
            t0 = time.perf_counter()
            await ws.send_message(json.dumps(frame))
            while True:
                msg = json.loads(await ws.get_message())
                if msg.get("type") in (want, "error"):
                    if msg["type"] == "error":
                        raise SystemExit(f"chatd answered an error: {msg}")
                    return time.perf_counter() - t0

        for conv, head, pos in picks:
            lat["snapshot"].append(await call({"op": "subscribe", "conv": conv}, "snapshot"))
            await call({"op": "unsubscribe", "conv": conv}, "unsubscribed")
            frame = {"op": "subscribe", "conv": conv, "after": max(0, head - 20)}
            lat["catchup"].append(await call(frame, "snapshot"))
            await call({"op": "unsubscribe", "conv": conv}, "unsubscribed")
            frame = {"op": "history", "conv": conv, "before": pos, "limit": 50}
            lat["history"].append(await call(frame, "history"))
        await trio.lowlevel.checkpoint()
    return lat


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    results: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args) | {"func": None},
        "sizes": [],
    }
    print(f"machine: {results['machine']}")
    asyncio.run(_migrate(config))
    gen = Generator(Mix.load(args.mix), args.seed, f"r{time.time_ns() % 10**8:x}-")
    convs: list[tuple[str, int]] = []
    loaded = 0
    proc, url = start_chatd(config, tmp)
    try:
        for size in sizes:
            print(f"loading up to {size:,} events...", flush=True)
            r = asyncio.run(load_events(config.postgres.dsn, gen, size - loaded, convs))
            loaded += r["loaded"]
            picks = _picks(convs, args.samples, args.seed + size)
            print(
                f"  {loaded:,} events ({r['events_per_s']:,.0f}/s, messages "
                f"{fmt_bytes(r['messages_total'])}); measuring {args.samples} x {len(OPS)} reads...",
                flush=True,
            )
            raw = asyncio.run(_raw(config.postgres.dsn, picks))
            via = trio.run(_chatd, url, picks)
            row: dict[str, Any] = {
                "events": r["events"],
                "conversations": len(convs),
                "load_events_per_s": r["events_per_s"],
                "messages_total_bytes": r["messages_total"],
                "messages_index_bytes": r["messages_indexes"],
            }
            for op in OPS:
                for name, lat in (("chatd", via), ("raw", raw)):
                    row[f"{name}_{op}_p50_ms"] = pct(lat[op], 0.5) * 1000
                    row[f"{name}_{op}_p99_ms"] = pct(lat[op], 0.99) * 1000
            results["sizes"].append(row)
    finally:
        proc.terminate()
        proc.wait(15)
    _print(results["sizes"])
    if args.plot:
        plot(results["sizes"], Path(args.plot))
    return results


def _print(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        f"{'events':>12}{'convs':>9}{'size':>11}  "
        + "".join(f"{op + ' p50/p99 ms':>24}" for op in OPS)
    )
    for r in rows:
        for name in ("chatd", "raw"):
            cells = "".join(
                f"{r[f'{name}_{op}_p50_ms']:>15.2f} /{r[f'{name}_{op}_p99_ms']:>6.2f}" for op in OPS
            )
            lead = (
                f"{r['events']:>12,}{r['conversations']:>9,}{fmt_bytes(r['messages_total_bytes']):>11}"
                if name == "chatd"
                else " " * 32
            )
            print(f"{lead}  {cells}   {name}")
    print(
        "\nchatd: over WebSocket (subscribe = snapshot; subscribe with after = catch-up; history page),"
    )
    print("raw: the same SQL with plain asyncpg on one connection. size: messages heap + indexes.")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Latency against table size, one panel per operation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: pip install 'chatd[bench]' (matplotlib) for PNG plots")
        return
    fig, axes = plt.subplots(1, len(OPS), figsize=(13, 4), sharey=True)
    xs = [r["events"] for r in rows]
    for ax, op in zip(axes, OPS, strict=True):
        for name, style in (("chatd", "-o"), ("raw", "--s")):
            for q in ("p50", "p99"):
                ax.plot(xs, [r[f"{name}_{op}_{q}_ms"] for r in rows], style, label=f"{name} {q}")
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("events in table")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend()
    fig.suptitle("chatd bench reads: read latency against table size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")
