"""``chatd serve --workers N``: one port served by N chatd processes, as an operator runs it.

A worker that dies is restarted; clients keep being served on the same port;
SIGTERM drains every worker (clients closed with 1001) and the supervisor
exits cleanly within the shutdown deadline.
"""

from __future__ import annotations

import os
import signal

import trio

from chatd.embedded.processes import children
from tests.chatd_process import start_chatd
from tests.client import Client

WORKERS = 2


_TOML = f'[server]\nport = 0\nworkers = {WORKERS}\nshutdown_grace = 5.0\n[log]\nlevel = "warning"\n'


async def _workers_of(proc: trio.Process, n: int) -> list[int]:
    with trio.fail_after(30):
        while len(pids := children(proc.pid)) != n:
            await trio.sleep(0.1)
    return pids


async def _client(nursery, url: str, user: str) -> Client:
    client = await Client.open(nursery, url)
    await client.hello(user)
    return client


async def test_workers_share_the_port_restart_when_killed_and_drain_on_sigterm(
    tmp_path, postgres, redis_server, nursery
):
    proc, url = await start_chatd(nursery, tmp_path, postgres, redis_server, _TOML)
    pids = await _workers_of(proc, WORKERS)
    conv = f"workers-{os.getpid()}-{trio.current_time():.0f}"
    watcher = await _client(nursery, url, "watcher")
    await watcher.subscribe(conv)
    senders = [await _client(nursery, url, f"s{k}") for k in range(8)]
    for k, s in enumerate(senders):
        ack = await s.send_message(conv, f"m{k}")
        assert ack["type"] == "ack", ack
    got = [(await watcher.expect("message", conv=conv, timeout=15))["id"] for _ in senders]
    assert sorted(got) == sorted(f"m{k}" for k in range(8)), "fan-out across workers"

    # One worker killed: the supervisor starts another; the port keeps serving.
    os.kill(pids[0], signal.SIGKILL)
    with trio.fail_after(30):
        while pids[0] in (now := children(proc.pid)) or len(now) != WORKERS:
            await trio.sleep(0.1)
    assert proc.returncode is None, "the supervisor survives a worker's death"
    for k in range(4):
        late = await _client(nursery, url, f"late{k}")
        assert (await late.request({"op": "ping"}, "pong"))["type"] == "pong"
        await late.close()

    # SIGTERM: every worker drains; live clients are told to go elsewhere.
    alive = [await _client(nursery, url, f"a{k}") for k in range(4)]
    t0 = trio.current_time()
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(20):
        await proc.wait()
    assert proc.returncode == 0
    assert trio.current_time() - t0 < 5.0 + 2.0
    for client in alive:
        assert await client.closed_code() == 1001
    await trio.sleep(0.2)
    assert _running(pids[1:]) == [], "no worker outlives the supervisor"


def _running(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (not gone, not a zombie)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                state = f.read().split("State:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out
