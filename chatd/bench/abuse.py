"""``chatd bench abuse``: a bystander's latency while abusers hit each limit.

One chatd with the default limits. A bystander pings every 20 ms and sends a
message every 50 ms on connections of its own, the whole time; phase by
phase, ``--abusers`` connections (one abusive user, one address) do one
thing as hard as they can:

* ``send flood``: pipelined sends (the send rate limit answers ``rate_limited``);
* ``poison``: sends whose text holds U+0000 (refused at the protocol);
* ``reply flood``: sends asking for replies (``too_many_replies``);
* ``history flood``: history pages (the read rate limit);
* ``garbage``: frames that are not JSON;
* ``connection flood``: new connections until refused (per-address limit);
* ``http flood``: HTTP requests on the same port, as fast as each keep-alive
  connection allows (the per-address request budget answers 429);
* ``slow heads``: 500 connections that send half a request head and stall
  (each is closed at ``[http].header_timeout``).

The table gives the bystander's ping and ack p50/p99 per phase beside the
quiet phase, and how many of the abusers' requests were refused.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from chatd.bench.common import machine, pct, start_chatd
from chatd.config import Config

_PHASES = (
    "quiet",
    "send flood",
    "poison",
    "reply flood",
    "history flood",
    "garbage",
    "connection flood",
    "http flood",
    "slow heads",
)


def add_parser(sub: Any) -> None:
    s = sub.add_parser("abuse", help="a bystander's latency while abusers hit each limit")
    s.add_argument("--abusers", type=int, default=16, help="abusive connections")
    s.add_argument("--seconds", type=float, default=5.0, help="duration of each phase")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _abusive_frames(phase: str, k: int, n: int) -> list[bytes]:
    dumps = orjson.dumps
    if phase == "send flood":
        return [
            dumps({"op": "send", "conv": f"abuse-{k}", "id": f"{k}-{n}-{i}", "text": "x"})
            for i in range(32)
        ]
    if phase == "poison":
        return [
            dumps({"op": "send", "conv": f"abuse-{k}", "id": f"p{k}-{n}-{i}", "text": "a\x00b"})
            for i in range(32)
        ]
    if phase == "reply flood":
        return [
            dumps(
                {
                    "op": "send",
                    "conv": f"abuse-{k}",
                    "id": f"r{k}-{n}-{i}",
                    "text": "#tokens=200",
                    "reply": True,
                }
            )
            for i in range(8)
        ]
    if phase == "history flood":
        return [dumps({"op": "history", "conv": "abuse-0", "limit": 500}) for _ in range(32)]
    return [b"{not json" for _ in range(32)]


async def _abuser(url: str, phase: str, k: int, stop: float, counts: dict[str, int]) -> None:
    import trio

    from chatd.bench.wire import WireClient

    ws = await WireClient.connect(url)
    try:
        await ws.send([orjson.dumps({"op": "hello", "user": "mallory"})])
        await ws.receive()
        n = 0
        while trio.current_time() < stop:
            frames = _abusive_frames(phase, k, n)
            await ws.send(frames)
            counts["sent"] += len(frames)
            got = 0
            with trio.move_on_after(1.0):
                while got < len(frames):
                    for f in await ws.receive():
                        msg = orjson.loads(f)
                        if msg.get("type") == "error":
                            counts["refused"] += 1
                            got += 1
                        elif msg.get("type") in ("ack", "history"):
                            got += 1
            n += 1
    finally:
        with trio.move_on_after(1.0, shield=True):
            await ws.aclose()


async def _connection_flood(url: str, stop: float, counts: dict[str, int]) -> None:
    import trio

    from chatd.bench.wire import WireClient, WireError

    held = []
    try:
        while trio.current_time() < stop:
            try:
                held.append(await WireClient.connect(url))
                counts["sent"] += 1
            except (WireError, OSError):
                counts["sent"] += 1
                counts["refused"] += 1
                await trio.sleep(0.01)
    finally:
        with trio.move_on_after(5.0, shield=True):
            for ws in held:
                await ws.aclose()


async def _http_flood(url: str, k: int, stop: float, counts: dict[str, int]) -> None:
    import httpx
    import trio

    base = url.replace("ws://", "http://").rstrip("/")
    path = "/metrics" if k % 2 else "/readyz"
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as http:
        while trio.current_time() < stop:
            try:
                r = await http.get(path)
            except httpx.HTTPError:
                counts["refused"] += 1
                await trio.sleep(0.01)
                continue
            counts["sent"] += 1
            if r.status_code in (429, 503):
                counts["refused"] += 1


async def _slow_heads(url: str, stop: float, counts: dict[str, int]) -> None:
    import trio

    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)

    async def stall() -> None:
        try:
            stream = await trio.open_tcp_stream(host, int(port))
        except OSError:
            counts["refused"] += 1
            return
        counts["sent"] += 1
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the end
            with trio.move_on_at(stop):
                if not await stream.receive_some(1024):
                    counts["refused"] += 1  # closed by the server

    async with trio.open_nursery() as nursery:
        for _ in range(500):
            nursery.start_soon(stall)


async def _bystander(url: str, stop: float) -> dict[str, list[float]]:
    import trio
    from trio_websocket import open_websocket_url

    pings: list[float] = []
    acks: list[float] = []

    async def pinger() -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message('{"op":"hello","user":"bystander"}')
            await ws.get_message()
            while trio.current_time() < stop:
                t0 = time.monotonic()
                await ws.send_message('{"op":"ping"}')
                with trio.fail_after(30):
                    await ws.get_message()
                pings.append(time.monotonic() - t0)
                await trio.sleep(0.02)

    async def sender() -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message('{"op":"hello","user":"bystander"}')
            await ws.get_message()
            n = 0
            while trio.current_time() < stop:
                t0 = time.monotonic()
                frame = {
                    "op": "send",
                    "conv": "bystander",
                    "id": f"b{time.time_ns()}-{n}",
                    "text": "hi",
                }
                await ws.send_message(orjson.dumps(frame).decode())
                with trio.fail_after(30):
                    await ws.get_message()
                acks.append(time.monotonic() - t0)
                n += 1
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger)
        nursery.start_soon(sender)
    return {"pings": pings, "acks": acks}


async def _abuse(url: str, phase: str, seconds: float, abusers: int) -> dict[str, int]:
    """The abusers of one phase (run in a process of their own: see :func:`_phase`)."""
    import trio

    stop = trio.current_time() + seconds
    counts = {"sent": 0, "refused": 0}
    async with trio.open_nursery() as nursery:
        if phase == "connection flood":
            nursery.start_soon(_connection_flood, url, stop, counts)
        elif phase == "slow heads":
            nursery.start_soon(_slow_heads, url, stop, counts)
        elif phase == "http flood":
            for k in range(abusers):
                nursery.start_soon(_http_flood, url, k, stop, counts)
        else:
            for k in range(abusers):
                nursery.start_soon(_abuser, url, phase, k, stop, counts)
    return counts


async def _phase(url: str, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    import trio

    counts = {"sent": 0, "refused": 0}
    # The abusers run in a process of their own: their client-side CPU must not
    # show up as the bystander's latency.
    cmd = [
        sys.executable,
        "-m",
        "chatd.bench.abuse",
        url,
        phase,
        str(args.seconds),
        str(args.abusers),
    ]
    async with trio.open_nursery() as nursery:
        proc = None
        if phase != "quiet":
            proc = await nursery.start(
                partial(trio.run_process, cmd, stdout=subprocess.PIPE, check=True)
            )
        seen = await _bystander(url, trio.current_time() + args.seconds)
        if proc is not None:
            await proc.wait()
            counts = orjson.loads(await proc.stdout.receive_some(65536))
    p, a = seen["pings"], seen["acks"]
    return {
        "ping_p50_ms": pct(p, 0.5) * 1000,
        "ping_p99_ms": pct(p, 0.99) * 1000,
        "ack_p50_ms": pct(a, 0.5) * 1000,
        "ack_p99_ms": pct(a, 0.99) * 1000,
        "pings": len(p),
        "acks": len(a),
        **{f"abuser_{k}": v for k, v in counts.items()},
    }


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    # The default limits: what production runs with (the benchmarks' usual
    # no-limit settings are put back), and a per-address cap the flood reaches.
    limits = {
        "send_rate": 20.0,
        "read_rate": 10.0,
        "frame_rate": 100.0,
        "replies_per_connection": 2,
        "replies_per_user": 4,
        "connections_per_address": 64,
    }
    proc, url = start_chatd(config, tmp, {"limits": limits, "model": {"fake_token_rate": 20.0}})
    phases: dict[str, Any] = {}
    try:
        for phase in _PHASES:
            print(f"{phase}: {args.seconds:g}s...", flush=True)
            phases[phase] = trio.run(_phase, url, phase, args)
    finally:
        proc.terminate()
        proc.wait(15)
    results["phases"] = phases
    print()
    print(
        f"{'phase':18} {'ping p50':>9} {'ping p99':>9} {'ack p50':>9} {'ack p99':>9} {'abuser reqs':>12} {'refused':>8}"
    )
    for name, r in phases.items():
        print(
            f"{name:18} {r['ping_p50_ms']:7.1f}ms {r['ping_p99_ms']:7.1f}ms {r['ack_p50_ms']:7.1f}ms "
            f"{r['ack_p99_ms']:7.1f}ms {r['abuser_sent']:12} {r['abuser_refused']:8}"
        )
    return results


if __name__ == "__main__":
    import trio

    url, phase, seconds, abusers = sys.argv[1:5]
    counts = trio.run(_abuse, url, phase, float(seconds), int(abusers))
    sys.stdout.write(orjson.dumps(counts).decode())
