"""``chatd bench``: throughput and latency with printed tables.

Every run measures the raw limits (plain asyncio asyncpg and redis, no chatd)
against the same PostgreSQL and Redis, then chatd itself as a separate
``chatd serve`` process driven over WebSocket, and reports chatd's ratio.
The machines are shared and noisy: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from chatd.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="which", required=True)
    s = sub.add_parser("sends", help="durable sends/s, ack and delivery latency, vs raw limits")
    s.add_argument("--senders", type=int, default=16, help="sending WebSocket clients")
    s.add_argument("--convs", type=int, default=8, help="conversations the senders spread over")
    s.add_argument("--viewers", type=int, default=2, help="subscribed clients per conversation")
    s.add_argument("--window", type=int, default=16, help="sends in flight per sender at full load")
    s.add_argument("--seconds", type=float, default=8.0, help="duration of each phase")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _machine() -> str:
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, AttributeError):
        pass
    import asyncpg
    import redis
    import trio

    return (
        f"{platform.machine()}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}, "
        f"trio {trio.__version__}, asyncpg {asyncpg.__version__}, redis-py {redis.__version__}"
    )


# -- raw limits (plain asyncio, no chatd) -------------------------------------


async def _raw_pg_commits(dsn: str, seconds: float, workers: int = 8) -> float:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=workers, max_size=workers)
    try:
        await pool.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw (id bigserial PRIMARY KEY, body text)"
        )
        count = 0
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal count
            async with pool.acquire() as con:
                while time.monotonic() < stop:
                    await con.execute("INSERT INTO bench_raw (body) VALUES ($1)", "x" * 40)
                    count += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        rate = count / (time.monotonic() - t0)
        await pool.execute("DROP TABLE bench_raw")
        return rate
    finally:
        await pool.close()


async def _raw_redis_publish(url: str, seconds: float) -> float:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        count = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await client.publish("bench:raw", "x" * 100)
            count += 1
        return count / (time.monotonic() - t0)
    finally:
        await client.aclose()


# -- chatd as a separate process -------------------------------------------------


def _start_chatd(config: Config, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    conf = tmp / "bench.toml"
    conf.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\nsend_queue_frames = 100000\nsend_queue_bytes = 268435456\n'
        'max_inflight_sends = 1024\n[log]\nlevel = "warning"\n'
    )
    env = {
        **os.environ,
        "CHATD_POSTGRES_DSN": config.postgres.dsn,
        "CHATD_REDIS_URL": config.redis.url,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd.cli", "--config", str(conf), "serve"],
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
        env=env,
        cwd=tmp,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(ws://\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"chatd did not start: {line!r}")
    return proc, m.group(1)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive_sends(
    url: str, args: argparse.Namespace, rate: float | None, tag: str
) -> dict[str, Any]:
    """Run one phase: closed loop (rate None: `window` in flight per sender) or open loop at `rate`/s."""
    import trio
    from trio_websocket import open_websocket_url

    acks: list[float] = []
    deliveries: list[float] = []
    sent_at: dict[str, float] = {}
    errors = 0
    done = trio.Event()
    convs = [f"bench-{tag}-{i}" for i in range(args.convs)]

    async def viewer(conv: str, ready: trio.Event) -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "user": "viewer"}))
            await ws.send_message(json.dumps({"op": "subscribe", "conv": conv}))
            ready.set()
            while True:
                msg = json.loads(await ws.get_message())
                if msg.get("type") == "message":
                    deliveries.append(time.monotonic() - float(msg["text"]))

    async def sender(i: int) -> None:
        nonlocal errors
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "user": f"sender{i}"}))
            await ws.get_message()
            slots = trio.Semaphore(args.window if rate is None else 10_000)
            per_sender = (rate / args.senders) if rate else None
            outstanding = 0
            drained = trio.Event()

            async def read_acks() -> None:
                nonlocal errors, outstanding
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg.get("type") == "ack":
                        acks.append(time.monotonic() - sent_at.pop(msg["id"]))
                    else:
                        errors += 1
                    slots.release()
                    outstanding -= 1
                    if done.is_set() and outstanding == 0:
                        drained.set()

            async with trio.open_nursery() as n:
                n.start_soon(read_acks)
                k = 0
                next_at = time.monotonic()
                while not done.is_set():
                    await slots.acquire()
                    if per_sender:
                        next_at += 1.0 / per_sender
                        await trio.sleep(max(0.0, next_at - time.monotonic()))
                    mid = f"{tag}-{i}-{k}"
                    now = time.monotonic()
                    sent_at[mid] = now
                    outstanding += 1
                    await ws.send_message(
                        json.dumps(
                            {
                                "op": "send",
                                "conv": convs[k % len(convs)],
                                "id": mid,
                                "text": f"{now:.6f}",
                            }
                        )
                    )
                    k += 1
                if outstanding == 0:
                    drained.set()
                with trio.move_on_after(5):
                    await drained.wait()
                n.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for conv in convs:
            for _ in range(args.viewers):
                ready = trio.Event()
                nursery.start_soon(viewer, conv, ready)
                await ready.wait()
        await trio.sleep(0.5)
        t0 = time.monotonic()
        async with trio.open_nursery() as senders:
            for i in range(args.senders):
                senders.start_soon(sender, i)
            await trio.sleep(args.seconds)
            done.set()
        elapsed = time.monotonic() - t0
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    return {
        "acked": len(acks),
        "sends_per_s": len(acks) / elapsed,
        "ack_p50_ms": _pct(acks, 0.5) * 1000,
        "ack_p99_ms": _pct(acks, 0.99) * 1000,
        "deliveries": len(deliveries),
        "deliveries_per_s": len(deliveries) / elapsed,
        "delivery_p50_ms": _pct(deliveries, 0.5) * 1000,
        "delivery_p99_ms": _pct(deliveries, 0.99) * 1000,
        "errors": errors,
    }


def _bench_sends(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    results: dict[str, Any] = {"machine": _machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    print("measuring raw limits (plain asyncio, same servers)...", flush=True)
    raw_pg = asyncio.run(_raw_pg_commits(config.postgres.dsn, min(args.seconds, 5.0)))
    raw_redis = asyncio.run(_raw_redis_publish(config.redis.url, min(args.seconds, 3.0)))
    proc, url = _start_chatd(config, tmp)
    try:
        print(
            f"chatd at {url}: full load ({args.senders} senders x {args.window} in flight, "
            f"{args.convs} convs x {args.viewers} viewers)...",
            flush=True,
        )
        cpu0 = _cpu_seconds(proc.pid)
        full = trio.run(_drive_sends, url, args, None, "full")
        full["server_cpu"] = (_cpu_seconds(proc.pid) - cpu0) / args.seconds
        half_rate = full["sends_per_s"] / 2
        print(f"half load (open loop at {half_rate:.0f} sends/s)...", flush=True)
        cpu0 = _cpu_seconds(proc.pid)
        half = trio.run(_drive_sends, url, args, half_rate, "half")
        half["server_cpu"] = (_cpu_seconds(proc.pid) - cpu0) / args.seconds
    finally:
        proc.terminate()
        proc.wait(15)
    results.update(
        raw_pg_commits_per_s=raw_pg, raw_redis_publish_per_s=raw_redis, full=full, half=half
    )

    print()
    print(f"{'raw limit (same run)':<44}{'per second':>12}")
    print(f"{'asyncpg single-row commits, 8 connections':<44}{raw_pg:>12.0f}")
    print(f"{'redis PUBLISH, sequential':<44}{raw_redis:>12.0f}")
    print()
    hdr = f"{'chatd phase':<12}{'sends/s':>9}{'x pg raw':>9}{'ack p50':>9}{'ack p99':>9}{'deliv/s':>9}{'x redis':>9}{'dlv p50':>9}{'dlv p99':>9}{'cpu':>6}{'err':>5}"
    print(hdr)
    for name, r in (("full load", full), ("half load", half)):
        print(
            f"{name:<12}{r['sends_per_s']:>9.0f}{r['sends_per_s'] / raw_pg:>9.2f}"
            f"{r['ack_p50_ms']:>7.1f}ms{r['ack_p99_ms']:>7.1f}ms{r['deliveries_per_s']:>9.0f}"
            f"{r['deliveries_per_s'] / raw_redis:>9.2f}{r['delivery_p50_ms']:>7.1f}ms{r['delivery_p99_ms']:>7.1f}ms"
            f"{r['server_cpu']:>6.2f}{r['errors']:>5}"
        )
    print("\nsends/s: acknowledged durable sends; x pg raw: ratio to raw single-row commits/s;")
    print("deliv/s: message events received by viewers; x redis: ratio to raw PUBLISH/s;")
    print("cpu: chatd server process CPU (1.0 = one core busy).")
    return results


def main(config: Config, args: argparse.Namespace) -> int:
    from chatd.embedded import EmbeddedServices

    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)
        cfg = replace(config, embedded=replace(config.embedded, data_dir=str(tmp / "data")))
        with EmbeddedServices(cfg) as resolved:
            results = _bench_sends(resolved, args, tmp)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0
