"""``chatd bench sends``: acknowledged durable sends/s, ack and delivery latency."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from chatd.bench.common import (
    add_variant_options,
    file_variants,
    machine,
    pct,
    raw_pg_commits,
    raw_redis_publish,
    start_chatd,
    tree_cpu_seconds,
    variant_header,
    variants,
)
from chatd.config import Config


def add_parser(sub: Any) -> None:
    s = sub.add_parser("sends", help="durable sends/s, ack and delivery latency, vs raw limits")
    s.add_argument("--senders", type=int, default=16, help="sending WebSocket clients")
    s.add_argument("--convs", type=int, default=8, help="conversations the senders spread over")
    s.add_argument("--viewers", type=int, default=2, help="subscribed clients per conversation")
    # 16 x 64 = 1024 in flight keeps one chatd process busy; with 16 x 16 the closed
    # loop ran in lock-step (receive all, commit all, answer all) and measured
    # latency, not capacity: chatd sat at 0.8 of a core and Postgres idled.
    s.add_argument("--window", type=int, default=64, help="sends in flight per sender at full load")
    s.add_argument("--seconds", type=float, default=8.0, help="duration of each phase")
    add_variant_options(s)
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def anonymous_hello(user: str) -> bytes:
    return orjson.dumps({"op": "hello", "user": user})


async def drive_sends(
    url: str,
    args: argparse.Namespace,
    rate: float | None,
    tag: str,
    hello: Callable[[str], bytes] = anonymous_hello,
) -> dict[str, Any]:
    """Run one phase: closed loop (rate None: `window` in flight per sender) or open loop at `rate`/s.

    ``hello(user)`` is the hello frame each client sends (``bench auth``: a token).

    Clients speak WebSocket through :mod:`chatd.bench.wire`, which writes the
    frames it has ready together and parses every frame a read brought: the
    load generator's CPU comes out of the same two cores chatd runs on.
    """
    import trio

    from chatd.bench.wire import WireClient

    acks: list[float] = []
    deliveries: list[float] = []
    sent_at: dict[str, float] = {}
    errors = 0
    done = trio.Event()
    convs = [f"bench-{tag}-{i}" for i in range(args.convs)]
    loads = orjson.loads

    async def viewer(conv: str, task_status: trio.TaskStatus[None]) -> None:
        ws = await WireClient.connect(url)
        try:
            await ws.send(
                [
                    hello("viewer"),
                    orjson.dumps({"op": "subscribe", "conv": conv}),
                ]
            )
            task_status.started()
            while True:
                frames = await ws.receive()
                if not frames:
                    raise RuntimeError(f"viewer of {conv} was disconnected: {ws.closed}")
                now = time.monotonic()
                for f in frames:
                    msg = loads(f)
                    if msg["type"] == "message":
                        deliveries.append(now - float(msg["text"]))
        finally:
            with trio.move_on_after(2.0, shield=True):  # aclose bounds itself to 1 s
                await ws.aclose()

    async def sender(i: int) -> None:
        nonlocal errors
        ws = await WireClient.connect(url)
        k = 0
        outstanding = 0

        def make(n: int) -> list[bytes]:
            nonlocal k, outstanding
            out = []
            now = time.monotonic()
            for _ in range(n):
                mid = f"{tag}-{i}-{k}"
                sent_at[mid] = now
                out.append(
                    orjson.dumps(
                        {
                            "op": "send",
                            "conv": convs[k % len(convs)],
                            "id": mid,
                            "text": f"{now:.6f}",
                        }
                    )
                )
                k += 1
            outstanding += n
            return out

        def take_acks(frames: list[bytes]) -> int:
            nonlocal errors, outstanding
            now = time.monotonic()
            for f in frames:
                msg = loads(f)
                if msg["type"] == "ack":
                    acks.append(now - sent_at.pop(msg["id"]))
                else:
                    errors += 1
            outstanding -= len(frames)
            return len(frames)

        try:
            await ws.send([hello(f"sender{i}")])
            await ws.receive()
            if rate is None:
                # Closed loop: a new send for each answer, `window` in flight.
                await ws.send(make(args.window))
                while outstanding:
                    frames = await ws.receive()
                    if not frames:
                        raise RuntimeError(f"sender {i} was disconnected: {ws.closed}")
                    answered = take_acks(frames)
                    if not done.is_set():
                        await ws.send(make(answered))
                return

            per_sender = rate / args.senders

            async def read_acks() -> None:
                while True:
                    frames = await ws.receive()
                    if not frames:
                        raise RuntimeError(f"sender {i} was disconnected: {ws.closed}")
                    take_acks(frames)
                    if done.is_set() and not outstanding:
                        return

            async with trio.open_nursery() as n:
                n.start_soon(read_acks)
                # Open loop: whatever is due by now goes out (together, if we fell behind).
                t0 = trio.current_time()
                while not done.is_set():
                    due = int((trio.current_time() - t0) * per_sender) + 1 - k
                    if due > 0:
                        await ws.send(make(due))
                    await trio.sleep_until(t0 + k / per_sender)
                if not outstanding:
                    n.cancel_scope.cancel()
        finally:
            with trio.move_on_after(2.0, shield=True):  # aclose bounds itself to 1 s
                await ws.aclose()

    async with trio.open_nursery() as nursery:
        for conv in convs:
            for _ in range(args.viewers):
                await nursery.start(viewer, conv)
        await trio.sleep(0.5)
        t0 = time.monotonic()
        c0 = time.process_time()
        async with trio.open_nursery() as senders:
            for i in range(args.senders):
                senders.start_soon(sender, i)
            await trio.sleep(args.seconds)
            done.set()
            # Answers still owed get 5 s; a server that lost them must not hang the bench.
            senders.cancel_scope.deadline = trio.current_time() + 5
        elapsed = time.monotonic() - t0
        client_cpu = (time.process_time() - c0) / elapsed
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    return {
        "acked": len(acks),
        "sends_per_s": len(acks) / elapsed,
        "ack_p50_ms": pct(acks, 0.5) * 1000,
        "ack_p99_ms": pct(acks, 0.99) * 1000,
        "deliveries": len(deliveries),
        "deliveries_per_s": len(deliveries) / elapsed,
        "delivery_p50_ms": pct(deliveries, 0.5) * 1000,
        "delivery_p99_ms": pct(deliveries, 0.99) * 1000,
        "errors": errors,
        "client_cpu": client_cpu,
    }


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    print("measuring raw limits (plain asyncio, same servers)...", flush=True)
    raw_pg = asyncio.run(raw_pg_commits(config.postgres.dsn, min(args.seconds, 5.0)))
    raw_redis = asyncio.run(raw_redis_publish(config.redis.url, min(args.seconds, 3.0)))
    results.update(raw_pg_commits_per_s=raw_pg, raw_redis_publish_per_s=raw_redis)
    runs = variants(args)
    measured = {label: _measure(config, args, tmp, label, server, raw_pg) for label, server in runs}
    file_variants(results, args, measured)

    print()
    print(f"{'raw limit (same run)':<44}{'per second':>12}")
    print(f"{'asyncpg single-row commits, 8 connections':<44}{raw_pg:>12.0f}")
    print(f"{'redis PUBLISH, sequential':<44}{raw_redis:>12.0f}")
    print()
    hdr = f"{'chatd phase':<16}{'sends/s':>9}{'x pg raw':>9}{'ack p50':>9}{'ack p99':>9}{'deliv/s':>9}{'x redis':>9}{'dlv p50':>9}{'dlv p99':>9}{'cpu':>6}{'bench':>6}{'err':>5}"
    print(hdr)
    for tag, phases in measured.items():
        for name, key in (("full load", "full"), ("half load", "half"), ("half raw", "half_raw")):
            r = phases[key]
            if len(runs) == 1:
                label = name
            else:
                label = f"{tag}w {name}" if tag.isdigit() else f"{tag} {name}"
            print(
                f"{label:<16}{r['sends_per_s']:>9.0f}{r['sends_per_s'] / raw_pg:>9.2f}"
                f"{r['ack_p50_ms']:>7.1f}ms{r['ack_p99_ms']:>7.1f}ms{r['deliveries_per_s']:>9.0f}"
                f"{r['deliveries_per_s'] / raw_redis:>9.2f}{r['delivery_p50_ms']:>7.1f}ms{r['delivery_p99_ms']:>7.1f}ms"
                f"{r['server_cpu']:>6.2f}{r['client_cpu']:>6.2f}{r['errors']:>5}"
            )
    print("\nsends/s: acknowledged durable sends; x pg raw: ratio to raw single-row commits/s;")
    print("deliv/s: message events received by viewers; x redis: ratio to raw PUBLISH/s;")
    print("full load: closed loop; half load: open loop at half of full load's rate;")
    print("half raw: open loop at half the raw commit rate (the core target's ack p99 condition).")
    print("cpu: chatd's CPU, all its worker processes (1.0 = one core busy); bench: this load")
    print(
        "generator's CPU. Nw: [server].workers = N; thread, trio-asyncio: [server].asyncio_bridge."
    )
    return results


def _measure(
    config: Config,
    args: argparse.Namespace,
    tmp: Path,
    label: str,
    server: dict[str, Any],
    raw_pg: float,
) -> dict[str, Any]:
    """The three phases against one chatd configured with ``server``."""
    import trio

    proc, url = start_chatd(config, tmp, {"server": server})
    # Conversations and message ids unique to this server's run: another run on
    # the same database must not find its sends already stored (duplicates are
    # acked without a commit or a delivery).
    run = f"{time.time_ns():x}"
    try:
        print(
            f"chatd at {url} ({variant_header(label, server)}): full load ({args.senders} senders x "
            f"{args.window} in flight, {args.convs} convs x {args.viewers} viewers)...",
            flush=True,
        )
        cpu0 = tree_cpu_seconds(proc.pid)
        full = trio.run(drive_sends, url, args, None, f"{run}-full")
        full["server_cpu"] = (tree_cpu_seconds(proc.pid) - cpu0) / args.seconds
        half_rate = full["sends_per_s"] / 2
        print(f"half load (open loop at {half_rate:.0f} sends/s)...", flush=True)
        cpu0 = tree_cpu_seconds(proc.pid)
        half = trio.run(drive_sends, url, args, half_rate, f"{run}-half")
        half["server_cpu"] = (tree_cpu_seconds(proc.pid) - cpu0) / args.seconds
        # The core target's wording: ack p99 at half the raw commit rate.
        print(f"half raw (open loop at {raw_pg / 2:.0f} sends/s)...", flush=True)
        cpu0 = tree_cpu_seconds(proc.pid)
        half_raw = trio.run(drive_sends, url, args, raw_pg / 2, f"{run}-halfraw")
        half_raw["server_cpu"] = (tree_cpu_seconds(proc.pid) - cpu0) / args.seconds
    finally:
        proc.terminate()
        proc.wait(30)
    return {"full": full, "half": half, "half_raw": half_raw}
