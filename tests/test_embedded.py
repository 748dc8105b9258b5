"""Embedded servers that chatd supervises: restarted when they die, never left behind.

Each test has a data directory of its own (world-searchable: as root,
PostgreSQL runs as another user) and its own embedded servers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from chatd.config import config_from_dict
from chatd.embedded import EmbeddedServices, PostgresServer, RedisServer
from chatd.embedded.postgres import _pg_run_user, find_pg_bin
from chatd.embedded.processes import cmdline
from chatd.embedded.redis import find_redis_server
from chatd.server import serve
from tests.chatd_process import run_chatd
from tests.client import Client
from tests.conftest import wait_until


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatd-test-embedded-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(data_dir: Path):
    return config_from_dict(
        {
            "server": {"port": 0},
            "embedded": {"data_dir": str(data_dir)},
            "postgres": {"command_timeout": 2.0},
            "redis": {"command_timeout": 1.0, "connect_timeout": 1.0},
            "retry": {"backoff_max": 0.5},
        }
    )


def _pids(data_dir: Path) -> dict[str, int]:
    """The embedded servers' pids from their pid files, for those still running."""
    out = {}
    for name, path in (
        ("postgres", data_dir / "pg" / "postmaster.pid"),
        ("redis", data_dir / "redis" / "redis.pid"),
    ):
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline(pid):
            out[name] = pid
    return out


async def _start_chatd(nursery: trio.Nursery, data_dir: Path) -> tuple[trio.Process, str]:
    """``chatd serve`` on embedded servers in ``data_dir`` (no DSN in its environment)."""
    conf = data_dir / "chatd.toml"
    conf.write_text(
        f'[server]\nport = 0\n[embedded]\ndata_dir = "{data_dir}"\n[log]\nlevel = "info"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    return await run_chatd(nursery, conf, env, stderr=True)


async def _send(url: str, conv: str, ident: str) -> dict:
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"op": "hello", "user": "u"}))
        await ws.get_message()
        await ws.send_message(json.dumps({"op": "send", "conv": conv, "id": ident, "text": ident}))
        with trio.fail_after(10):
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("type") in ("ack", "error"):
                    return frame


async def _history(url: str, conv: str) -> list[str]:
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"op": "hello", "user": "u"}))
        await ws.get_message()
        await ws.send_message(json.dumps({"op": "subscribe", "conv": conv, "after": 0}))
        with trio.fail_after(10):
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("type") == "snapshot":
                    return [m["id"] for m in frame["messages"]]


async def _stderr(proc: trio.Process) -> str:
    out = b""
    with trio.move_on_after(2):
        while chunk := await proc.stderr.receive_some(65536):
            out += chunk
    return out.decode(errors="replace")


async def test_a_killed_chatd_takes_its_servers_along_and_starts_again(data_dir, nursery):
    proc, url = await _start_chatd(nursery, data_dir)
    assert (await _send(url, "k1", "before-kill"))["type"] == "ack"
    servers = _pids(data_dir)
    assert set(servers) == {"postgres", "redis"}
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    async def gone() -> bool:
        return not any(cmdline(pid) for pid in servers.values())

    await wait_until(gone, timeout=15)  # they die with chatd (Linux)
    again, url2 = await _start_chatd(nursery, data_dir)
    assert await _history(url2, "k1") == ["before-kill"]
    again.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await again.wait()
    assert again.returncode == 0 and not _pids(data_dir)


def _leave_servers_running(data_dir: Path) -> dict[str, int]:
    """Start the embedded servers as a killed chatd would have left them: from a
    thread that ends (so they do not die with it) and never stopped."""
    started: dict[str, object] = {}

    def run() -> None:
        pg = PostgresServer(data_dir, bin_dir=find_pg_bin(""), run_as=_pg_run_user(""))
        pg.start()
        rs = RedisServer(data_dir, binary=find_redis_server())
        rs.start()
        started.update(pg=pg, rs=rs)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return _pids(data_dir)


async def test_leftover_servers_are_stopped_with_a_message(data_dir, nursery):
    leftovers = await trio.to_thread.run_sync(_leave_servers_running, data_dir)
    assert set(leftovers) == {"postgres", "redis"}
    proc, url = await _start_chatd(nursery, data_dir)
    assert (await _send(url, "l1", "m"))["type"] == "ack"
    assert not any(cmdline(pid) for pid in leftovers.values())
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await proc.wait()
    err = await _stderr(proc)
    assert f"stopped the PostgreSQL (pid {leftovers['postgres']})" in err, err
    assert f"stopped the Redis (pid {leftovers['redis']})" in err, err


async def test_a_second_chatd_on_the_same_data_dir_says_so(data_dir, nursery):
    proc, _ = await _start_chatd(nursery, data_dir)
    conf = data_dir / "chatd.toml"
    second = await trio.run_process(
        [sys.executable, "-m", "chatd.cli", "--config", str(conf), "serve"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("CHATD_")},
    )
    err = second.stderr.decode().strip()
    assert second.returncode == 1
    assert err == (
        f"chatd: another chatd (pid {proc.pid}) is serving from {data_dir}: stop it first, "
        "or give this one its own [embedded].data_dir"
    ), err
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await proc.wait()


async def test_dead_embedded_servers_are_restarted_and_nothing_is_lost(data_dir, nursery):
    services = EmbeddedServices(_config(data_dir))
    with services as resolved:
        async with trio.open_nursery() as inner:
            srv = await inner.start(partial(serve, resolved, embedded=services))
            reader = await Client.open(inner, srv.url)
            await reader.hello("reader")
            await reader.subscribe("e1")
            writer = await Client.open(inner, srv.url)
            await writer.hello("writer")
            acked = [(await writer.send_message("e1", "m1"))["id"]]

            # Redis, SIGKILLed: back on its port, and deliveries resume.
            services.redis.proc.kill()
            await wait_until(partial(_restarted, srv, "redis"), timeout=15)
            acked.append((await _retry_send(writer, "e1", "m2"))["id"])
            got = await reader.messages("e1", 2, timeout=15)
            assert [m["id"] for m in got] == ["m1", "m2"]

            # Postgres, SIGKILLed (its backends follow): back, and sends are acked again.
            services.postgres.proc.kill()
            await wait_until(partial(_restarted, srv, "postgres"), timeout=30)
            acked.append((await _retry_send(writer, "e1", "m3"))["id"])
            got = await reader.messages("e1", 1, timeout=15)
            assert [m["id"] for m in got] == ["m3"]
            status = await srv.engine.status()
            assert status["postgres"] == "ok"
            assert srv.embedded.down == set()
            async with httpx.AsyncClient(base_url=srv.http_url) as http:
                text = (await http.get("/metrics")).text
            samples = {
                (s.name, tuple(s.labels.values())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            for name in ("postgres", "redis"):
                assert samples["chatd_embedded_restarts_total", (name,)] == 1
                assert samples["chatd_embedded_up", (name,)] == 1
            await reader.close()
            await writer.close()
            srv.shutdown()
    assert acked == ["m1", "m2", "m3"]


async def _restarted(srv, name: str) -> bool:
    return srv.embedded.restarts[name] == 1


async def _retry_send(client: Client, conv: str, ident: str) -> dict:
    """Send until acked (the same id: a retry is never a second message)."""
    with trio.fail_after(30):
        while True:
            frame = await client.send_message(conv, ident)
            if frame["type"] == "ack":
                return frame
            assert frame["code"] == "unavailable", frame
            await trio.sleep(0.2)
