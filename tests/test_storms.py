"""Storms: many clients joining many conversations at once (a deploy reconnecting
everyone), on the memory adapters and on real Postgres and Redis.

Joins are served in batches by the loader (``chatd/engine/loader.py``): every
subscribe is answered with its snapshot, none ``unavailable``, while a
bystander's sends are still acked; when the clients leave, no feed, feed task
or transport subscription is left behind.
"""

from __future__ import annotations

import trio

from tests.engine_env import Env

CLIENTS = 20
SUBSCRIPTIONS = 50


def _tasks_named(prefix: str) -> int:
    """Tasks alive in this run whose name starts with ``prefix``."""
    found, todo = 0, [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        found += task.name.startswith(prefix)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


async def _storm(client, convs: list[str]) -> list[dict]:
    """Subscribe to every conversation at once; every answer, in arrival order."""
    for k, conv in enumerate(convs):
        await client.send({"op": "subscribe", "conv": conv, "ref": f"s{k}"})
    answers = []
    while len(answers) < len(convs):
        frame = await client.recv(timeout=60)
        if str(frame.get("ref", "")).startswith("s"):
            answers.append(frame)
    return answers


async def test_a_subscribe_storm_is_served_in_batches_and_leaves_nothing_behind(env: Env, clock):
    # Slow Postgres: every call takes 50 ms more, so unbatched joins would queue
    # for the pool behind each other, and batching is what keeps up.
    run = await env.start(store={"join_batch": 64, "join_loads": 2})
    engine = run.engine
    bystander = await run.connect("bystander")
    busy = env.conv("busy")
    await bystander.request({"op": "send", "conv": busy, "id": "before", "text": "x"}, "ack")
    clients = [await run.connect(f"u{i}") for i in range(CLIENTS)]
    convs = [env.conv(f"storm-{k}") for k in range(SUBSCRIPTIONS)]
    answers: dict[int, list[dict]] = {}
    acks: list[dict] = []
    run.chaos.break_for("postgres", 60, latency=0.05)

    async def _one(i: int) -> None:
        answers[i] = await _storm(clients[i], convs)

    async def _bystand() -> None:
        # Sends while the joins load: acked, never queued behind them.
        for k in range(5):
            ack = await bystander.request(
                {"op": "send", "conv": busy, "id": f"during-{k}", "text": "x"}, "ack", timeout=30
            )
            acks.append(ack)

    batches_before = engine.hub.loader.counters.batches
    async with trio.open_nursery() as nursery:
        for i in range(CLIENTS):
            nursery.start_soon(_one, i)
        nursery.start_soon(_bystand)
    run.chaos.heal()

    for i in range(CLIENTS):
        kinds = [a["type"] for a in answers[i]]
        assert kinds == ["snapshot"] * SUBSCRIPTIONS, [
            a for a in answers[i] if a["type"] != "snapshot"
        ][:3]
    assert [a["type"] for a in acks] == ["ack"] * 5
    # Every conversation was loaded once per batch it was in, never once per client.
    batches = engine.hub.loader.counters.batches - batches_before
    print(f"{CLIENTS * SUBSCRIPTIONS} joins in {batches} batches")
    assert batches < SUBSCRIPTIONS // 2, batches
    assert len(engine.hub.feeds) == SUBSCRIPTIONS

    for c in clients:
        await c.close()
    with trio.fail_after(30):
        while engine.hub.feeds or _tasks_named("feed "):
            await trio.sleep(0.05)
    assert engine.hub.loader.queued == 0
    assert not (engine.transport._wanted & set(convs)), "no transport subscription left"


async def test_joins_answered_unavailable_only_when_postgres_is_down(env: Env, clock):
    run = await env.start()
    client = await run.connect("u")
    convs = [env.conv(f"down-{k}") for k in range(10)]
    run.chaos.break_for("postgres", 60)
    answers = await _storm(client, convs)
    assert {(a["type"], a.get("code"), a.get("retryable")) for a in answers} == {
        ("error", "unavailable", True)
    }
    run.chaos.heal()
    # The failed joins were forgotten: subscribing again works.
    again = await _storm(client, convs)
    assert [a["type"] for a in again] == ["snapshot"] * len(convs)


# -- memory bounded per connection ---------------------------------------------


async def _catch_up(client, conv: str, after: int) -> tuple[list[int], dict, int]:
    """Page through a catch-up as docs/protocol.md says; the seqs got, the last
    snapshot, and how many pages it took."""
    seqs: list[int] = []
    pages = 0
    while True:
        snap = await client.subscribe(conv, after=after)
        assert snap["type"] == "snapshot", snap
        pages += 1
        seqs += [m["seq"] for m in snap["messages"]]
        if snap["messages"]:
            after = snap["messages"][-1]["seq"]
        if not snap.get("more"):
            return seqs, snap, pages


async def test_a_large_catch_up_comes_in_pages_exactly_once_in_order(env: Env, clock):
    run = await env.start(store={"page_bytes": 8000})
    conv = env.conv()
    writer = await run.connect("writer")
    text = "y" * 1000
    for k in range(30):
        await writer.request({"op": "send", "conv": conv, "id": f"m{k}", "text": text}, "ack")
    reader = await run.connect("reader")
    # A message committed between two pages is part of the catch-up too.
    first = await reader.subscribe(conv, after=0)
    assert first["more"] is True and len(first["messages"]) < 30
    assert sum(len(m["text"]) for m in first["messages"]) <= 8000
    await writer.request({"op": "send", "conv": conv, "id": "late", "text": "late"}, "ack")
    rest, last, pages = await _catch_up(reader, conv, first["messages"][-1]["seq"])
    seqs = [m["seq"] for m in first["messages"]] + rest
    assert seqs == list(range(1, 32)), "every missed message once, in order"
    assert pages >= 3 and last["head"] == 31
    # Live now: the next message arrives as an event, exactly once.
    await writer.request({"op": "send", "conv": conv, "id": "live", "text": "live"}, "ack")
    event = await reader.expect("message", conv=conv, timeout=10)
    assert event["seq"] == 32


async def test_history_pages_and_latest_snapshots_keep_to_the_byte_budget(env: Env, clock):
    run = await env.start(store={"page_bytes": 5000})
    conv = env.conv()
    writer = await run.connect("writer")
    for k in range(12):
        await writer.request({"op": "send", "conv": conv, "id": f"m{k}", "text": "z" * 1000}, "ack")
    reader = await run.connect("reader")
    snap = await reader.subscribe(conv)  # no cursor: the newest that fit
    assert [m["seq"] for m in snap["messages"]] == list(range(9, 13))
    page = await reader.request({"op": "history", "conv": conv, "limit": 50}, "history")
    assert [m["seq"] for m in page["messages"]] == list(range(9, 13)) and page["more"] is True
    before = page["messages"][0]["seq"]
    page = await reader.request(
        {"op": "history", "conv": conv, "limit": 50, "before": before}, "history"
    )
    assert [m["seq"] for m in page["messages"]] == list(range(5, 9))


async def test_a_stalled_client_is_dropped_and_its_memory_released(env: Env, clock):
    run = await env.start(limits={"write_timeout": 1.0})
    conv = env.conv()
    stuck = await run.connect("stuck", capacity=2)
    await stuck.subscribe(conv)
    writer = await run.connect("writer")
    for k in range(40):
        await writer.send_message(conv, f"m{k}", "w" * 2000)
    with trio.fail_after(30):
        while run.engine.counters.slow_disconnects < 1:
            await trio.sleep(0.1)
    # Its session, its subscription and its queued frames are gone.
    with trio.fail_after(10):
        while any(s.user == "stuck" for s in run.engine.sessions):
            await trio.sleep(0.05)
    feed = run.engine.hub.feeds.get(conv)
    assert feed is None or all(sub.client.user != "stuck" for sub in feed.subs.values())


async def test_clients_sharing_a_cursor_get_their_catch_up_from_one_read(env: Env, clock):
    # After a deploy most clients of a conversation hold the same cursor: each
    # distinct cursor is read once, and every client still gets exactly what
    # it missed.
    run = await env.start()
    conv = env.conv()
    writer = await run.connect("writer")
    for k in range(5):
        await writer.request({"op": "send", "conv": conv, "id": f"m{k}", "text": "x"}, "ack")
    # The conversation's feed is live and settled first (on real Redis its
    # subscription's confirmation queues a re-read, which would split the joins).
    await (await run.connect("early")).subscribe(conv)
    await trio.sleep(0.2)
    await run.engine.hub.feeds[conv].wait_idle()
    log = run.engine.log
    asked: list[tuple[int | None, ...]] = []
    read = log.snapshots

    async def counted(asks, *rest):
        asked.extend(a.afters for a in asks if a.conv == conv)
        return await read(asks, *rest)

    log.snapshots = counted
    # A slow first read (1 s: long enough on a loaded machine too) lets the
    # other joins queue up behind it, as in a storm.
    run.chaos.break_for("postgres", 60, latency=1.0)
    cursors = [2, 2, None, 4, 2, None, 4]
    clients = [await run.connect(f"r{i}") for i in range(len(cursors))]
    for i, (client, after) in enumerate(zip(clients, cursors, strict=True)):
        frame = {"op": "subscribe", "conv": conv, "ref": f"s{i}"}
        if after is not None:
            frame["after"] = after
        await client.send(frame)
    for client, after in zip(clients, cursors, strict=True):
        snap = await client.expect("snapshot", timeout=10)
        want = list(range(1 if after is None else after + 1, 6))
        assert [m["seq"] for m in snap["messages"]] == want, (after, snap)
    assert sum(len(a) for a in asked) < len(cursors), asked
    assert all(len(set(a)) == len(a) for a in asked), "no cursor read twice in one call"
