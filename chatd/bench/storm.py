"""``chatd bench storm``: K clients x S subscriptions to fresh conversations at once.

The morning after a deploy: every client reconnects and resubscribes to all
its conversations together. One ``chatd serve`` with the benchmarks' config
(no per-client limits, so the storm is not throttled at the door). A
bystander pings every 20 ms and sends every 50 ms on connections of its own,
before, during and after the storm; the storm's clients run in a process of
their own (their CPU must not show up as the bystander's latency).

Reported: time until every subscribe is answered, answers by kind (snapshot,
``unavailable``, other), the bystander's ping and ack p50/p99 before, during
and in the 5 s after the storm, and the server's resident memory at rest and
at its peak. ``--server-path DIR`` runs the server from another checkout of
chatd (put first on its ``PYTHONPATH``), so a change can be measured against
the code before it in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from chatd.bench.common import machine, pct, rss_mb, start_chatd
from chatd.config import Config

#: Quiet seconds measured before the storm, and after it ends.
_BEFORE, _AFTER = 3.0, 5.0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("storm", help="many clients subscribing to many conversations at once")
    s.add_argument("--clients", type=int, default=500, help="connections in the storm")
    s.add_argument("--subs", type=int, default=100, help="fresh conversations per connection")
    s.add_argument(
        "--server-path",
        action="append",
        default=[],
        metavar="DIR",
        help="also run the storm against chatd from this checkout (repeatable)",
    )
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


# -- the storm (a process of its own) -------------------------------------------


async def storm_clients(url: str, clients: int, subs: int, tag: str) -> dict[str, Any]:
    import trio
    from trio_websocket import open_websocket_url

    kinds: dict[str, int] = {}
    failed = 0
    t0 = time.monotonic()
    last = [t0]

    async def one(k: int) -> None:
        nonlocal failed
        try:
            async with open_websocket_url(url, message_queue_size=subs + 8) as ws:
                await ws.send_message(orjson.dumps({"op": "hello", "user": f"storm{k}"}).decode())
                await ws.get_message()
                frames = [
                    orjson.dumps({"op": "subscribe", "conv": f"{tag}-{k}-{i}", "ref": i}).decode()
                    for i in range(subs)
                ]
                for frame in frames:
                    await ws.send_message(frame)
                answered = 0
                with trio.fail_after(300):
                    while answered < subs:
                        f = orjson.loads(await ws.get_message())
                        if "ref" not in f:
                            continue
                        answered += 1
                        kind = f["type"] if f["type"] != "error" else f"error {f.get('code')}"
                        kinds[kind] = kinds.get(kind, 0) + 1
                last[0] = max(last[0], time.monotonic())
        except Exception:
            failed += 1

    async with trio.open_nursery() as nursery:
        for k in range(clients):
            nursery.start_soon(one, k)
    return {"answered_s": last[0] - t0, "kinds": kinds, "clients_failed": failed}


# -- the bystander and the server's memory ----------------------------------------


async def _bystand(url: str, pid: int, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    import trio
    from trio_websocket import open_websocket_url

    pings: list[tuple[float, float]] = []
    acks: list[tuple[float, float]] = []
    refused: list[str] = []
    rss: list[float] = []
    done = trio.Event()
    storm: dict[str, Any] = {}

    async def pinger() -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message('{"op":"hello","user":"bystander"}')
            await ws.get_message()
            while not done.is_set():
                t0 = time.monotonic()
                await ws.send_message('{"op":"ping"}')
                with trio.fail_after(60):
                    await ws.get_message()
                pings.append((t0, time.monotonic() - t0))
                await trio.sleep(0.02)

    async def sender() -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message('{"op":"hello","user":"bystander"}')
            await ws.get_message()
            n = 0
            while not done.is_set():
                t0 = time.monotonic()
                frame = {"op": "send", "conv": f"{tag}-bystander", "id": f"b{n}", "text": "hi"}
                await ws.send_message(orjson.dumps(frame).decode())
                with trio.fail_after(60):
                    answer = orjson.loads(await ws.get_message())
                if answer.get("type") == "ack":
                    acks.append((t0, time.monotonic() - t0))
                else:
                    refused.append(str(answer.get("code")))
                n += 1
                await trio.sleep(0.05)

    async def memory() -> None:
        while not done.is_set():
            rss.append(rss_mb(pid))
            await trio.sleep(0.1)

    async def the_storm() -> None:
        cmd = [
            sys.executable,
            "-m",
            "chatd.bench.storm_process",
            url,
            str(args.clients),
            str(args.subs),
            tag,
        ]
        await trio.sleep(_BEFORE)
        storm["start"] = time.monotonic()
        proc = await trio.run_process(cmd, capture_stdout=True, check=True)
        storm["end"] = time.monotonic()
        storm.update(orjson.loads(proc.stdout))
        await trio.sleep(_AFTER)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger)
        nursery.start_soon(sender)
        nursery.start_soon(memory)
        nursery.start_soon(the_storm)

    start, end = storm["start"], storm["end"]

    def window(samples: list[tuple[float, float]], lo: float, hi: float) -> list[float]:
        return [v for t, v in samples if lo <= t < hi]

    out: dict[str, Any] = {
        "storm_s": end - start,
        "answered_s": storm["answered_s"],
        "kinds": storm["kinds"],
        "clients_failed": storm["clients_failed"],
        "bystander_refused": len(refused),
        "rss_rest_mb": rss[0] if rss else float("nan"),
        "rss_peak_mb": max(rss, default=float("nan")),
    }
    # Back to normal: from the storm's end, the first second from which on
    # every second's ack p99 is within twice the quiet p99 (at least 50 ms).
    normal = max(0.05, 2 * pct(window(acks, start - _BEFORE, start), 0.99))
    per_second = [pct(window(acks, end + k, end + k + 1), 0.99) for k in range(int(_AFTER))]
    out["ack_p99_ms_each_second_after"] = [v * 1000 for v in per_second]
    late = [k + 1 for k, v in enumerate(per_second) if v > normal]
    out["back_to_normal_s"] = max(late, default=0) if len(late) < len(per_second) else None
    for name, lo, hi in (
        ("before", start - _BEFORE, start),
        ("during", start, end),
        ("after", end, end + _AFTER),
    ):
        for what, samples in (("ping", pings), ("ack", acks)):
            vals = window(samples, lo, hi)
            out[f"{what}_{name}_p50_ms"] = pct(vals, 0.5) * 1000
            out[f"{what}_{name}_p99_ms"] = pct(vals, 0.99) * 1000
    return out


def _one_server(
    config: Config, tmp: Path, args: argparse.Namespace, label: str, path: str | None
) -> dict[str, Any]:
    import trio

    env = None
    if path:
        env = {"PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
    # Room for the storm at the door: it is the joins that are measured.
    sections = {"limits": {"connections_per_address": 100_000, "max_connections": 100_000}}
    sections["server"] = {"max_subscriptions": max(100, args.subs)}
    proc, url = start_chatd(config, tmp, sections, env=env)
    try:
        print(f"{label}: {args.clients} clients x {args.subs} subscriptions...", flush=True)
        tag = f"storm-{time.time_ns():x}"
        return {"server": label} | trio.run(_bystand, url, proc.pid, args, tag)
    finally:
        proc.terminate()
        proc.wait(30)


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    servers: list[tuple[str, str | None]] = [("this chatd", None)]
    servers += [(f"chatd from {p}", p) for p in args.server_path]
    results["runs"] = [_one_server(config, tmp, args, label, p) for label, p in servers]
    _print(results["runs"])
    return results


def _print(runs: list[dict[str, Any]]) -> None:
    print()
    print(
        f"{'server':<34}{'answered':>9}{'snapshots':>10}{'unavail':>8}{'other':>6}{'RSS MB rest/peak':>18}"
    )
    for r in runs:
        kinds = dict(r["kinds"])
        snaps = kinds.pop("snapshot", 0)
        unavailable = kinds.pop("error unavailable", 0)
        other = sum(kinds.values()) + r["clients_failed"]
        print(
            f"{r['server'][:33]:<34}{r['answered_s']:>8.1f}s{snaps:>10}{unavailable:>8}{other:>6}"
            f"{r['rss_rest_mb']:>9.0f}/{r['rss_peak_mb']:<8.0f}"
        )
    print()
    print(f"{'bystander p50/p99 ms':<34}{'before':>16}{'during':>16}{'5 s after':>16}")
    for r in runs:
        for what in ("ping", "ack"):
            cells = [
                f"{r[f'{what}_{w}_p50_ms']:.0f}/{r[f'{what}_{w}_p99_ms']:.0f}"
                for w in ("before", "during", "after")
            ]
            label = f"{r['server'][:26]} {what}"
            print(f"{label:<34}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}")
    print()
    for r in runs:
        after = " ".join(f"{v:.0f}" for v in r["ack_p99_ms_each_second_after"])
        back = r["back_to_normal_s"]
        when = "not within 5 s" if back is None else f"{back} s after the storm"
        print(f"{r['server'][:33]:<34}ack p99 per second after: {after} ms; normal again {when}")
    print(
        "\nanswered: from the storm's start until its last subscribe was answered (connects included)"
    )
