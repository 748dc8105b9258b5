"""Durable sends, idempotency, seq ordering, fan-out and reconnect."""

from __future__ import annotations

import math

import trio

from chatd.adapters.postgres import message_dict
from chatd.protocol import encode
from chatd.records import NewMessage, message_event
from chatd.server import serve
from tests.conftest import sql, wait_until


async def test_ack_only_after_commit(server, connect, conv):
    alice = await connect(server)
    ack = await alice.send_message(conv, "m1", "hello world")
    assert ack == {"type": "ack", "conv": conv, "id": "m1", "seq": 1, "ref": ack["ref"]}
    rows = await sql(
        server,
        "SELECT seq, client_id, user_id, body, status FROM messages WHERE conv_id = $1",
        conv,
    )
    assert rows == [
        {
            "seq": 1,
            "client_id": "m1",
            "user_id": "alice",
            "body": "hello world",
            "status": "complete",
        }
    ]


async def test_message_and_outbox_row_commit_together(server, connect, conv):
    # With Redis broken the relay cannot publish, so the outbox row stays visible.
    server.chaos.break_for("redis", math.inf)
    alice = await connect(server)
    ack = await alice.send_message(conv, "m1")
    assert ack["type"] == "ack"
    rows = await sql(server, "SELECT seq FROM outbox WHERE conv_id = $1", conv)
    assert rows == [{"seq": 1}]
    server.chaos.heal()

    async def drained():
        return not await sql(server, "SELECT 1 FROM outbox WHERE conv_id = $1", conv)

    await wait_until(drained)


async def test_postgres_down_rejects_send_and_writes_nothing(server, connect, conv):
    alice = await connect(server)
    server.chaos.break_for("postgres", math.inf)
    reply = await alice.send_message(conv, "m1")
    assert reply["type"] == "error"
    assert reply["code"] == "unavailable" and reply["retryable"] is True
    server.chaos.heal()
    assert await sql(server, "SELECT 1 FROM messages WHERE conv_id = $1", conv) == []
    assert await sql(server, "SELECT 1 FROM outbox WHERE conv_id = $1", conv) == []
    # The retry after recovery commits exactly once.
    ack = await alice.send_message(conv, "m1")
    assert ack["type"] == "ack" and ack["seq"] == 1


async def test_idempotent_retry_returns_original_seq(server, connect, conv):
    alice = await connect(server)
    first = await alice.send_message(conv, "same-id", "one")
    await alice.send_message(conv, "other", "two")
    again = await alice.send_message(conv, "same-id", "one")
    assert first["seq"] == 1 and again["seq"] == 1
    assert again.get("duplicate") is True and "duplicate" not in first
    rows = await sql(
        server, "SELECT client_id, seq FROM messages WHERE conv_id = $1 ORDER BY seq", conv
    )
    assert rows == [{"client_id": "same-id", "seq": 1}, {"client_id": "other", "seq": 2}]


async def test_racing_duplicate_sends_collapse_to_one(server, connect, conv):
    clients = [await connect(server, f"u{i}") for i in range(5)]
    acks = []

    async def go(c):
        acks.append(await c.send_message(conv, "dup", "x"))

    async with trio.open_nursery() as n:
        for c in clients:
            n.start_soon(go, c)
    assert {a["seq"] for a in acks} == {1}
    assert sum(1 for a in acks if not a.get("duplicate")) == 1
    assert await sql(server, "SELECT count(*) AS n FROM messages WHERE conv_id = $1", conv) == [
        {"n": 1}
    ]


async def test_group_commit_batch_in_one_call(server, conv):
    """One batch with two conversations, an earlier send retried and a send repeated
    within the batch: seqs, duplicates and the outbox payloads (encoded partly by
    Postgres) are exactly what the rest of chatd produces."""
    server.chaos.break_for("redis", math.inf)  # keep the outbox rows for inspection
    other = conv + "-b"
    await server.engine.committer.commit(NewMessage(conv, "early", "alice", "first"))
    tricky = 'quote " backslash \\ newline \n tab \t nul-free \u2028 emoji \U0001f600 \u00e9'
    batch = [
        NewMessage(conv, "a1", "alice", tricky),
        NewMessage(other, "b1", 'bob "the" builder', "hi"),
        NewMessage(conv, "early", "alice", "retried, different text"),
        NewMessage(conv, "a2", "alice", "two", role="assistant", status="stopped"),
        NewMessage(conv, "a1", "alice", "repeated in the batch"),
        NewMessage(other, "b2", "bob", ""),
    ]
    results, events = await server.log.commit(batch, [], False)
    got = [(r.conv, r.client_id, r.seq, r.duplicate) for r in results]
    assert got == [
        (conv, "a1", 2, False),
        (other, "b1", 1, False),
        (conv, "early", 1, True),
        (conv, "a2", 3, False),
        (conv, "a1", 2, True),
        (other, "b2", 2, False),
    ]
    assert results[2].message["text"] == "first", "a duplicate reports the original"
    assert results[4].message["text"] == tricky
    rows = await sql(
        server,
        "SELECT m.conv_id, m.seq, m.client_id, m.user_id, m.role, m.status, m.body, "
        "m.created_at, o.id AS outbox_id, o.payload FROM messages m "
        "JOIN outbox o ON o.conv_id = m.conv_id AND o.seq = m.seq "
        "WHERE m.conv_id = ANY($1) AND m.client_id <> 'early' ORDER BY o.id",
        [conv, other],
    )
    assert [(r["conv_id"], r["seq"]) for r in rows] == sorted(
        [(conv, 2), (conv, 3), (other, 1), (other, 2)]
    ), "outbox ids follow seq within a conversation"
    assert [(e.id, e.conv, e.payload) for e in events] == [
        (r["outbox_id"], r["conv_id"], r["payload"])
        for r in sorted(rows, key=lambda r: [c.client_id for c in batch].index(r["client_id"]))
    ], "the new outbox rows come back in send order, duplicates without one"
    by_key = {(r.conv, r.client_id): r for r in results if not r.duplicate}
    for r in rows:
        expected = message_event(r["conv_id"], message_dict(r))
        assert r["payload"] == encode(expected)
        assert by_key[(r["conv_id"], r["client_id"])].message == message_dict(r)
    heads = await sql(
        server, "SELECT id, head FROM conversations WHERE id = ANY($1) ORDER BY id", [conv, other]
    )
    assert heads == sorted(
        [{"id": conv, "head": 3}, {"id": other, "head": 2}], key=lambda h: h["id"]
    )
    server.chaos.heal()


async def test_gapless_seqs_under_concurrent_senders(server, connect, conv):
    senders, per = 8, 25
    clients = [await connect(server, f"user{i}") for i in range(senders)]
    acked: dict[int, list[int]] = {}

    async def blast(i, c):
        # Pipelined: all sends go out before any ack is read.
        for k in range(per):
            await c.send({"op": "send", "conv": conv, "id": f"{i}-{k}", "text": f"m{k}"})
        acks = [await c.expect("ack", conv=conv) for _ in range(per)]
        acked[i] = [a["seq"] for a in sorted(acks, key=lambda a: int(a["id"].split("-")[1]))]

    async with trio.open_nursery() as n:
        for i, c in enumerate(clients):
            n.start_soon(blast, i, c)
    all_seqs = sorted(s for seqs in acked.values() for s in seqs)
    assert all_seqs == list(range(1, senders * per + 1))
    for seqs in acked.values():
        assert seqs == sorted(seqs), "one client's pipelined sends keep their order"
    rows = await sql(server, "SELECT seq FROM messages WHERE conv_id = $1 ORDER BY seq", conv)
    assert [r["seq"] for r in rows] == list(range(1, senders * per + 1))
    head = await sql(server, "SELECT head FROM conversations WHERE id = $1", conv)
    assert head == [{"head": senders * per}]
    assert server.engine.committer.batches < server.engine.committer.committed, (
        "group commit batched some sends"
    )


async def test_fan_out_to_several_subscribers(server, connect, conv):
    subs = [await connect(server, f"s{i}") for i in range(3)]
    for s in subs:
        snap = await s.subscribe(conv)
        assert snap["messages"] == [] and snap["head"] == 0
    sender = await connect(server, "bob")
    for k in range(20):
        await sender.send_message(conv, f"m{k}", f"text {k}")
    for s in subs:
        got = await s.messages(conv, 20)
        assert [m["seq"] for m in got] == list(range(1, 21))
        assert [m["text"] for m in got] == [f"text {k}" for k in range(20)]
        assert (
            got[0]["user"] == "bob" and got[0]["role"] == "user" and isinstance(got[0]["ts"], int)
        )
    # Exactly once: nothing more arrives.
    await trio.sleep(0.3)
    for s in subs:
        extra = [f for f in s._unread if f.get("type") == "message"]
        assert extra == []


async def test_fan_out_across_two_instances(nursery, config, connect, conv):
    a = await nursery.start(serve, config)
    b = await nursery.start(serve, config)
    on_a = await connect(a, "alice")
    on_b = await connect(b, "bob")
    await on_a.subscribe(conv)
    await on_b.subscribe(conv)
    await on_a.send_message(conv, "from-a", "hi from a")
    await on_b.send_message(conv, "from-b", "hi from b")
    for c in (on_a, on_b):
        got = await c.messages(conv, 2)
        assert [(m["seq"], m["id"]) for m in got] == [(1, "from-a"), (2, "from-b")]


async def test_reconnect_with_after_gets_exactly_the_missed(server, connect, conv):
    writer = await connect(server, "w")
    for k in range(5):
        await writer.send_message(conv, f"a{k}")
    reader = await connect(server, "r")
    snap = await reader.subscribe(conv)
    assert [m["seq"] for m in snap["messages"]] == [1, 2, 3, 4, 5]
    await reader.close()
    for k in range(7):
        await writer.send_message(conv, f"b{k}")
    again = await connect(server, "r")
    snap = await again.subscribe(conv, after=5)
    assert snap["recovered"] is True and snap["head"] == 12
    assert [m["seq"] for m in snap["messages"]] == list(range(6, 13))
    await writer.send_message(conv, "live")
    live = await again.messages(conv, 1)
    assert live[0]["seq"] == 13 and live[0]["id"] == "live"


async def test_subscribe_without_after_gets_latest_n(
    nursery, postgres, redis_server, connect, conv
):
    from tests.conftest import make_config

    srv = await nursery.start(
        serve, make_config(postgres, redis_server, store={"snapshot_messages": 3})
    )
    w = await connect(srv, "w")
    for k in range(6):
        await w.send_message(conv, f"m{k}")
    snap = await (await connect(srv, "r")).subscribe(conv)
    assert [m["seq"] for m in snap["messages"]] == [4, 5, 6]
    assert snap["head"] == 6


async def test_too_far_behind_is_not_recovered(nursery, postgres, redis_server, connect, conv):
    from tests.conftest import make_config

    srv = await nursery.start(
        serve, make_config(postgres, redis_server, store={"snapshot_messages": 2, "max_catchup": 3})
    )
    w = await connect(srv, "w")
    for k in range(6):
        await w.send_message(conv, f"m{k}")
    snap = await (await connect(srv, "r")).subscribe(conv, after=1)
    assert snap["recovered"] is False
    assert [m["seq"] for m in snap["messages"]] == [5, 6]


async def test_history_pages_back(server, connect, conv):
    c = await connect(server)
    for k in range(7):
        await c.send_message(conv, f"m{k}")
    page = await c.request({"op": "history", "conv": conv, "limit": 3}, "history")
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7] and page["more"] is True
    page = await c.request({"op": "history", "conv": conv, "before": 5, "limit": 3}, "history")
    assert [m["seq"] for m in page["messages"]] == [2, 3, 4] and page["more"] is True
    page = await c.request({"op": "history", "conv": conv, "before": 2, "limit": 3}, "history")
    assert [m["seq"] for m in page["messages"]] == [1] and page["more"] is False


async def test_typing_is_ephemeral_and_reaches_others(server, connect, conv):
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    await alice.subscribe(conv)
    await bob.subscribe(conv)
    await alice.send({"op": "typing", "conv": conv})
    t = await bob.expect("typing", conv=conv)
    assert t == {"type": "typing", "conv": conv, "user": "alice"}
    assert await sql(server, "SELECT 1 FROM messages WHERE conv_id = $1", conv) == []
    await trio.sleep(0.2)
    assert not [f for f in alice._unread if f.get("type") == "typing"]


async def test_unsubscribe_stops_delivery(server, connect, conv):
    r = await connect(server, "r")
    w = await connect(server, "w")
    await r.subscribe(conv)
    reply = await r.request({"op": "unsubscribe", "conv": conv}, "unsubscribed")
    assert reply["type"] == "unsubscribed"
    await w.send_message(conv, "m1")
    await trio.sleep(0.3)
    assert not [f for f in r._unread if f.get("type") == "message"]
    again = await r.request({"op": "unsubscribe", "conv": conv}, "error")
    assert again["code"] == "not_subscribed"


async def test_status_reports_health_and_outbox(server, connect):
    c = await connect(server, "ops")  # an anonymous operator in the test config
    st = await c.request({"op": "status"}, "status")
    assert st["postgres"] == "ok" and st["redis"] == "ok"
    assert isinstance(st["outbox_rows"], int)
    other = await connect(server, "alice")
    denied = await other.request({"op": "status"}, "status")
    assert denied["code"] == "forbidden", "status is for operators"
