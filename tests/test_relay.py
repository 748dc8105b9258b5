"""The outbox's two paths to Redis: publish after commit, and the relay sweep."""

from __future__ import annotations

import asyncio
import math

import pytest
import trio

from chatd.errors import StoreUnavailable
from chatd.records import NewMessage
from chatd.server import serve
from tests.conftest import make_config, sql, wait_until


async def _outbox_rows(srv, conv):
    return await sql(srv, "SELECT id FROM outbox WHERE conv_id = $1 ORDER BY id", conv)


async def _swept_clean(srv) -> None:
    # At start the sweep drains every row (earlier tests' leftovers); wait it out.
    async def idle():
        return not srv.engine.relay.draining

    await wait_until(idle, timeout=10)


async def test_commits_are_published_at_once_and_deleted_by_later_commits(
    nursery, postgres, redis_server, connect, conv
):
    # The sweep only takes rows a minute old: whatever arrives came by the fast path.
    srv = await nursery.start(serve, make_config(postgres, redis_server, relay={"claim_after": 60}))
    await _swept_clean(srv)
    swept = srv.engine.relay.published
    reader = await connect(srv, "reader")
    await reader.subscribe(conv)
    writer = await connect(srv, "writer")
    for k in range(10):
        await writer.send_message(conv, f"m{k}")
    got = await reader.messages(conv, 10)
    assert [m["seq"] for m in got] == list(range(1, 11))

    async def deleted():
        return not await _outbox_rows(srv, conv)

    await wait_until(deleted, timeout=5)
    assert srv.engine.relay.published == swept, "the sweep published nothing"
    assert srv.engine.relay.fresh_published >= 10


async def test_rows_nobody_published_are_swept_once_old_enough(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(
        serve, make_config(postgres, redis_server, relay={"claim_after": 1.5, "poll_interval": 0.2})
    )
    await _swept_clean(srv)
    reader = await connect(srv, "reader")
    resyncs = srv.engine.hub.counters.resyncs
    await reader.subscribe(conv)
    # The subscription's confirmation resyncs the feed from the log: let that
    # happen first (it would deliver the rows below: correct, but not the sweep).
    with trio.fail_after(10):
        while srv.engine.hub.counters.resyncs == resyncs:
            await trio.sleep(0.01)
        await srv.engine.hub.feeds[conv].wait_idle()
    # Committed past the committer, so nobody publishes them: as if the process
    # died between the commit and its publish.
    t0 = trio.current_time()
    for k in range(3):
        await srv.log.commit([NewMessage(conv, f"m{k}", "writer", "hi")], [], False)
    assert len(await _outbox_rows(srv, conv)) == 3
    # Young rows belong to their own process's publisher: the sweep leaves them.
    with trio.move_on_after(max(0.0, t0 + 1.0 - trio.current_time())):
        await reader.expect("message", conv=conv, timeout=5)
        raise AssertionError("a row younger than claim_after was swept")
    got = await reader.messages(conv, 3, timeout=10)
    assert [m["seq"] for m in got] == [1, 2, 3]

    # The sweep deletes the rows in its claim's transaction after publishing
    # them: the reader may have them a moment before that commits.
    async def _swept() -> bool:
        return await _outbox_rows(srv, conv) == []

    await wait_until(_swept, timeout=5)


async def test_a_process_that_cannot_publish_wakes_the_other_relays(
    nursery, postgres, redis_server, connect, conv
):
    """Redis unreachable from one process only: another process's relay, woken by
    NOTIFY, publishes its commits long before they are ``claim_after`` old."""
    cfg = make_config(postgres, redis_server, relay={"claim_after": 60, "poll_interval": 30})
    cut_off = await nursery.start(serve, cfg)
    healthy = await nursery.start(serve, cfg)
    await _swept_clean(cut_off)
    await _swept_clean(healthy)
    reader = await connect(healthy, "reader")
    await reader.subscribe(conv)
    writer = await connect(cut_off, "writer")
    cut_off.chaos.break_for("redis", math.inf)
    for k in range(3):
        ack = await writer.send_message(conv, f"m{k}")
        assert ack["type"] == "ack"
    got = await reader.messages(conv, 3, timeout=10)
    assert [m["seq"] for m in got] == [1, 2, 3]
    # Some may have arrived by gap fill (the feed reads a missing seq from Postgres),
    # but only the healthy process's sweep, woken by NOTIFY, can have published.
    assert healthy.engine.relay.published >= 1


async def test_a_commit_does_not_wait_for_rows_a_relay_holds(server, connect, conv):
    """The next commit deletes published rows with SKIP LOCKED: a row locked by a
    relay mid-publish (up to the Redis deadline) never delays an ack."""
    await _swept_clean(server)
    writer = await connect(server, "writer")
    # Past the committer, so nobody publishes m0: its row stays in the outbox.
    await server.log.commit([NewMessage(conv, "m0", "writer", "hi")], [], False)
    (row,) = await _outbox_rows(server, conv)
    locked = trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def hold(pool):
        async with pool.acquire() as con, con.transaction():
            await con.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE", row["id"])
            # The asyncio side may be another thread (the thread bridge).
            token.run_sync_soon(locked.set)
            await asyncio.sleep(4)

    async with trio.open_nursery() as n:
        n.start_soon(lambda: server.log.bridge.postgres(hold, server.log.pool, deadline=10))
        await locked.wait()
        server.engine.committer.mark_published([row["id"]])
        with trio.fail_after(2):
            ack = await writer.send_message(conv, "m1")
        assert ack["seq"] == 2
        assert row in await _outbox_rows(server, conv), "the held row was skipped"
    # Unlocked, it is deleted by the next commit (or the committer's idle flush).
    server.engine.committer.mark_published([row["id"]])

    async def gone():
        return row not in await _outbox_rows(server, conv)

    await wait_until(gone, timeout=5)


async def test_the_relay_vacuums_the_outbox(nursery, postgres, redis_server, connect, conv):
    srv = await nursery.start(
        serve, make_config(postgres, redis_server, relay={"vacuum_every": 5, "poll_interval": 0.2})
    )

    async def vacuum_count():
        (row,) = await sql(
            srv, "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'outbox'"
        )
        return row["vacuum_count"]

    before = await vacuum_count()
    writer = await connect(srv, "writer")
    for k in range(10):
        await writer.send_message(conv, f"m{k}")

    async def vacuumed():
        return srv.engine.relay.vacuums >= 1 and await vacuum_count() > before

    await wait_until(vacuumed, timeout=10)


async def test_a_claim_that_cannot_finish_gives_its_rows_back(
    nursery, postgres, redis_server, conv
):
    # The relay leaves young rows alone for a minute: only this test claims them.
    srv = await nursery.start(
        serve, make_config(postgres, redis_server, relay={"claim_after": 60, "poll_interval": 30})
    )
    await _swept_clean(srv)
    for k in range(3):
        await srv.log.commit([NewMessage(conv, f"m{k}", "writer", "hi")], [], False)
    mine = {r["id"] for r in await _outbox_rows(srv, conv)}
    # Postgres refuses the claim's commit (the break switch): it cannot finish.
    with pytest.raises(StoreUnavailable):
        async with srv.log.claim_outbox(10, 0.0) as claimed:
            assert mine <= {e.id for e in claimed}
            srv.chaos.break_for("postgres", 60)
    srv.chaos.heal()
    # Its rows are not left locked by a connection nobody finishes: claimable
    # again. The claim's connection was terminated; Postgres ends its
    # transaction once it sees the socket gone, a moment later (a claim made
    # before that skips the rows still locked). Left open, it held them for good.
    given_back: set[int] = set()

    async def claimable():
        async with srv.log.claim_outbox(10, 0.0) as again:
            given_back.update(e.id for e in again)
        return mine <= given_back

    await wait_until(claimable, timeout=5)
