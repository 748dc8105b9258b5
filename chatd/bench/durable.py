"""``chatd bench durable``: Durable Streams, chatd against the reference server.

In one run, against each server in turn — chatd (``chatd serve``, streams in
Postgres) and the Node reference server ``@durable-streams/server`` (from
``conformance/``: file-backed, and in memory) on the same machine — it
measures:

* appends per second, plain and with idempotent producers (``--writers``
  concurrent writers, each on its own stream);
* read-after-append latency for long-poll and SSE readers: a writer appends a
  small timestamped record every ``--interval-ms``, its reader measures from
  the moment the append was sent until the record arrives.

It prints a table with chatd's ratio to the file-backed reference server
(chatd acknowledges an append only once Postgres committed it; the reference
server writes its files without fsync and keeps metadata in LMDB).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from chatd.bench.common import cpu_seconds, machine, pct, start_chatd
from chatd.config import Config

_CONFORMANCE = Path(__file__).resolve().parents[2] / "conformance"
_TEXT = {"Content-Type": "text/plain"}


def add_parser(sub: Any) -> None:
    s = sub.add_parser("durable", help="Durable Streams: chatd against the reference server")
    s.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    s.add_argument("--writers", type=int, default=16, help="concurrent appenders")
    s.add_argument("--pairs", type=int, default=8, help="writer/reader pairs for latency")
    s.add_argument("--interval-ms", type=float, default=20.0, help="between a writer's appends")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


class _Conn:
    """One keep-alive HTTP/1.1 connection, as lean as a load generator must be
    (httpx costs more CPU per request than the servers measured here)."""

    def __init__(
        self, base: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._base = base
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> _Conn:
        host, port = base.removeprefix("http://").split(":")
        return cls(base, *await asyncio.open_connection(host, int(port)))

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        """One request; a server closing the connection (hypercorn ends a keep-alive
        connection after 1,000 requests) costs a new connection, as for real clients."""
        status, got, data = await self._request(method, path, headers, body)
        if got.get("connection", "").lower() == "close":
            self.close()
            host, port = self._base.removeprefix("http://").split(":")
            self._reader, self._writer = await asyncio.open_connection(host, int(port))
        return status, got, data

    async def _request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._writer.write(head.encode() + b"\r\n" + body)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        got = {}
        for line in lines:
            if ":" in line:
                k, v = line.split(":", 1)
                got[k.strip().lower()] = v.strip()
        if got.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
                parts.append(await self._reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(p[:-2] for p in parts)
        else:
            size = int(got.get("content-length", "0"))
            data = await self._reader.readexactly(size) if size else b""
        return int(status_line.split()[1]), got, data

    def close(self) -> None:
        self._writer.close()


async def _appends(base: str, seconds: float, writers: int, producer: bool) -> float:
    tag = f"{'p' if producer else 'a'}{time.monotonic_ns()}"
    conns = [await _Conn.open(base) for _ in range(writers)]
    for w, conn in enumerate(conns):
        await conn.request("PUT", f"/v1/stream/bench-{tag}-{w}", _TEXT)
    count = 0
    stop = time.monotonic() + seconds

    async def writer(w: int) -> None:
        nonlocal count
        seq = 0
        body = b"x" * 100
        path = f"/v1/stream/bench-{tag}-{w}"
        while time.monotonic() < stop:
            headers = dict(_TEXT)
            if producer:
                headers |= {"Producer-Id": f"w{w}", "Producer-Epoch": "0", "Producer-Seq": str(seq)}
            status, _, data = await conns[w].request("POST", path, headers, body)
            if status not in (200, 204):
                raise SystemExit(f"append refused: {status} {data!r}")
            seq += 1
            count += 1

    try:
        await asyncio.gather(*(writer(w) for w in range(writers)))
    finally:
        for conn in conns:
            conn.close()
    return count / seconds


async def _latency(
    base: str, seconds: float, pairs: int, interval: float, mode: str
) -> list[float]:
    import httpx

    out: list[float] = []
    limits = httpx.Limits(max_connections=pairs * 2 + 4, max_keepalive_connections=pairs * 2 + 4)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
        tag = f"{mode}{time.monotonic_ns()}"
        offsets = {}
        for p in range(pairs):
            r = await http.put(f"/v1/stream/lat-{tag}-{p}", headers=_TEXT)
            offsets[p] = r.headers["Stream-Next-Offset"]
        stop = time.monotonic() + seconds

        def seen(text: str) -> None:
            now = time.perf_counter()
            for record in text.split(";"):
                if record:
                    out.append((now - float(record)) * 1000.0)

        async def write(p: int) -> None:
            conn = await _Conn.open(base)
            path = f"/v1/stream/lat-{tag}-{p}"
            while time.monotonic() < stop:
                body = f"{time.perf_counter():.9f};".encode()
                await conn.request("POST", path, _TEXT, body)
                await asyncio.sleep(interval)
            conn.close()

        async def long_poll(p: int) -> None:
            conn = await _Conn.open(base)
            at = offsets[p]
            while time.monotonic() < stop + 0.5:
                q = f"/v1/stream/lat-{tag}-{p}?offset={at}&live=long-poll"
                status, headers, data = await conn.request("GET", q, {})
                at = headers.get("stream-next-offset", at)
                if status == 200:
                    seen(data.decode())
            conn.close()

        async def sse(p: int) -> None:
            params = {"offset": offsets[p], "live": "sse"}
            async with http.stream("GET", f"/v1/stream/lat-{tag}-{p}", params=params) as r:
                kind = ""
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:") and kind == "data":
                        seen(line[5:].lstrip(" "))
                    if time.monotonic() > stop + 0.5:
                        return

        reader = long_poll if mode == "long-poll" else sse

        async def bounded(p: int) -> None:
            # A reader waiting when the writers stop would wait out the
            # server's long-poll timeout (or SSE's length): its phase is over.
            try:
                await asyncio.wait_for(reader(p), timeout=seconds + 1.0)
            except TimeoutError:
                pass

        await asyncio.gather(*(write(p) for p in range(pairs)), *(bounded(p) for p in range(pairs)))
    return out


def _measure(base: str, args: Any) -> dict[str, Any]:
    res: dict[str, Any] = {}
    res["appends_per_s"] = asyncio.run(_appends(base, args.seconds, args.writers, False))
    res["producer_appends_per_s"] = asyncio.run(_appends(base, args.seconds, args.writers, True))
    for mode in ("long-poll", "sse"):
        lat = asyncio.run(_latency(base, args.seconds, args.pairs, args.interval_ms / 1000, mode))
        res[mode] = {"samples": len(lat), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}
    return res


def _reference(tmp: Path, port: int, data_dir: Path | None) -> subprocess.Popen[str]:
    script = _CONFORMANCE / "reference-server.mjs"
    if not (_CONFORMANCE / "node_modules" / "@durable-streams" / "server").exists():
        raise SystemExit(
            "the reference server is missing: run ./quickstart setup (npm install in conformance/)"
        )
    env = {**os.environ, "DS_PORT": str(port)}
    if data_dir is not None:
        env["DS_DATA_DIR"] = str(data_dir)
    proc = subprocess.Popen(
        ["node", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp,
    )
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("the reference server did not start")
        if line.startswith("listening on"):
            return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(config: Config, args: Any, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "params": vars(args) | {"json": None}}
    sections = {
        "http": {"requests_per_second": 0, "max_connections": 4096},
        "durable": {"long_poll_timeout": 20.0},
    }
    proc, url = start_chatd(config, tmp, sections)
    base = url.replace("ws://", "http://").rstrip("/")
    try:
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        results["chatd"] = _measure(base, args)
        results["chatd"]["cores"] = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for name, data_dir in (("reference_file", tmp / "ref-data"), ("reference_memory", None)):
        port = _free_port()
        ref = _reference(tmp, port, data_dir)
        try:
            cpu0, t0 = cpu_seconds(ref.pid), time.monotonic()
            results[name] = _measure(f"http://127.0.0.1:{port}", args)
            results[name]["cores"] = (cpu_seconds(ref.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            ref.terminate()
            ref.wait(timeout=30)
    _print(results)
    return results


def _print(res: dict[str, Any]) -> None:
    c, f, m = res["chatd"], res["reference_file"], res["reference_memory"]
    print(f"\nDurable Streams; machine: {res['machine']}")
    print(f"{'':34}{'chatd':>12}{'ref (file)':>12}{'ref (mem)':>12}{'chatd/file':>12}")
    for key, label in (
        ("appends_per_s", "appends/s"),
        ("producer_appends_per_s", "appends/s, idempotent producer"),
    ):
        print(f"{label:34}{c[key]:12,.0f}{f[key]:12,.0f}{m[key]:12,.0f}{c[key] / f[key]:12.2f}")
    for mode in ("long-poll", "sse"):
        for q in ("p50_ms", "p99_ms"):
            label = f"read-after-append {mode} {q[:3]} ms"
            print(
                f"{label:34}{c[mode][q]:12.2f}{f[mode][q]:12.2f}{m[mode][q]:12.2f}"
                f"{c[mode][q] / f[mode][q]:12.2f}"
            )
    print(f"{'server cores used':34}{c['cores']:12.2f}{f['cores']:12.2f}{m['cores']:12.2f}")
    samples = {k: res[k]["long-poll"]["samples"] for k in ("chatd", "reference_file")}
    print(f"long-poll latency samples: {json.dumps(samples)}")
