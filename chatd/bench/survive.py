"""``chatd bench survive``: what a reply loses when its process dies, and what keeping it costs.

For each persistence mode (``transient``, and checkpoints every N ms):

* **loss**: two ``chatd serve`` processes, A and B, share Postgres and Redis.
  ``--replies`` replies generate on A, each watched by a client on B; at a
  random point A is SIGKILLed (in the second pass Redis is also flushed at
  that moment: a Redis restart without persistence, so only Postgres knows
  anything). B takes the replies over when A's lease lapses. Per reply:
  characters the watcher had seen that the committed message lacks (exact),
  tokens made before the kill that it lacks (every token carries the
  CLOCK_MONOTONIC time the model made it, at a steady rate, so the count
  made before the kill follows from the last one kept), and the time from the
  kill until the watcher saw the reply end.
* **cost**: ``--cost-replies`` replies on one process for ``--cost-seconds``:
  checkpoint writes per second (chatd's own count: one statement each), WAL
  bytes per second (exact), chatd and Postgres CPU per 1,000 tokens, and
  token delivery latency (model -> screen). Postgres's transaction and row
  counters are kept in the JSON, but they are flushed by backends lazily
  (up to seconds late), so they blur short windows.

Raw limits measured in the same run: plain asyncpg commits/s (the checkpoint
writes are reported as a share of it) and the Redis PUBLISH rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatd.bench.common import (
    cpu_seconds,
    machine,
    pct,
    raw_pg_commits,
    raw_redis_publish,
    start_chatd,
)
from chatd.bench.survive_report import plot, print_table
from chatd.config import Config
from chatd.embedded.processes import children

_STAMP = re.compile(r"@(\d+\.\d{6})(?= |$)")


def add_parser(sub: Any) -> None:
    s = sub.add_parser("survive", help="reply loss when its process is killed, and its cost")
    s.add_argument(
        "--modes",
        default="transient,50,200,1000",
        help="comma-separated: 'transient' and/or checkpoint intervals in ms",
    )
    s.add_argument("--kills", type=int, default=5, help="kills of A per mode and Redis case")
    s.add_argument("--replies", type=int, default=10, help="replies on A at each kill")
    s.add_argument("--rate", type=float, default=20.0, help="tokens per second per reply")
    s.add_argument("--lease", type=float, default=5.0, help="[streams].lease for both processes")
    s.add_argument(
        "--takeover-interval",
        type=float,
        default=1.0,
        help="[streams].takeover_interval for both processes",
    )
    cases = "redis_intact (Redis keeps the partial) and/or redis_lost (flushed at the kill)"
    s.add_argument("--cases", default="redis_intact,redis_lost", help=cases)
    s.add_argument("--kill-after", default="1.5,5", help="kill A at a uniform time in MIN,MAX s")
    s.add_argument("--cost-replies", type=int, default=20, help="replies in the cost phase")
    s.add_argument("--cost-seconds", type=float, default=15.0, help="measured cost window")
    s.add_argument("--seed", type=int, default=None, help="kill times (default: random)")
    s.add_argument("--plot", metavar="PNG", help="plot loss against cost (needs matplotlib)")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


@dataclass
class _Watch:
    """One reply, seen from a client on B."""

    conv: str
    ready: bool = False
    stream: str = ""
    text: str = ""
    first_stamp: float | None = None
    end: dict[str, Any] | None = None
    end_at: float = 0.0
    message: dict[str, Any] | None = None
    latencies: list[float] = field(default_factory=list)


async def _watch(url: str, w: _Watch, measuring: list[bool] | None = None) -> None:
    from trio_websocket import open_websocket_url

    async with open_websocket_url(url, message_queue_size=10_000) as ws:
        await ws.send_message(json.dumps({"op": "hello", "user": "watcher"}))
        await ws.send_message(json.dumps({"op": "subscribe", "conv": w.conv}))
        while True:
            f = json.loads(await ws.get_message())
            kind = f.get("type")
            now = time.monotonic()
            if kind == "snapshot":
                w.ready = True
            elif kind == "delta":
                w.stream = f["stream"]
                w.text += f["text"]
                if w.first_stamp is None:
                    m = _STAMP.search(w.text)
                    w.first_stamp = float(m.group(1)) if m else None
                if measuring and measuring[0]:
                    w.latencies += [now - float(s) for s in _STAMP.findall(f["text"])]
            elif kind in ("stream.end", "stream.error"):
                w.end, w.end_at = f, now
            elif kind == "message" and f.get("role") == "assistant":
                w.message = f


async def _ask(url: str, conv: str, tokens: int, rate: float, delay: float) -> None:
    import trio
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    await trio.sleep(delay)
    try:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "user": "asker"}))
            text = f"#clock #tokens={tokens} #rate={rate}"
            frame = {"op": "send", "conv": conv, "id": "q", "reply": True, "text": text}
            await ws.send_message(json.dumps(frame))
            await trio.sleep_forever()  # until the kill closes it, or the cycle ends
    except (ConnectionClosed, HandshakeError, OSError):
        return  # A was killed: that is the point


async def _until(predicate: Any, within: float) -> bool:
    """Poll the watchers' state (a load generator, not the server: polling is fine)."""
    import trio

    with trio.move_on_after(within):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)
        return True
    return False


def _flushall(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()


async def _kill_cycle(
    a: Any, a_url: str, b_url: str, args: argparse.Namespace, redis_url: str | None, at: float
) -> list[dict[str, Any]]:
    """Replies on A, watchers on B; SIGKILL A ``at`` seconds in; one sample per reply."""
    import trio

    run = f"{time.time_ns():x}"
    watches = [_Watch(f"survive-{run}-{i}") for i in range(args.replies)]
    tokens = int(args.rate * 600)  # never finishes on its own within a cycle
    bound = args.lease + args.takeover_interval + 15.0
    async with trio.open_nursery() as nursery:
        for w in watches:
            nursery.start_soon(_watch, b_url, w)
        if not await _until(lambda: all(w.ready for w in watches), 30):
            raise SystemExit("watchers on B did not get their snapshots within 30s")
        for w in watches:  # staggered, so kills land at every phase of a checkpoint
            nursery.start_soon(_ask, a_url, w.conv, tokens, args.rate, random.uniform(0, 0.5))
        if not await _until(lambda: all(w.text for w in watches), 30):
            raise SystemExit("replies on A did not start within 30s")
        await trio.sleep(at)
        killed_at = time.monotonic()
        os.kill(a.pid, signal.SIGKILL)
        if redis_url:
            await trio.to_thread.run_sync(_flushall, redis_url)
        await _until(lambda: all(_over(w) for w in watches), bound)
        nursery.cancel_scope.cancel()
    return [_sample(w, killed_at, args.rate) for w in watches]


def _over(w: _Watch) -> bool:
    """Ended, and its message is here (unless it ended with nothing stored)."""
    return w.end is not None and (w.message is not None or w.end["type"] == "stream.error")


def _sample(w: _Watch, killed_at: float, rate: float) -> dict[str, Any]:
    kept = w.message["text"] if w.message else None
    if kept is None and w.end is not None and w.end["type"] == "stream.error":
        kept = ""  # the taker knew nothing of it: ended, nothing stored
    out: dict[str, Any] = {"conv": w.conv, "seen_chars": len(w.text), "ended": w.end is not None}
    if w.end is not None:
        out["status"] = w.end.get("status", w.end.get("code"))
        out["kill_to_end_s"] = w.end_at - killed_at
    if kept is None:
        return out
    out["kept_chars"] = len(kept)
    out["consistent"] = kept.startswith(w.text) or w.text.startswith(kept)
    out["lost_seen_chars"] = max(0, len(w.text) - len(kept))
    stamps = _STAMP.findall(kept)
    if stamps:
        # Tokens come at a steady rate: those made after the last kept one and
        # before the kill are lost (whether or not anyone saw them).
        out["lost_tokens"] = int((killed_at - float(stamps[-1])) * rate)
    elif w.first_stamp is not None:
        out["lost_tokens"] = int((killed_at - w.first_stamp) * rate) + 1
    return out


def _summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [s for s in samples if "kept_chars" in s]
    ends = [s["kill_to_end_s"] for s in samples if "kill_to_end_s" in s]
    chars = [s["lost_seen_chars"] for s in kept]
    toks = [s["lost_tokens"] for s in kept if "lost_tokens" in s]
    return {
        "samples": len(samples),
        "not_ended": sum(1 for s in samples if not s["ended"]),
        "not_committed": len(samples) - len(kept),
        "inconsistent": sum(1 for s in kept if not s["consistent"]),
        "statuses": sorted({s.get("status", "none") for s in samples}),
        "lost_chars_p50": pct(chars, 0.5),
        "lost_chars_max": max(chars, default=float("nan")),
        "lost_tokens_p50": pct(toks, 0.5),
        "lost_tokens_max": max(toks, default=float("nan")),
        "kill_to_end_p50_s": pct(ends, 0.5),
        "kill_to_end_p99_s": pct(ends, 0.99),
    }


# -- cost ----------------------------------------------------------------------


async def _pg_counters(dsn: str) -> dict[str, int]:
    import asyncpg

    con = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await con.fetchrow(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted AS rows, "
            "pg_current_wal_lsn()::text AS lsn FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        hi, lo = row["lsn"].split("/")
        return {
            "xacts": row["xact_commit"],
            "rows": row["rows"],
            "wal": int(hi, 16) << 32 | int(lo, 16),
        }
    finally:
        await con.close()


def _pg_cpu(config: Config) -> dict[int, float] | None:
    """CPU seconds of the embedded postmaster and its backends (None if Postgres is not ours)."""
    pidfile = Path(config.embedded.data_dir) / "pg" / "postmaster.pid"
    try:
        postmaster = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    out = {}
    for pid in [postmaster, *children(postmaster)]:
        try:
            out[pid] = cpu_seconds(pid)
        except OSError:
            continue
    return out


#: The user the bench asks chatd's ``status`` op as (an anonymous operator).
_OPS = "survive-ops"


@dataclass
class _Reading:
    """Counters at one instant: Postgres (transactions, rows written, WAL), chatd's
    checkpoint writes, CPU seconds."""

    at: float
    pg: dict[str, int]
    pg_cpu: dict[int, float] | None
    chatd_cpu: float


async def _checkpoints(url: str) -> int:
    """chatd's count of checkpoint writes (one statement each), from its ``status`` op."""
    from trio_websocket import open_websocket_url

    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"op": "hello", "user": _OPS}))
        await ws.send_message(json.dumps({"op": "status", "ref": "s"}))
        while True:
            f = json.loads(await ws.get_message())
            if f.get("ref") == "s":
                if f.get("type") != "status":
                    raise SystemExit(f"chatd refused the status op: {f}")
                return int(f["checkpoints"])


async def _read(config: Config, url: str, pid: int) -> _Reading:
    import trio

    dsn = config.postgres.dsn
    pg = await trio.to_thread.run_sync(lambda: asyncio.run(_pg_counters(dsn)))
    pg["checkpoints"] = await _checkpoints(url)
    return _Reading(time.monotonic(), pg, _pg_cpu(config), cpu_seconds(pid))


def _rates(a: _Reading, b: _Reading) -> dict[str, float | None]:
    """Per second between two readings."""
    span = b.at - a.at
    pg_cpu = None
    if a.pg_cpu is not None and b.pg_cpu is not None:
        pg_cpu = sum(v - a.pg_cpu.get(p, 0.0) for p, v in b.pg_cpu.items()) / span
    out: dict[str, float | None] = {k: (b.pg[k] - a.pg[k]) / span for k in a.pg}
    return out | {"pg_cpu": pg_cpu, "chatd_cpu": (b.chatd_cpu - a.chatd_cpu) / span}


async def _cost_drive(
    url: str, config: Config, args: argparse.Namespace, pid: int
) -> dict[str, Any]:
    """Counters while idle (leases, relay polls), then while replies generate.

    Reported: the generating rates minus the idle ones, so per-token figures are
    what the tokens cost and not what the process costs anyway.
    """
    import trio

    warmup, idle_span = 2.0, 3.0
    # They end soon after the window (and are awaited), so the kills that follow
    # run on a quiet process.
    tokens = int(args.rate * (args.cost_seconds + warmup + 1.5))
    watches = [_Watch(f"survive-cost-{time.time_ns():x}-{i}") for i in range(args.cost_replies)]
    measuring = [False]
    async with trio.open_nursery() as nursery:
        for w in watches:
            nursery.start_soon(_watch, url, w, measuring)
        if not await _until(lambda: all(w.ready for w in watches), 30):
            raise SystemExit("cost watchers did not get their snapshots within 30s")
        r0 = await _read(config, url, pid)
        await trio.sleep(idle_span)
        idle = _rates(r0, await _read(config, url, pid))
        for w in watches:
            nursery.start_soon(_ask, url, w.conv, tokens, args.rate, random.uniform(0, 0.5))
        await trio.sleep(warmup)
        r2 = await _read(config, url, pid)
        measuring[0] = True
        await trio.sleep(args.cost_seconds)
        measuring[0] = False
        busy = _rates(r2, await _read(config, url, pid))
        if not await _until(lambda: all(w.end for w in watches), 30):
            raise SystemExit("cost-phase replies did not end within 30s")
        nursery.cancel_scope.cancel()
    latencies = [x for w in watches for x in w.latencies]
    rate = len(latencies) / args.cost_seconds

    def _above_idle(key: str) -> float | None:
        b, i = busy[key], idle[key]
        return None if b is None or i is None else b - i

    def _per_1k_tokens(key: str) -> float | None:
        v = _above_idle(key)
        return None if v is None or not rate else v * 1000 / rate * 1000  # ms

    return {
        "tokens": len(latencies),
        "tokens_per_s": rate,
        "idle": idle,
        "busy": busy,
        "checkpoint_writes_per_s": busy["checkpoints"],
        "pg_xacts_per_s": _above_idle("xacts"),
        "pg_rows_per_s": _above_idle("rows"),
        "pg_wal_bytes_per_s": _above_idle("wal"),
        "chatd_cpu_ms_per_1k_tokens": _per_1k_tokens("chatd_cpu"),
        "pg_cpu_ms_per_1k_tokens": _per_1k_tokens("pg_cpu"),
        "delivery_p50_ms": pct(latencies, 0.5) * 1000,
        "delivery_p99_ms": pct(latencies, 0.99) * 1000,
    }


# -- the run ---------------------------------------------------------------------


def _modes(spec: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "transient":
            out.append(("transient", {"persistence": "transient"}))
        else:
            ms = float(item)
            section = {"persistence": "checkpoint", "checkpoint_interval_ms": ms}
            out.append((f"checkpoint {ms:g} ms", section))
    return out


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    lo, hi = (float(x) for x in args.kill_after.split(","))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - {"redis_intact", "redis_lost"}:
        raise SystemExit(f"--cases: expected redis_intact and/or redis_lost, got {args.cases!r}")
    rng = random.Random(args.seed)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    print("measuring raw limits (plain asyncio asyncpg commits, Redis PUBLISH)...", flush=True)
    results["raw_pg_commits_per_s"] = asyncio.run(raw_pg_commits(config.postgres.dsn, 3.0))
    results["raw_redis_publish_per_s"] = asyncio.run(raw_redis_publish(config.redis.url, 2.0))
    modes = []
    for name, streams in _modes(args.modes):
        streams |= {"lease": args.lease, "takeover_interval": args.takeover_interval}
        streams |= {"max_streams": max(200, args.cost_replies * 2, args.replies * 2)}
        sections = {"streams": streams, "auth": {"anonymous_operators": [_OPS]}}
        b, b_url = start_chatd(config, tmp, sections)
        try:
            print(
                f"{name}: cost, {args.cost_replies} replies for {args.cost_seconds:g}s", flush=True
            )
            mode: dict[str, Any] = {"mode": name, "streams": streams}
            mode["cost"] = trio.run(_cost_drive, b_url, config, args, b.pid)
            for case in cases:
                redis_url = config.redis.url if case == "redis_lost" else None
                samples: list[dict[str, Any]] = []
                for k in range(args.kills):
                    print(f"{name}: {case} kill {k + 1}/{args.kills}", flush=True)
                    a, a_url = start_chatd(config, tmp, sections)
                    try:
                        at = rng.uniform(lo, hi)
                        samples += trio.run(_kill_cycle, a, a_url, b_url, args, redis_url, at)
                    finally:
                        a.kill()
                        a.wait(15)
                mode[case] = _summarize(samples) | {"raw": samples}
            modes.append(mode)
        finally:
            b.terminate()
            b.wait(30)
    results["modes"] = modes
    print_table(results)
    if args.plot:
        plot(results, args.plot)
    return results
