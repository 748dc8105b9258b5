"""Shared pieces of the benchmarks: machine description, raw limits, chatd as a process."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chatd.config import Config


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def machine() -> str:
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


async def raw_pg_commits(dsn: str, seconds: float, workers: int = 8) -> float:
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


async def raw_redis_publish(url: str, seconds: float) -> float:
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


#: What every benchmark's chatd runs with: a load generator is not a user, so
#: no per-connection limits and deep queues (a benchmark may set them back).
BENCH_CONFIG: dict[str, dict[str, Any]] = {
    "server": {
        "host": "127.0.0.1",
        "port": 0,
        "send_queue_frames": 100000,
        "send_queue_bytes": 268435456,
        "max_inflight_sends": 1024,
    },
    "limits": {
        "send_rate": 0,
        "read_rate": 0,
        "frame_rate": 0,
        "replies_per_connection": 100000,
        "replies_per_user": 100000,
        # Every client of a load generator comes from one address.
        "connections_per_address": 100000,
    },
    "log": {"level": "warning"},
}


def add_variant_options(parser: Any) -> None:
    """``--workers`` and ``--bridge``: the chatd configurations measured in turn."""
    parser.add_argument(
        "--workers",
        default="1",
        help="comma-separated [server].workers to measure in turn, e.g. 1,2",
    )
    parser.add_argument(
        "--bridge",
        default="",
        help="comma-separated [server].asyncio_bridge to measure in turn, e.g. "
        "thread,trio-asyncio (default: chatd's default)",
    )


def variants(args: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, [server] overrides) for each configuration ``--workers`` x ``--bridge`` names.

    Labels: the worker count when only it varies (``by_workers`` in the JSON,
    as before), the bridge when only it varies (``by_bridge``), both otherwise.
    """
    counts = [int(n) for n in str(args.workers).split(",") if n.strip()]
    bridges = [b.strip() for b in str(args.bridge).split(",") if b.strip()] or [""]
    out = []
    for bridge in bridges:
        for n in counts:
            if len(bridges) > 1 and len(counts) > 1:
                label = f"{n}w {bridge}"
            elif len(bridges) > 1:
                label = bridge
            else:
                label = str(n)
            server: dict[str, Any] = {"workers": n}
            if bridge:
                server["asyncio_bridge"] = bridge
            out.append((label, server))
    return out


def file_variants(results: dict[str, Any], args: Any, measured: dict[str, Any]) -> None:
    """Put each configuration's results where :func:`variants` says they go."""
    several_bridges = "," in str(args.bridge).strip(",")
    if len(measured) == 1 and str(args.workers).strip() == "1":
        results.update(next(iter(measured.values())))
    elif not several_bridges:
        results["by_workers"] = measured
    elif "," in str(args.workers).strip(","):
        results["by_variant"] = measured
    else:
        results["by_bridge"] = measured


def variant_header(label: str, server: dict[str, Any]) -> str:
    """A column header: "2 worker(s)", "thread", "2w thread"."""
    return f"{label} worker(s)" if label.isdigit() else label


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(out) + "\n"


def start_chatd(
    config: Config,
    tmp: Path,
    sections: dict[str, dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Run ``chatd serve`` as a child process against the given servers; returns (proc, url).

    ``sections`` are merged over :data:`BENCH_CONFIG`.
    """
    merged = {name: dict(values) for name, values in BENCH_CONFIG.items()}
    for name, values in (sections or {}).items():
        merged.setdefault(name, {}).update(values)
    conf = tmp / "bench.toml"
    conf.write_text(_toml(merged))
    env = {
        **os.environ,
        "CHATD_POSTGRES_DSN": config.postgres.dsn,
        "CHATD_REDIS_URL": config.redis.url,
        **(env or {}),
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


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (NaN if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its direct children (a supervisor and its workers)."""
    from chatd.embedded.processes import children

    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            total += cpu_seconds(p)
        except OSError:
            continue  # it exited meanwhile
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
