"""The fault matrix's third component: chatd itself (docs/reliability.md).

Two real ``chatd serve`` processes, A and B, share one Postgres and one Redis
(lease 1 s, takeover every 0.3 s). Rows: what happens to A — SIGKILL, SIGSTOP
past its lease then SIGCONT, or a graceful restart (SIGTERM, then a new A).
Columns: what is going on when it happens — idle, sends in flight, a reply
mid-stream, the relay draining a backlog, a client reconnecting. Every cell
checks: each acked message is durable exactly once, with gapless seqs; every
reply ends (complete, stopped or interrupted) within the bound, and the
watchers on B see its end; nothing is left in flight (in Postgres, and in
the snapshot a client joining afterwards gets); the outbox drains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio

from chatd.adapters.bridge import open_bridge
from chatd.adapters.postgres import open_postgres_log
from chatd.chaos import Chaos
from chatd.config import PostgresConfig
from tests.client import Client
from tests.engine_env import TEST_BRIDGE
from tests.faults import Watcher, check_durable, check_outbox_drains, send_until_acked

LEASE, TAKEOVER = 1.0, 0.3
#: A reply whose owner died ends within this (lease + sweep + a commit, slack for CI).
BOUND = LEASE + TAKEOVER + 3.0
KINDS = ("kill", "stop", "restart")
SCENARIOS = ("idle", "sends", "mid_stream", "relay_draining", "reconnecting")


@dataclass
class Chatd:
    proc: trio.Process
    url: str


@dataclass
class Db:
    """What check_durable needs of a server: its log."""

    log: Any


class Pair:
    def __init__(self, nursery: trio.Nursery, tmp_path: Any, pg: Any, redis: Any) -> None:
        self.nursery = nursery
        self.conf = tmp_path / "chatd.toml"
        self.conf.write_text(
            "[server]\nport = 0\nshutdown_grace = 3.0\n"
            f"[streams]\nlease = {LEASE}\ntakeover_interval = {TAKEOVER}\n"
            "[model]\nfake_token_rate = 20.0\nfake_tokens = 60\n"
            "[limits]\nsend_rate = 0\nread_rate = 0\nframe_rate = 0\n"
            "[relay]\npoll_interval = 0.3\nbatch = 10\n[retry]\nbackoff_max = 0.3\n"
            '[log]\nlevel = "warning"\n'
        )
        self.env = {**os.environ, "CHATD_POSTGRES_DSN": pg.dsn, "CHATD_REDIS_URL": redis.url}

    async def start(self) -> Chatd:
        cmd = [sys.executable, "-m", "chatd.cli", "--config", str(self.conf), "serve"]
        proc = await self.nursery.start(
            partial(trio.run_process, cmd, stdout=subprocess.PIPE, env=self.env, check=False)
        )
        line = b""
        with trio.fail_after(30):
            while b"\n" not in line:
                line += await proc.stdout.receive_some(4096)
        return Chatd(proc, line.decode().split("serving on ", 1)[1].split()[0])

    async def fault(self, a: Chatd, kind: str) -> Chatd | None:
        """Do ``kind`` to ``a``; returns the process that replaces it, if any."""
        if kind == "kill":
            a.proc.kill()
            await a.proc.wait()
            return None
        if kind == "stop":
            a.proc.send_signal(signal.SIGSTOP)
            await trio.sleep(LEASE * 2.5)  # well past its lease: others take over
            a.proc.send_signal(signal.SIGCONT)
            return a
        a.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await a.proc.wait()
        assert a.proc.returncode == 0
        return await self.start()


async def _client(nursery: trio.Nursery, url: str, user: str) -> Client:
    client = await Client.open(nursery, url)
    await client.hello(user)
    return client


@pytest.fixture
async def matrix(nursery, tmp_path, postgres, own_redis):
    async with AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(
            open_bridge(Chaos(), postgres_timeout=3.0, redis_timeout=1.0, kind=TEST_BRIDGE)
        )
        log = await stack.enter_async_context(
            open_postgres_log(bridge, PostgresConfig(dsn=postgres.dsn, command_timeout=3.0))
        )
        yield Pair(nursery, tmp_path, postgres, own_redis), Db(log), own_redis
        own_redis.resume()


async def _finish(
    db: Db, conv: str, acked: dict[str, int], watchers: list[Watcher], fresh: Client
) -> None:
    rows = await check_durable(db, conv, acked)
    await check_outbox_drains(db)
    for w in watchers:
        await w.wait_for(len(rows) - (w.seqs[0] - 1 if w.seqs else 0))
        start = w.seqs[0] if w.seqs else 1
        assert w.seqs == list(range(start, len(rows) + 1)), "exactly once, in seq order"
    for row in rows:
        if row["role"] == "assistant":
            assert row["status"] in ("complete", "stopped", "interrupted"), row
    with trio.fail_after(BOUND):
        while (await db.log.inflight([conv]))[0]:
            await trio.sleep(0.1)
    # What a client joining now sees: the messages, and no reply in flight.
    snap = await fresh.subscribe(conv)
    assert snap["streams"] == [], snap["streams"]
    assert snap["head"] == len(rows)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", KINDS)
async def test_chatd_itself(matrix, nursery, kind, scenario):
    pair, db, redis = matrix
    conv = f"pf-{uuid.uuid4().hex[:10]}"
    a, b = await pair.start(), await pair.start()
    watcher = Watcher(await _client(nursery, b.url, "watcher"), conv)
    await watcher.start(nursery, after=0)
    acked: dict[str, int] = {}
    on_b = await _client(nursery, b.url, "sender-b")

    if scenario == "idle":
        await pair.fault(a, kind)

    elif scenario == "sends":

        async def sender(k: int) -> None:
            client = await _client(nursery, a.url, f"sender-a{k}")
            for i in range(30):
                mid = f"a{k}-{i}"
                try:
                    acked[mid] = await send_until_acked(client, conv, mid, deadline=3)
                except Exception:
                    # A went away mid-send: the outcome is unknown; retry on B, same id.
                    client = on_b
                    acked[mid] = await send_until_acked(client, conv, mid)
                await trio.sleep(0.02)

        async with trio.open_nursery() as n:
            for k in range(2):
                n.start_soon(sender, k)
            await trio.sleep(0.3)
            n.start_soon(pair.fault, a, kind)

    elif scenario == "mid_stream":
        asker = await _client(nursery, a.url, "asker")
        ack = await asker.send_reply(conv, "q", "tell me #tokens=400 #rate=20")
        acked["q"] = ack["seq"]
        stream = ack["stream"]
        with trio.fail_after(10):
            while not watcher.texts.get(stream):
                await trio.sleep(0.02)
        t0 = trio.current_time()
        await pair.fault(a, kind)
        with trio.fail_after(BOUND + LEASE * 2.5):
            while stream not in watcher.ends:
                await trio.sleep(0.05)
        took = trio.current_time() - t0
        end = watcher.ends[stream]
        assert end["type"] == "stream.end", end
        if kind == "stop":
            took -= LEASE * 2.5  # the stop itself lasted that long
        assert took <= BOUND, f"the reply ended {took:.1f}s after its owner's {kind}"
        assert end["status"] == "interrupted", end
        await watcher.wait_for(2)
        assert watcher.messages[stream]["status"] == "interrupted"

    elif scenario == "relay_draining":
        # A backlog: Redis is paused, sends are still acked into the outbox.
        sender = await _client(nursery, a.url, "sender-a")
        redis.pause()
        try:
            for i in range(40):
                acked[f"b{i}"] = await send_until_acked(sender, conv, f"b{i}")
        finally:
            redis.resume()
        await pair.fault(a, kind)  # while the relays drain it

    elif scenario == "reconnecting":
        for i in range(5):
            acked[f"r{i}"] = await send_until_acked(on_b, conv, f"r{i}")
        returner = Watcher(await _client(nursery, a.url, "returner"), conv)
        await returner.start(nursery, after=0)
        await returner.wait_for(5)

        async def reconnect() -> None:
            await trio.sleep(0.2)  # inside the fault
            back = Watcher(await _client(nursery, b.url, "returner"), conv)
            await back.start(nursery, after=len(returner.seqs))
            watchers.append(back)

        watchers: list[Watcher] = []
        async with trio.open_nursery() as n:
            n.start_soon(pair.fault, a, kind)
            n.start_soon(reconnect)
        for i in range(3):
            acked[f"s{i}"] = await send_until_acked(on_b, conv, f"s{i}")
        await _finish(db, conv, acked, [watcher, *watchers], await _client(nursery, b.url, "late"))
        return

    for i in range(3):
        acked[f"after{i}"] = await send_until_acked(on_b, conv, f"after{i}")
    await _finish(db, conv, acked, [watcher], await _client(nursery, b.url, "late"))
