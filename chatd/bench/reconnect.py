"""``chatd bench reconnect``: a storm of K clients reconnecting at once with cursors.

K clients subscribe (K/per_conv conversations), read the tail, record their
cursor and disconnect. While they are away M messages are committed per
conversation and a reply starts streaming in some conversations. Then all K
reconnect at once, each subscribing with ``after`` = its cursor (and the
stream offsets it had); more messages arrive during the storm. A client is
caught up when it holds every message up to the final head. Reported: time
until all are caught up, per-client p50/p99, when the clients connected and
got their snapshots, and the gaps and duplicates found (both must be zero),
including stream text that repeats or skips.

The storm's clients use the lean client of :mod:`chatd.bench.wire` (a full
WebSocket library on the load generator took as much CPU as chatd). The raw
limit, measured in the same run: the same clients against a bare
trio-websocket server (:mod:`chatd.bench.bare_ws`) that answers each
subscribe with a snapshot of the same size and does nothing else.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from chatd.bench.common import (
    add_variant_options,
    cpu_seconds,
    file_variants,
    machine,
    pct,
    start_chatd,
    tree_cpu_seconds,
    variant_header,
    variants,
)
from chatd.bench.wire import WireClient
from chatd.config import Config


def add_parser(sub: Any) -> None:
    s = sub.add_parser("reconnect", help="K clients reconnecting at once: time to catch up, gaps")
    s.add_argument("--clients", type=int, default=1000)
    s.add_argument("--per-conv", type=int, default=10, help="clients per conversation")
    s.add_argument("--missed", type=int, default=20, help="messages per conversation while away")
    s.add_argument("--streams", type=int, default=10, help="conversations with a reply streaming")
    add_variant_options(s)
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


class _Client:
    def __init__(self, conv: str) -> None:
        self.conv = conv
        self.seqs: list[int] = []
        self.texts: dict[str, str] = {}
        self.problems: list[str] = []
        self.caught_up_at: float | None = None
        self.snapshot_at: float | None = None
        self.open_at: float | None = None

    def take(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "snapshot":
            for m in msg["messages"]:
                self._seq(m["seq"])
            for s in msg.get("streams", []):
                have = self.texts.get(s["stream"], "")
                if s["offset"] != len(have):
                    self.problems.append(f"snapshot offset {s['offset']} != {len(have)}")
                self.texts[s["stream"]] = have[: s["offset"]] + s["text"]
        elif kind == "message":
            self._seq(msg["seq"])
        elif kind == "delta":
            have = self.texts.get(msg["stream"], "")
            if msg["offset"] != len(have):
                self.problems.append(f"delta at {msg['offset']}, text had {len(have)}")
            self.texts[msg["stream"]] = have + msg["text"]

    def _seq(self, seq: int) -> None:
        if self.seqs and seq != self.seqs[-1] + 1:
            self.problems.append(f"seq {seq} after {self.seqs[-1]}")
        self.seqs.append(seq)


async def _drive(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    import trio
    from trio_websocket import open_websocket_url

    run = f"{time.time_ns() % 10**10:x}"
    n_convs = max(1, args.clients // args.per_conv)
    convs = [f"rc-{run}-{i}" for i in range(n_convs)]
    clients = [_Client(convs[i % n_convs]) for i in range(args.clients)]
    heads: dict[str, int] = {}

    async def send(ws: Any, conv: str, mid: str, reply: bool = False) -> None:
        frame = {"op": "send", "conv": conv, "id": mid, "text": "storm", "ref": mid}
        if reply:
            frame["reply"] = True
            frame["text"] = "#tokens=400 #rate=40"
        await ws.send_message(json.dumps(frame))
        while True:
            msg = json.loads(await ws.get_message())
            if msg.get("ref") == mid:
                assert msg["type"] == "ack", msg
                heads[conv] = max(heads.get(conv, 0), msg["seq"])
                return

    async def send_all(ws: Any, sends: list[tuple[str, str]]) -> None:
        refs = {}
        for conv, mid in sends:
            ref = f"{conv}/{mid}"
            refs[ref] = conv
            frame = {"op": "send", "conv": conv, "id": mid, "text": "storm", "ref": ref}
            await ws.send_message(json.dumps(frame))
        while refs:
            msg = json.loads(await ws.get_message())
            conv = refs.pop(msg.get("ref"), None)
            if conv is not None:
                assert msg["type"] == "ack", msg
                heads[conv] = max(heads.get(conv, 0), msg["seq"])

    async def session(
        c: _Client,
        after: int | None,
        offsets: dict[str, int],
        ready: trio.Event | None,
        stop: trio.Event,
        t0: float,
    ) -> None:
        ws = await WireClient.connect(url)
        try:
            c.open_at = time.monotonic() - t0
            frame: dict[str, Any] = {"op": "subscribe", "conv": c.conv}
            if after is not None:
                frame["after"] = after
            if offsets:
                frame["streams"] = offsets
            await ws.send(
                [json.dumps({"op": "hello", "user": "storm"}).encode(), json.dumps(frame).encode()]
            )
            with trio.move_on_after(60):
                while not stop.is_set():
                    with trio.move_on_after(0.2):
                        for raw in await ws.receive():
                            msg = json.loads(raw)
                            c.take(msg)
                            if msg.get("type") == "snapshot":
                                if c.snapshot_at is None:
                                    c.snapshot_at = time.monotonic() - t0
                                if ready is not None:
                                    ready.set()
                    done = target.get(c.conv, 1 << 62)
                    if c.caught_up_at is None and c.seqs and c.seqs[-1] >= done:
                        c.caught_up_at = time.monotonic() - t0
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                await ws.aclose()

    target: dict[str, int] = {}  # the last seq of the storm, per conversation
    async with open_websocket_url(url) as sender:
        await sender.send_message(json.dumps({"op": "hello", "user": "sender"}))
        await sender.get_message()
        for conv in convs:
            await send(sender, conv, "seed")
        # Phase 1: everyone subscribes, reads, leaves.
        stop = trio.Event()
        async with trio.open_nursery() as n:
            readies = []
            for c in clients:
                ready = trio.Event()
                readies.append(ready)
                n.start_soon(session, c, None, {}, ready, stop, time.monotonic())
            for r in readies:
                await r.wait()
            for conv in convs[: args.streams]:
                await send(sender, conv, "ask", reply=True)
            await trio.sleep(1.0)  # the replies stream; clients get some deltas
            stop.set()
        cursors = [c.seqs[-1] if c.seqs else 0 for c in clients]
        offsets = [{s: len(t) for s, t in c.texts.items()} for c in clients]
        # While they are away.
        for conv in convs:
            for k in range(args.missed):
                await send(sender, conv, f"away{k}")
        # Phase 2: the storm. One more message per conversation arrives during it.
        target.update({conv: heads[conv] + 1 for conv in convs})
        for c in clients:
            c.seqs, c.caught_up_at, c.snapshot_at, c.open_at = [], None, None, None
        stop = trio.Event()
        print(f"storm: {len(clients)} clients reconnecting at once...", flush=True)
        t0 = time.monotonic()
        server_cpu0, client_cpu0 = tree_cpu_seconds(pid), time.process_time()
        async with trio.open_nursery() as n:
            for c, cur, off in zip(clients, cursors, offsets, strict=True):
                n.start_soon(session, c, cur, off, None, stop, t0)
            await trio.sleep(0.05)
            # The live tail during the storm, all at once (not each after the previous ack).
            await send_all(sender, [(conv, "during") for conv in convs])
            live_acked = time.monotonic() - t0
            with trio.move_on_after(60):
                while any(c.caught_up_at is None for c in clients):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            all_done = time.monotonic() - t0
            storm_cpu = (tree_cpu_seconds(pid) - server_cpu0, time.process_time() - client_cpu0)
            stop.set()
    times = [c.caught_up_at for c in clients if c.caught_up_at is not None]
    opens = [c.open_at for c in clients if c.open_at is not None]
    snaps = [c.snapshot_at for c in clients if c.snapshot_at is not None]
    problems = [p for c in clients for p in c.problems]
    dups = sum(len(c.seqs) - len(set(c.seqs)) for c in clients)
    expected_first = [cur + 1 for cur in cursors]
    wrong_start = sum(
        1 for c, e in zip(clients, expected_first, strict=True) if c.seqs and c.seqs[0] != e
    )
    return {
        "clients": args.clients,
        "caught_up": len(times),
        "all_caught_up_s": all_done,
        "client_p50_s": pct(times, 0.5),
        "client_p99_s": pct(times, 0.99),
        "open_p50_s": pct(opens, 0.5),
        "open_p99_s": pct(opens, 0.99),
        "snapshot_p50_s": pct(snaps, 0.5),
        "snapshot_p99_s": pct(snaps, 0.99),
        "live_acked_s": live_acked,
        "gaps_or_order_problems": len(problems) + wrong_start,
        "duplicates": dups,
        "problem_examples": problems[:5],
        "storm_server_cpu_s": storm_cpu[0],
        "storm_client_cpu_s": storm_cpu[1],
    }


async def _bare_storm(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """The same storm against the bare server: connect, hello, subscribe, take the snapshot."""
    import trio

    n_convs = max(1, args.clients // args.per_conv)
    answered: list[float] = []

    async def session(conv: str, t0: float) -> None:
        ws = await WireClient.connect(url)
        try:
            hello = json.dumps({"op": "hello", "user": "storm"}).encode()
            await ws.send([hello, json.dumps({"op": "subscribe", "conv": conv}).encode()])
            msgs = await ws.receive()
            assert json.loads(msgs[0])["type"] == "snapshot", msgs
            answered.append(time.monotonic() - t0)
            await done.wait()
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                await ws.aclose()

    done = trio.Event()
    t0 = time.monotonic()
    server_cpu0, client_cpu0 = cpu_seconds(pid), time.process_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i in range(args.clients):
                n.start_soon(session, f"rc-{i % n_convs}", t0)
            while len(answered) < args.clients:  # noqa: ASYNC110
                await trio.sleep(0.01)
            all_done = time.monotonic() - t0
            cpu = (cpu_seconds(pid) - server_cpu0, time.process_time() - client_cpu0)
            done.set()
    return {
        "all_answered_s": all_done,
        "p50_s": pct(answered, 0.5),
        "p99_s": pct(answered, 0.99),
        "server_cpu_s": cpu[0],
        "client_cpu_s": cpu[1],
    }


def _run_bare(args: argparse.Namespace) -> dict[str, Any]:
    import subprocess
    import sys

    import trio

    proc = subprocess.Popen(
        [sys.executable, "-m", "chatd.bench.bare_ws", "--missed", str(args.missed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" at ")[-1].strip()
        return trio.run(_bare_storm, url, args, proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)


def _measure(
    config: Config, args: argparse.Namespace, tmp: Path, server: dict[str, Any]
) -> dict[str, Any]:
    """The storm against one chatd configured with ``server`` (its workers, its bridge)."""
    import trio

    proc, url = start_chatd(config, tmp, {"streams": {"max_streams": 1000}, "server": server})
    try:
        print(
            f"chatd at {url} ({server}): {args.clients} clients, {args.per_conv} per "
            f"conversation, {args.missed} missed messages each, {args.streams} replies "
            "streaming...",
            flush=True,
        )
        cpu0 = tree_cpu_seconds(proc.pid)
        r = trio.run(_drive, url, args, proc.pid)
        r["server_cpu_s"] = tree_cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(15)
    return r


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    measured = {label: _measure(config, args, tmp, server) for label, server in variants(args)}
    print("raw limit: the same storm against a bare trio-websocket server (no chatd)...")
    bare = _run_bare(args)
    for r in measured.values():
        r["ratio_to_bare"] = r["all_caught_up_s"] / bare["all_answered_s"]
    file_variants(results, args, measured)
    results["bare"] = bare
    for label, r in measured.items():
        print()
        if len(measured) > 1:
            print(variant_header(label, {}))
        _print(r)
    print(
        f"\n{'bare server: all answered after':<34}{bare['all_answered_s']:>9.2f}s"
        f"  (p50 {bare['p50_s']:.2f}s; CPU server / bench "
        f"{bare['server_cpu_s']:.2f}s / {bare['client_cpu_s']:.2f}s)"
    )
    return results


def _print(r: dict[str, Any]) -> None:
    print(f"{'clients reconnecting at once':<34}{r['clients']:>10}")
    print(f"{'caught up':<34}{r['caught_up']:>10}")
    print(f"{'all caught up after':<34}{r['all_caught_up_s']:>9.2f}s")
    print(f"{'per client p50 / p99':<34}{r['client_p50_s']:>6.2f}s /{r['client_p99_s']:>5.2f}s")
    print(f"{'connected p50 / p99':<34}{r['open_p50_s']:>6.2f}s /{r['open_p99_s']:>5.2f}s")
    print(f"{'snapshot p50 / p99':<34}{r['snapshot_p50_s']:>6.2f}s /{r['snapshot_p99_s']:>5.2f}s")
    print(f"{'live message sent at 0.05s, acked':<34}{r['live_acked_s']:>9.2f}s")
    print(f"{'gaps / order problems':<34}{r['gaps_or_order_problems']:>10}")
    print(f"{'duplicates':<34}{r['duplicates']:>10}")
    print(
        f"{'CPU during the storm: chatd / bench':<34}"
        f"{r['storm_server_cpu_s']:>6.2f}s /{r['storm_client_cpu_s']:>5.2f}s"
    )
    for p in r["problem_examples"]:
        print(f"  e.g. {p}")
    print(f"{'chatd all caught up / bare':<34}{r['ratio_to_bare']:>9.2f}x")
