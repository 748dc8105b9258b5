"""``chatd bench idle``: what a served chatd costs while nothing happens."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from chatd.bench.common import cpu_seconds, machine, start_chatd
from chatd.config import Config


def add_parser(sub: Any) -> None:
    s = sub.add_parser("idle", help="chatd's CPU while idle, with K subscribed clients")
    s.add_argument("--clients", type=int, default=100, help="connected, subscribed clients")
    s.add_argument("--seconds", type=float, default=10.0, help="how long to measure")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


async def _idle(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    import trio
    from trio_websocket import open_websocket_url

    async def client(i: int, ready: trio.Event, done: trio.Event) -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message(orjson.dumps({"op": "hello", "user": f"idle{i}"}).decode())
            await ws.send_message(orjson.dumps({"op": "subscribe", "conv": f"idle-{i}"}).decode())
            await ws.get_message()  # welcome
            await ws.get_message()  # snapshot
            ready.set()
            await done.wait()

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        for i in range(args.clients):
            ready = trio.Event()
            nursery.start_soon(client, i, ready, done)
            await ready.wait()
        await trio.sleep(1.0)  # let the subscriptions settle
        cpu0, t0 = cpu_seconds(pid), trio.current_time()
        await trio.sleep(args.seconds)
        server = (cpu_seconds(pid) - cpu0) / (trio.current_time() - t0)
        done.set()
    return {"clients": args.clients, "seconds": args.seconds, "server_cpu": server}


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
    return results
