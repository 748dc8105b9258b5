"""The break switch: chaos gates on Trio's clock, its modes, and the operator endpoints."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import trio

from chatd.chaos import Chaos
from chatd.errors import BusUnavailable, StoreUnavailable
from chatd.server import serve
from tests.conftest import make_config

TOKEN = "test-admin-token-0123456789"


async def test_gate_opens_and_closes_on_trios_clock(mock_clock):
    chaos = Chaos()
    chaos.check("redis")
    chaos.break_for("redis", 5)
    with pytest.raises(BusUnavailable, match="chaos switch"):
        chaos.check("redis")
    chaos.check("postgres")  # the other gate stays closed
    mock_clock.jump(4.9)
    assert chaos.remaining("redis") == pytest.approx(0.1)
    with pytest.raises(BusUnavailable):
        chaos.check("redis")
    mock_clock.jump(0.2)
    assert chaos.check("redis") == 0.0
    chaos.break_for("postgres", math.inf)
    mock_clock.jump(1e6)
    with pytest.raises(StoreUnavailable):
        chaos.check("postgres")
    chaos.heal()
    chaos.check("postgres")


async def test_fraction_and_latency_modes():
    chaos = Chaos(seed=7)
    chaos.break_for("postgres", 60, fraction=0.25)
    failures = 0
    for _ in range(2000):
        try:
            chaos.check("postgres")
        except StoreUnavailable:
            failures += 1
    assert 400 < failures < 600
    chaos.break_for("redis", 60, latency=0.2)
    assert chaos.check("redis") == 0.2  # delayed, not failed
    with pytest.raises(ValueError, match="fraction"):
        chaos.break_for("redis", 1, fraction=2)
    with pytest.raises(ValueError, match="unknown component"):
        chaos.break_for("mysql", 1)


async def test_an_answer_at_once_keeps_the_gates_and_their_deadline(mock_clock):
    """``call_at_once`` (the memory twins' path) answers as ``call`` does: at once
    through closed gates, an outage through an open one, and a latency that
    outlasts the deadline is an outage too."""
    mock_clock.autojump_threshold = 0
    chaos = Chaos()
    answers: list[int] = []

    def answer() -> int:
        answers.append(1)
        return 42

    assert await chaos.call_at_once(("postgres",), 1.0, answer) == 42
    assert trio.current_time() == 0.0
    chaos.break_for("postgres", 10)
    with pytest.raises(StoreUnavailable, match="chaos switch"):
        await chaos.call_at_once(("postgres",), 1.0, answer)
    chaos.break_for("redis", 10, latency=0.3)
    assert await chaos.call_at_once(("redis",), 1.0, answer) == 42
    assert trio.current_time() == pytest.approx(0.3)
    chaos.break_for("redis", 10, latency=2.0)
    with pytest.raises(BusUnavailable, match="no answer within 1s"):
        await chaos.call_at_once(("redis",), 1.0, answer)
    assert len(answers) == 2  # neither the refused call nor the late one ran


async def test_latency_mode_slows_calls_through_the_gateway(server):
    server.chaos.break_for("redis", 30, latency=0.3)
    t0 = trio.current_time()
    assert await server.transport.ping()
    assert trio.current_time() - t0 >= 0.3
    # Latency beyond the call's deadline is an outage.
    server.chaos.break_for("redis", 30, latency=5.0)
    with pytest.raises(BusUnavailable, match="no answer within"):
        await server.transport.ping()
    server.chaos.heal()


async def test_break_switch_is_off_by_default(server):
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url) as http:
        # No operator token configured: the operator API answers 403, nothing breaks.
        r = await http.post("/chaos/break", json={"component": "redis", "seconds": 5})
        assert r.status_code == 403 and "operator_token" in r.json()["error"]
    assert server.chaos.remaining("redis") == 0


async def _chatd(*args: str, token: str = TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "CHATD_OPERATOR_TOKEN": token}
    proc = await trio.run_process(
        [sys.executable, "-m", "chatd.cli", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_chatd_chaos_cli_breaks_and_heals_a_running_server(
    nursery, postgres, redis_server, connect, conv
):
    cfg = make_config(
        postgres,
        redis_server,
        chaos={"enabled": True},
        http={"operator_listen": "127.0.0.1:0", "operator_token": TOKEN},
    )
    srv = await nursery.start(serve, cfg)
    admin = srv.operator_url
    assert srv.operator_port and srv.operator_port != srv.port
    rc, out, err = await _chatd("chaos", "--admin", admin, "break", "postgres", "--for", "30")
    assert rc == 0, err
    assert json.loads(out)["postgres"]["broken"] is True
    # The switch acts on the running server: sends are refused, retryably.
    c = await connect(srv, "alice")
    reply = await c.send_message(conv, "m1")
    assert reply["type"] == "error" and reply["code"] == "unavailable" and reply["retryable"]
    rc, out, _ = await _chatd("chaos", "--admin", admin, "status")
    assert rc == 0 and json.loads(out)["postgres"]["tripped_calls"] >= 1
    rc, out, _ = await _chatd("status", "--admin", admin)
    status = json.loads(out)
    assert rc == 0 and status["postgres"].startswith("unavailable") and status["redis"] == "ok"
    rc, out, _ = await _chatd("chaos", "--admin", admin, "heal")
    assert rc == 0 and json.loads(out)["postgres"]["broken"] is False
    assert (await c.send_message(conv, "m1"))["seq"] == 1
    rc, out, _ = await _chatd("status", "--admin", admin)
    status = json.loads(out)
    assert status["postgres"] == "ok" and "outbox_rows" in status
    # Latency and fraction modes from the CLI.
    rc, out, _ = await _chatd(
        "chaos", "--admin", admin, "break", "redis", "--for", "5", "--latency", "50"
    )
    assert rc == 0 and json.loads(out)["redis"]["latency_ms"] == 50
    await _chatd("chaos", "--admin", admin, "heal", "redis")
    # A wrong token is refused and changes nothing.
    rc, _, err = await _chatd(
        "chaos", "--admin", admin, "break", "redis", "--for", "5", token="wrong-token-123456789"
    )
    assert rc == 1 and "401" in err
    assert srv.chaos.remaining("redis") == 0
    # Bad input names the problem.
    rc, _, err = await _chatd(
        "chaos", "--admin", admin, "break", "redis", "--for", "5", "--fraction", "3"
    )
    assert rc == 1 and "fraction" in err


async def test_chaos_cli_without_a_server_says_what_is_wrong():
    rc, _, err = await _chatd("chaos", "--admin", "http://127.0.0.1:9", "status")
    assert rc == 1 and "cannot reach chatd's operator endpoints" in err
    rc, _, err = await _chatd("chaos", "status", token="")
    assert rc == 2 and "CHATD_OPERATOR_TOKEN" in err


async def test_subscribe_refused_while_postgres_is_down_can_be_retried(server, connect, conv):
    c = await connect(server, "alice")
    server.chaos.break_for("postgres", 30)
    reply = await c.request({"op": "subscribe", "conv": conv}, "snapshot")
    assert reply["type"] == "error" and reply["code"] == "unavailable" and reply["retryable"]
    server.chaos.heal()
    # The failed subscription is forgotten, so the retry is not "already_subscribed".
    snap = await c.subscribe(conv)
    assert snap["head"] == 0
