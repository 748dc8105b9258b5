"""``chatd bench idle``: what a served chatd costs while nothing happens."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from chatd.bench.common import cpu_seconds, machine, rss_mb, start_chatd
from chatd.config import Config


def add_parser(sub: Any) -> None:
    s = sub.add_parser("idle", help="chatd's CPU while idle, with K subscribed clients")
    s.add_argument("--clients", type=int, default=100, help="connected, subscribed clients")
    s.add_argument("--subs", type=int, default=10, help="further subscriptions per client")
    s.add_argument("--seconds", type=float, default=10.0, help="how long to measure")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


async def _idle(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    import trio
    from trio_websocket import open_websocket_url

    more = trio.Event()

    async def client(i: int, ready: trio.Event, subscribed: trio.Event, done: trio.Event) -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message(orjson.dumps({"op": "hello", "user": f"idle{i}"}).decode())
            await ws.send_message(orjson.dumps({"op": "subscribe", "conv": f"idle-{i}"}).decode())
            await ws.get_message()  # welcome
            await ws.get_message()  # snapshot
            ready.set()
            await more.wait()
            for k in range(args.subs):
                frame = {"op": "subscribe", "conv": f"idle-{i}-{k}"}
                await ws.send_message(orjson.dumps(frame).decode())
            for _ in range(args.subs):
                await ws.get_message()
            subscribed.set()
            await done.wait()

    done = trio.Event()
    await trio.sleep(1.0)
    rss0 = rss_mb(pid)
    async with trio.open_nursery() as nursery:
        subscribed = []
        for i in range(args.clients):
            ready, sub = trio.Event(), trio.Event()
            subscribed.append(sub)
            nursery.start_soon(client, i, ready, sub, done)
            await ready.wait()
        await trio.sleep(1.0)  # let the subscriptions settle
        rss1 = rss_mb(pid)
        cpu0, t0 = cpu_seconds(pid), trio.current_time()
        await trio.sleep(args.seconds)
        server = (cpu_seconds(pid) - cpu0) / (trio.current_time() - t0)
        more.set()
        for sub in subscribed:
            await sub.wait()
        await trio.sleep(1.0)
        rss2 = rss_mb(pid)
        scrape = await _scrape_ms(url)
        done.set()
    subs = args.clients * args.subs
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "server_cpu": server,
        "rss_start_mb": rss0,
        "rss_connected_mb": rss1,
        "rss_subscribed_mb": rss2,
        "kb_per_connection": (rss1 - rss0) * 1024 / args.clients,
        "kb_per_subscription": (rss2 - rss1) * 1024 / subs if subs else float("nan"),
        "metrics_scrape_ms": scrape,
    }


async def _scrape_ms(url: str, n: int = 20) -> dict[str, float]:
    """GET /metrics ``n`` times, one after another: the server's cost of a scrape."""
    import httpx
    import trio

    times = []
    async with httpx.AsyncClient(base_url=url.replace("ws://", "http://").rstrip("/")) as http:
        for _ in range(n):
            t0 = trio.current_time()
            r = await http.get("/metrics")
            times.append((trio.current_time() - t0) * 1000)
            r.raise_for_status()
            await trio.sleep(0.05)  # within the default request budget (20/s)
    times.sort()
    return {"p50": times[n // 2], "max": times[-1], "bytes": len(r.content)}


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    proc, url = start_chatd(config, tmp)
    try:
        print(
            f"chatd at {url}: {args.clients} clients subscribed to their own "
            f"conversations, idle for {args.seconds:g}s...",
            flush=True,
        )
        results.update(trio.run(_idle, url, args, proc.pid))
    finally:
        proc.terminate()
        proc.wait(15)
    print()
    print(f"{'idle chatd CPU (% of one core)':<34}{results['server_cpu'] * 100:>8.2f}%")
    print(f"{'RSS: started / connected / +subs':<34}", end="")
    print(f"{results['rss_start_mb']:.0f} / {results['rss_connected_mb']:.0f} / ", end="")
    print(f"{results['rss_subscribed_mb']:.0f} MiB")
    print(f"{'memory per connection (1 sub)':<34}{results['kb_per_connection']:>8.1f} KiB")
    print(f"{'memory per further subscription':<34}{results['kb_per_subscription']:>8.1f} KiB")
    m = results["metrics_scrape_ms"]
    print(
        f"{'GET /metrics (p50 / max of 20)':<34}{m['p50']:>8.1f} / {m['max']:.1f} ms, "
        f"{m['bytes']} bytes"
    )
    return results
