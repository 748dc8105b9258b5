"""The fault matrix (docs/reliability.md): every cell is one test.

Rows: {redis, postgres} x {switch (chaos gate), kill (SIGKILL/immediate
shutdown, then restart), stop (SIGSTOP, then SIGCONT)}. Columns: what is
happening when the fault hits: idle, sends in flight, mid-stream, relay
draining, client reconnecting. Every cell checks, after healing: acked
messages are durable exactly once with their seq; seqs are gapless; the
outbox drains; every subscriber receives every committed message exactly
once, in order (a reconnecting one: exactly those after its cursor); a reply
commits complete and its deltas never repeat or skip.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import trio

from chatd.server import serve
from tests.conftest import make_config
from tests.faults import (
    KINDS,
    Faults,
    Watcher,
    check_durable,
    check_outbox_drains,
    send_until_acked,
    subscribe_until_ok,
)

OUTAGE = 1.0
ROWS = [(c, k) for c in ("redis", "postgres") for k in KINDS]


@pytest.fixture
async def env(nursery, postgres, own_redis, connect, conv):
    cfg = make_config(
        postgres,
        own_redis,
        model={"fake_tokens": 60, "fake_token_rate": 40.0},
        relay={"batch": 10, "poll_interval": 0.3},
        retry={"backoff_max": 0.3},
    )
    srv = await nursery.start(serve, cfg)
    yield srv, Faults(srv, postgres, own_redis), connect, conv, nursery
    # Whatever happened, leave the shared Postgres running for the next test.
    postgres.resume()
    if postgres.proc is None:
        postgres.start(port=postgres.port)


async def _watch(env, user="watcher", after=None):
    srv, _, connect, conv, nursery = env
    w = Watcher(await connect(srv, user), conv)
    await w.start(nursery, after)
    return w


async def _finish(env, watchers, acked):
    srv, _, _, conv, _ = env
    rows = await check_durable(srv, conv, acked)
    await check_outbox_drains(srv)
    for w in watchers:
        await w.wait_for(len(rows) - (w.seqs[0] - 1 if w.seqs else 0))
        start = w.seqs[0] if w.seqs else 1
        assert w.seqs == list(range(start, len(rows) + 1)), "exactly once, in seq order"
    return rows


@pytest.mark.parametrize(("component", "kind"), ROWS)
async def test_idle(env, component, kind):
    srv, faults, connect, conv, _ = env
    w = await _watch(env)
    await faults.inject(component, kind, OUTAGE)
    sender = await connect(srv, "sender")
    acked = {f"m{i}": await send_until_acked(sender, conv, f"m{i}") for i in range(3)}
    await _finish(env, [w], acked)


@pytest.mark.parametrize(("component", "kind"), ROWS)
async def test_sends_in_flight(env, component, kind):
    srv, faults, connect, conv, _ = env
    w = await _watch(env)
    acked: dict[str, int] = {}

    async def sender(k):
        c = await connect(srv, f"sender{k}")
        for i in range(15):
            mid = f"s{k}-{i}"
            acked[mid] = await send_until_acked(c, conv, mid)
            await trio.sleep(0.05)

    async with trio.open_nursery() as n:
        for k in range(3):
            n.start_soon(sender, k)
        await trio.sleep(0.2)
        n.start_soon(faults.inject, component, kind, OUTAGE)
    assert len(acked) == 45
    await _finish(env, [w], acked)


@pytest.mark.parametrize(("component", "kind"), ROWS)
async def test_mid_stream(env, component, kind):
    srv, faults, connect, conv, _ = env
    w = await _watch(env)
    asker = await connect(srv, "asker")
    ack = await asker.send_reply(conv, "q", "tell me")
    stream = ack["stream"]
    with trio.fail_after(5):
        while not w.texts.get(stream):
            await trio.sleep(0.01)
    await faults.inject(component, kind, OUTAGE)
    # The reply still commits, complete (the outage is shorter than commit_timeout).
    await w.wait_for(2, timeout=30)
    rows = await _finish(env, [w], {"q": ack["seq"]})
    (reply,) = [r for r in rows if r["client_id"] == stream]
    assert reply["role"] == "assistant" and reply["status"] == "complete"
    assert len(reply["body"].split(" ")) == 60
    assert w.messages[stream]["text"] == reply["body"]
    # Live deltas were a prefix (the animation may have frozen, never diverged).
    assert reply["body"].startswith(w.texts.get(stream, ""))

    async def _no_partial():
        try:
            return (await srv.transport.read_streams([conv]))[0] == []
        except Exception:
            return False

    from tests.conftest import wait_until

    await wait_until(_no_partial, timeout=20)


@pytest.mark.parametrize(("component", "kind"), ROWS)
async def test_relay_draining(env, component, kind):
    srv, faults, connect, conv, _ = env
    w = await _watch(env)
    sender = await connect(srv, "sender")
    # Build a backlog: Redis refuses, sends are still acked into the outbox.
    srv.chaos.break_for("redis", 60)
    acked = {f"b{i}": await send_until_acked(sender, conv, f"b{i}") for i in range(60)}
    srv.chaos.heal("redis")
    # The relay starts draining (batches of 10); the fault hits now.
    await faults.inject(component, kind, OUTAGE)
    await _finish(env, [w], acked)


@pytest.mark.parametrize(("component", "kind"), ROWS)
async def test_client_reconnecting(env, component, kind):
    srv, faults, connect, conv, nursery = env
    sender = await connect(srv, "sender")
    acked = {f"a{i}": await send_until_acked(sender, conv, f"a{i}") for i in range(5)}
    stay = await _watch(env, "stayer", after=0)
    acked |= {f"b{i}": await send_until_acked(sender, conv, f"b{i}") for i in range(5)}
    cursor = 5
    reconnecting = Watcher(await connect(srv, "returner"), conv)

    async def reconnect():
        await trio.sleep(0.2)  # inside the outage
        snap = await subscribe_until_ok(reconnecting.client, conv, cursor)
        assert snap["recovered"] is True
        for m in snap["messages"]:
            reconnecting._message(m)
        nursery.start_soon(reconnecting._read)

    async with trio.open_nursery() as n:
        n.start_soon(faults.inject, component, kind, OUTAGE)
        n.start_soon(reconnect)
    acked |= {f"c{i}": await send_until_acked(sender, conv, f"c{i}") for i in range(2)}
    await _finish(env, [stay, reconnecting], acked)
    assert reconnecting.seqs[0] == cursor + 1


async def test_hung_servers_never_stall_other_clients(env):
    """SIGSTOP both servers: every call hits its deadline; the event loop keeps serving."""
    srv, faults, connect, conv, _ = env
    c = await connect(srv, "ops")  # an operator: the test reads status
    faults.pg.pause()
    faults.redis.pause()
    try:
        t0 = trio.current_time()
        reply = await c.request({"op": "send", "conv": conv, "id": "m1", "text": "x"}, "ack")
        took = trio.current_time() - t0
        assert reply.get("code") == "unavailable" and reply["retryable"], reply
        bound = srv.config.postgres.command_timeout + 1.0
        assert took < bound, f"send answered after {took:.1f}s, bound {bound}s"
        # Meanwhile other frames are answered at once.
        t0 = trio.current_time()
        assert (await c.request({"op": "ping"}, "pong"))["type"] == "pong"
        assert trio.current_time() - t0 < 0.5
        status = await c.request({"op": "status"}, "status", timeout=15)
        assert status["postgres"].startswith("unavailable")
        assert status["redis"].startswith("unavailable")
    finally:
        faults.pg.resume()
        faults.redis.resume()
    # chatd reconnects by itself: the retry commits exactly once.
    assert await send_until_acked(c, conv, "m1") == 1
    status = await c.request({"op": "status"}, "status", timeout=15)
    assert status["postgres"] == "ok" and status["redis"] == "ok"
    await check_outbox_drains(srv)


async def test_stray_asyncio_error_is_logged_not_fatal(server, connect, conv, caplog):
    """Driver cleanup that nobody awaits any more (asyncpg resetting a connection
    after its call was abandoned at the deadline) may fail on the asyncio side.
    trio-asyncio's default would re-raise that into the loop and stop chatd."""

    async def orphan_failure() -> None:
        async def cleanup() -> None:
            raise TimeoutError("reset of an abandoned connection")

        task = asyncio.ensure_future(cleanup())
        await asyncio.sleep(0.01)
        assert task.done()
        del task  # its exception is never retrieved
        gc.collect()

    c = await connect(server)
    await server.log.bridge.postgres(orphan_failure)
    await trio.sleep(0.2)
    assert (await c.request({"op": "ping"}, "pong"))["type"] == "pong"
    ack = await c.send_message(conv, "after-the-stray-error")
    assert ack["type"] == "ack"
    assert "reset of an abandoned connection" in caplog.text
