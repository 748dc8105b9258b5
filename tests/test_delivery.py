"""Delivery under stress: slow consumers, a backlog relayed after a Redis outage."""

from __future__ import annotations

import math

import trio

from chatd.server import serve
from tests.conftest import make_config, sql, wait_until
from tests.faults import lose_publish


async def test_slow_consumer_is_disconnected_with_4008(
    nursery, postgres, redis_server, connect, conv
):
    cfg = make_config(
        postgres, redis_server, server={"send_queue_frames": 16, "send_queue_bytes": 200_000}
    )
    srv = await nursery.start(serve, cfg)
    # This client never reads: its socket fills, then the server's queue.
    slow = await connect(srv, "slow", message_queue_size=1)
    await slow.subscribe(conv)
    fast = await connect(srv, "fast")
    await fast.subscribe(conv)
    got: list[int] = []

    async def read_fast():
        while True:
            got.append((await fast.expect("message", conv=conv, timeout=30))["seq"])

    nursery.start_soon(read_fast)
    writer = await connect(srv, "writer")
    text = "z" * 15000
    for k in range(300):
        ack = await writer.send_message(conv, f"m{k}", text)
        assert ack["type"] == "ack"
        if srv.engine.counters.slow_disconnects:
            break
    assert srv.engine.counters.slow_disconnects == 1, (
        "only the client that stopped reading is dropped"
    )
    assert await slow.closed_code() == 4008
    # The reading client got everything, in order.
    with trio.fail_after(20):
        while len(got) < k + 1:
            await trio.sleep(0.05)
    assert got == list(range(1, k + 2))
    # The slow client resumes by cursor.
    again = await connect(srv, "slow")
    snap = await again.subscribe(conv, after=0)
    assert [m["seq"] for m in snap["messages"]] == list(range(1, k + 2))


async def test_relay_drains_backlog_written_while_redis_was_stopped(
    nursery, postgres, own_redis, connect, conv
):
    srv = await nursery.start(serve, make_config(postgres, own_redis))
    reader = await connect(srv, "reader")
    await reader.subscribe(conv)
    writer = await connect(srv, "writer")
    await writer.send_message(conv, "before")
    assert (await reader.messages(conv, 1))[0]["seq"] == 1
    port = own_redis.port
    own_redis.stop()
    for k in range(20):
        ack = await writer.send_message(conv, f"during{k}")
        assert ack["type"] == "ack", "Postgres is the truth: sends are acked with Redis down"
    backlog = await sql(srv, "SELECT count(*) AS n FROM outbox WHERE conv_id = $1", conv)
    assert backlog == [{"n": 20}]
    own_redis.start(port=port)  # fresh and empty

    async def drained():
        return not await sql(srv, "SELECT 1 FROM outbox WHERE conv_id = $1", conv)

    await wait_until(drained, timeout=20)
    got = await reader.messages(conv, 20, timeout=20)
    assert [m["seq"] for m in got] == list(range(2, 22))
    await writer.send_message(conv, "after")
    assert (await reader.messages(conv, 1))[0]["seq"] == 22


async def test_gap_is_filled_from_postgres(server, connect, conv):
    """A message whose publish was lost is fetched from Postgres when the next one arrives."""
    reader = await connect(server, "reader")
    await reader.subscribe(conv)
    writer = await connect(server, "writer")
    await writer.send_message(conv, "m1")
    await reader.messages(conv, 1)

    # Commit seq 2 but drop its outbox row, as if its publish had been lost.
    await lose_publish(server, conv, 2)
    before = server.engine.hub.counters.gap_fills
    await writer.send_message(conv, "m3")
    got = await reader.messages(conv, 2)
    assert [(m["seq"], m["id"]) for m in got] == [(2, "lost"), (3, "m3")]
    assert server.engine.hub.counters.gap_fills == before + 1


async def test_subscriber_resyncs_after_redis_restart(nursery, postgres, own_redis, connect, conv):
    srv = await nursery.start(serve, make_config(postgres, own_redis))
    reader = await connect(srv, "reader")
    await reader.subscribe(conv)
    writer = await connect(srv, "writer")
    own_redis.kill()
    own_redis.start(port=own_redis.port)
    for k in range(5):
        await writer.send_message(conv, f"m{k}")
    got = await reader.messages(conv, 5, timeout=20)
    assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
    await trio.sleep(0.3)
    assert not [f for f in reader._unread if f.get("type") == "message"], "no duplicates"


async def test_resubscribing_at_once_is_not_delayed(server, connect, conv):
    """Unsubscribe + subscribe before the pub/sub pump dropped the channel: no new
    Redis confirmation comes, so the feed must not wait for one."""
    c = await connect(server, "alice")
    await c.subscribe(conv)
    for _ in range(3):
        assert (await c.request({"op": "unsubscribe", "conv": conv}, "unsubscribed"))["type"]
        t0 = trio.current_time()
        await c.subscribe(conv, after=0)
        assert trio.current_time() - t0 < 0.5
    # And it is live.
    other = await connect(server, "bob")
    await other.send_message(conv, "m1")
    assert (await c.messages(conv, 1))[0]["seq"] == 1


async def test_join_during_resync_backoff_is_not_cut_short(server, connect, conv):
    """A feed retrying a failed resync waits with a timeout; that timeout must
    bound only the wait, not a join it then handles (a slow snapshot would be
    cancelled and the client left without an answer)."""
    alice = await connect(server, "alice")
    await alice.subscribe(conv)
    server.chaos.break_for("postgres", math.inf)
    # Redis blips (longer than one idle pump call): the pub/sub reconnect asks
    # every feed to resync, which fails.
    server.chaos.break_for("redis", 1.5)
    feed = server.engine.hub.feeds[conv]

    async def resync_failing() -> bool:
        return feed.needs_resync

    await wait_until(resync_failing)
    await trio.sleep(0.5)  # the feed is now backing off between resync attempts
    server.chaos.break_for("postgres", math.inf, latency=2.5)  # slow but answering
    bob = await connect(server, "bob")
    snap = await bob.request({"op": "subscribe", "conv": conv}, "snapshot", timeout=15)
    assert snap["type"] == "snapshot", snap
    server.chaos.heal()


async def test_new_subscription_goes_live_without_waiting_for_the_pump(server, connect, conv):
    """The pub/sub pump blocks on its read (no idle polling); a wanted channel
    wakes it, so Redis carries the conversation's events right after the
    snapshot instead of at the end of the pump's one-second wait."""
    await trio.sleep(0.2)  # the pump is now blocked in a fresh wait
    reader = await connect(server, "reader")
    await reader.subscribe(conv)
    t0 = trio.current_time()

    async def live() -> bool:
        return conv in server.transport.subscribed

    await wait_until(live, timeout=5, interval=0.005)
    assert trio.current_time() - t0 < 0.5
    writer = await connect(server, "writer")
    await writer.send_message(conv, "m1")
    assert (await reader.messages(conv, 1))[0]["seq"] == 1
    assert server.engine.hub.counters.gap_fills == 0
