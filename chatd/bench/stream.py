"""``chatd bench stream``: S concurrent replies at R tokens/s, each watched by V clients.

The fake model stamps every token with the system monotonic time it was
emitted at (``#clock``), so each viewer measures emit-to-receive latency
per token even when the lane coalesced several tokens into one delta.
The viewers use the lean client of :mod:`chatd.bench.wire`: with
trio-websocket they took 0.55-0.66 of a core beside chatd's one (session 15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatd.bench.common import (
    add_variant_options,
    file_variants,
    machine,
    pct,
    raw_redis_publish,
    start_chatd,
    tree_cpu_seconds,
    variant_header,
    variants,
)
from chatd.bench.wire import WireClient
from chatd.config import Config


def add_parser(sub: Any) -> None:
    s = sub.add_parser("stream", help="token deliveries/s and emit-to-screen latency")
    s.add_argument("--streams", type=int, default=100, help="concurrent replies")
    s.add_argument("--rate", type=float, default=50.0, help="tokens per second per reply")
    s.add_argument("--viewers", type=int, default=2, help="subscribed clients per reply")
    s.add_argument("--seconds", type=float, default=10.0, help="measured duration")
    s.add_argument(
        "--lane-interval-ms", type=float, default=0.0, help="[streams].lane_interval_ms for chatd"
    )
    add_variant_options(s)
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


async def _drive(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import trio
    from trio_websocket import open_websocket_url

    latencies: list[float] = []
    tokens = 0
    frames = 0
    gaps = 0
    measuring = False
    ready_count = 0
    all_ready = trio.Event()
    total_viewers = args.streams * args.viewers

    async def viewer(conv: str) -> None:
        nonlocal tokens, frames, gaps, ready_count
        ws = await WireClient.connect(url)
        try:
            hello = json.dumps({"op": "hello", "user": "viewer"}).encode()
            await ws.send([hello, json.dumps({"op": "subscribe", "conv": conv}).encode()])
            have: dict[str, int] = {}
            while True:
                batch = await ws.receive()
                if not batch:
                    return  # the server closed the connection
                now = time.monotonic()
                for raw in batch:
                    msg = json.loads(raw)
                    kind = msg.get("type")
                    if kind == "snapshot":
                        ready_count += 1
                        if ready_count == total_viewers:
                            all_ready.set()
                    elif kind == "delta":
                        if msg["offset"] != have.get(msg["stream"], 0):
                            gaps += 1
                        have[msg["stream"]] = msg["offset"] + len(msg["text"])
                        if measuring:
                            frames += 1
                            for stamp in msg["text"].split("@")[1:]:
                                tokens += 1
                                latencies.append(now - float(stamp))
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                await ws.aclose()

    async def starter(conv: str, n_tokens: int) -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "user": "asker"}))
            frame = {
                "op": "send",
                "conv": conv,
                "id": "q",
                "reply": True,
                "text": f"#clock #tokens={n_tokens} #rate={args.rate}",
            }
            await ws.send_message(json.dumps(frame))
            while json.loads(await ws.get_message()).get("type") != "ack":
                pass

    run_id = f"{time.time_ns():x}"
    convs = [f"bench-stream-{run_id}-{i}" for i in range(args.streams)]
    warmup = 2.0
    n_tokens = int(args.rate * (args.seconds + warmup + 5))
    async with trio.open_nursery() as nursery:
        for conv in convs:
            for _ in range(args.viewers):
                nursery.start_soon(viewer, conv)
        with trio.fail_after(60):
            await all_ready.wait()
        async with trio.open_nursery() as starters:
            for conv in convs:
                starters.start_soon(starter, conv, n_tokens)
        await trio.sleep(warmup)
        measuring = True
        t0, c0 = time.monotonic(), time.process_time()
        await trio.sleep(args.seconds)
        measuring = False
        elapsed = time.monotonic() - t0
        client_cpu = (time.process_time() - c0) / elapsed
        nursery.cancel_scope.cancel()
    return {
        "token_deliveries": tokens,
        "token_deliveries_per_s": tokens / elapsed,
        "delta_frames_per_s": frames / elapsed,
        "latency_p50_ms": pct(latencies, 0.5) * 1000,
        "latency_p99_ms": pct(latencies, 0.99) * 1000,
        "offset_gaps": gaps,
        "client_cpu": client_cpu,
    }


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    print("measuring raw Redis PUBLISH (plain asyncio, same server)...", flush=True)
    raw_redis = asyncio.run(raw_redis_publish(config.redis.url, 3.0))
    runs = variants(args)
    measured = {label: _measure(config, args, tmp, label, server) for label, server in runs}
    target = args.streams * args.rate * args.viewers
    results.update(raw_redis_publish_per_s=raw_redis, target_deliveries_per_s=target)
    file_variants(results, args, measured)
    print()
    print(f"{'':<34}" + "".join(f"{variant_header(label, server):>14}" for label, server in runs))

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        print(f"{label:<34}" + "".join(f"{cell(measured[tag]):>14}" for tag, _ in runs))

    print(f"{'raw redis PUBLISH/s (same run)':<34}{raw_redis:>14.0f}")
    print(f"{'offered token deliveries/s':<34}{target:>14.0f}")
    row("token deliveries/s", lambda r: f"{r['token_deliveries_per_s']:.0f}")
    row("  x offered", lambda r: f"{r['token_deliveries_per_s'] / target:.2f}")
    row("  x raw PUBLISH/s", lambda r: f"{r['token_deliveries_per_s'] / raw_redis:.2f}")
    row("delta frames/s (to clients)", lambda r: f"{r['delta_frames_per_s']:.0f}")
    row("emit -> client p50", lambda r: f"{r['latency_p50_ms']:.1f}ms")
    row("emit -> client p99", lambda r: f"{r['latency_p99_ms']:.1f}ms")
    row("offset gaps seen by clients", lambda r: f"{r['offset_gaps']}")
    row("chatd CPU, all workers (cores)", lambda r: f"{r['server_cpu']:.2f}")
    row("bench clients CPU (cores)", lambda r: f"{r['client_cpu']:.2f}")
    return results


def _measure(
    config: Config, args: argparse.Namespace, tmp: Path, label: str, server: dict[str, Any]
) -> dict[str, Any]:
    import trio

    streams = {
        "max_streams": max(200, args.streams * 2),
        "lane_interval_ms": args.lane_interval_ms,
    }
    sections = {"streams": streams, "server": server}
    proc, url = start_chatd(config, tmp, sections)
    try:
        print(
            f"chatd at {url} ({variant_header(label, server)}): {args.streams} replies x {args.rate:g} "
            f"tokens/s, {args.viewers} viewers each, {args.seconds:g}s measured...",
            flush=True,
        )
        cpu0, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
        r = trio.run(_drive, url, args)
        r["server_cpu"] = (tree_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        proc.terminate()
        proc.wait(30)
    return r
