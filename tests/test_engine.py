"""The engine's behaviours, run twice: on the memory adapters under an autojump
clock (milliseconds), and on the suite's real Postgres and Redis (real time).

Feeds (dedupe, gap fill, resync, mid-reply joins), the committer (batching,
outcomes, poison isolation), replies (lifecycle, stop, failure, commit through
an outage), the relay (sweep) and the orderly shutdown.
"""

from __future__ import annotations

import math

import trio

from chatd.errors import StoreError, StoreUnavailable
from chatd.ports import ConnectionGone
from chatd.protocol import encode
from chatd.records import NewMessage, message_event
from tests.engine_env import Env


async def _send(client, conv: str, mid: str, text: str = "hi") -> dict:
    return await client.request({"op": "send", "conv": conv, "id": mid, "text": text}, "ack")


# -- feeds --------------------------------------------------------------------


async def test_each_subscriber_gets_each_message_once_in_order(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    viewers = [await run.connect(f"v{i}") for i in range(3)]
    for v in viewers:
        await v.subscribe(conv)
    writer = await run.connect("w")
    acks = [await _send(writer, conv, f"m{k}", f"text {k}") for k in range(5)]
    assert [a["seq"] for a in acks] == [1, 2, 3, 4, 5]
    # The transport is at least once: the same events published again change nothing.
    engine = run.engine
    rows = await engine.log.after(conv, 0, 10)
    await engine.transport.publish_events(
        [(conv, encode(message_event(conv, m))) for m in rows[1:3]]
    )
    await _send(writer, conv, "m5")
    for v in viewers:
        got = await v.messages(conv, 6)
        assert [m["seq"] for m in got] == [1, 2, 3, 4, 5, 6]
        assert [m["text"] for m in got[:5]] == [f"text {k}" for k in range(5)]
        await trio.sleep(0.2)
        assert not [f for f in v._unread if f.get("type") == "message"], "no repeat"


async def test_a_gap_is_filled_from_the_log(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    reader = await run.connect("reader")
    await reader.subscribe(conv)
    writer = await run.connect("writer")
    await _send(writer, conv, "m1")
    await reader.messages(conv, 1)
    # Committed past the committer: its event is never published (lost in transit).
    await run.engine.log.commit([NewMessage(conv, "lost", "writer", "lost")], [], False)
    before = run.engine.hub.counters.gap_fills
    await _send(writer, conv, "m3")
    got = await reader.messages(conv, 2)
    assert [(m["seq"], m["id"]) for m in got] == [(2, "lost"), (3, "m3")]
    assert run.engine.hub.counters.gap_fills == before + 1


async def test_subscribers_resync_after_the_transport_fails(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    reader = await run.connect("reader")
    await reader.subscribe(conv)
    writer = await run.connect("writer")
    run.chaos.break_for("redis", 1.5)
    acks = [await _send(writer, conv, f"m{k}") for k in range(4)]
    assert [a["type"] for a in acks] == ["ack"] * 4, "the log is the truth: acked anyway"
    got = await reader.messages(conv, 4, timeout=20)
    assert [m["seq"] for m in got] == [1, 2, 3, 4]
    await trio.sleep(0.5)
    assert not [f for f in reader._unread if f.get("type") == "message"]


async def test_a_client_resubscribing_with_its_cursor_gets_exactly_what_it_missed(env: Env, clock):
    run = await env.start(store={"max_catchup": 100})
    conv = env.conv()
    writer = await run.connect("w")
    for k in range(3):
        await _send(writer, conv, f"a{k}")
    reader = await run.connect("r")
    snap = await reader.subscribe(conv)
    await reader.close()
    for k in range(4):
        await _send(writer, conv, f"b{k}")
    again = await run.connect("r")
    snap = await again.subscribe(conv, after=snap["head"])
    assert snap["recovered"] is True and [m["seq"] for m in snap["messages"]] == [4, 5, 6, 7]


async def test_joining_mid_reply_gets_the_partial_then_the_tail(env: Env, clock):
    run = await env.start(model={"fake_tokens": 40, "fake_token_rate": 40.0})
    conv = env.conv()
    asker = await run.connect("asker")
    ack = await asker.send_reply(conv, "q", "tell me")
    stream = ack["stream"]
    await trio.sleep(0.4)  # ~16 tokens in
    late = await run.connect("late")
    snap = await late.subscribe(conv)
    (inflight,) = [s for s in snap["streams"] if s["stream"] == stream]
    assert inflight["offset"] == 0 and inflight["text"], "the partial so far"
    text, end = await late.follow(conv, stream, have=inflight["text"], timeout=10)
    assert end["type"] == "stream.end" and end["length"] == len(text)
    (row,) = [m for m in await run.engine.log.after(conv, 0, 10) if m["id"] == stream]
    assert row["text"] == text, "partial + tail is exactly the committed reply"


# -- the committer ---------------------------------------------------------------


async def test_concurrent_sends_are_group_committed_and_each_answered(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    # A slow log: sends arriving during one commit form the next batch.
    run.chaos.break_for("postgres", 60, latency=0.05)
    clients = [await run.connect(f"u{i}") for i in range(4)]
    seqs: dict[int, list[int]] = {}

    async def blast(i: int, c) -> None:
        for k in range(10):
            await c.send({"op": "send", "conv": conv, "id": f"{i}-{k}", "text": "x"})
        acks = [await c.expect("ack", conv=conv, timeout=20) for _ in range(10)]
        seqs[i] = [a["seq"] for a in sorted(acks, key=lambda a: int(a["id"].split("-")[1]))]

    committer = run.engine.committer
    batches = committer.batches
    async with trio.open_nursery() as n:
        for i, c in enumerate(clients):
            n.start_soon(blast, i, c)
    assert sorted(s for v in seqs.values() for s in v) == list(range(1, 41))
    assert all(v == sorted(v) for v in seqs.values()), "one client's sends keep their order"
    assert committer.batches - batches < 40, "some sends shared a commit"


async def test_outcomes_duplicate_and_unavailable(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    c = await run.connect("alice")
    first = await _send(c, conv, "same", "one")
    again = await _send(c, conv, "same", "two")
    assert (first["seq"], again["seq"], again.get("duplicate")) == (1, 1, True)
    run.chaos.break_for("postgres", math.inf)
    down = await _send(c, conv, "later")
    assert down["type"] == "error" and down["code"] == "unavailable" and down["retryable"]
    run.chaos.heal()
    assert (await _send(c, conv, "later"))["seq"] == 2


async def _commit_batch_with_a_bad_message(run, conv: str, n: int, bad: int) -> dict:
    """Submit ``n`` messages behind a slow first commit, so they form one batch;
    message ``bad`` holds U+0000, which the log refuses (the protocol refuses it
    too: this plants it behind the protocol). Returns each one's outcome."""
    committer = run.engine.committer
    inbox, outcomes = trio.open_memory_channel(n + 1)
    await committer.submit(NewMessage(conv, "first", "u", "x"), "first", inbox)
    await trio.sleep(0.01)  # the first commit is under way; the rest queue behind it
    for i in range(n):
        text = "nul \x00 here" if i == bad else f"ok {i}"
        await committer.submit(NewMessage(conv, f"m{i}", "u", text), i, inbox)
    got = {}
    with trio.fail_after(30):
        while len(got) < n + 1:
            o = await outcomes.receive()
            got[o.tag] = o.result
    return got


async def test_a_bad_message_fails_alone_without_replaying_the_batch(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    committer = run.engine.committer
    run.chaos.break_for("postgres", 60, latency=0.05)
    n = 64
    got = await _commit_batch_with_a_bad_message(run, conv, n, bad=37)
    run.chaos.heal()
    assert isinstance(got[37], StoreError)
    assert all(not isinstance(got[i], Exception) for i in range(n) if i != 37)
    assert committer.isolated == 1
    # Halving: a handful of commits, not one per message.
    assert committer.batches <= 2 + 2 * math.ceil(math.log2(n)), committer.batches
    rows = await run.engine.log.after(conv, 0, 100)
    assert [m["seq"] for m in rows] == list(range(1, n + 1)), "gapless, the bad one absent"


async def test_every_message_is_answered_when_isolation_outlasts_its_bound(env: Env, clock):
    """The batch's bounded shield expires mid-isolation (each round trip takes 0.6 s,
    the bound is 1 s + 1 s): what it cut short is answered "unavailable, may or may not
    have committed", never left waiting."""
    run = await env.start(postgres={"command_timeout": 1.0})
    conv = env.conv()
    run.chaos.break_for("postgres", 60, latency=0.6)
    got = await _commit_batch_with_a_bad_message(run, conv, 8, bad=0)
    run.chaos.heal()
    unknown = [t for t, r in got.items() if isinstance(r, StoreUnavailable)]
    assert unknown, "the bound expired before isolation ended"
    assert all("may or may not have committed" in str(got[t]) for t in unknown)


# -- replies -------------------------------------------------------------------


async def test_a_reply_streams_then_commits_its_exact_text(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    viewer = await run.connect("viewer")
    await viewer.subscribe(conv)
    ack = await viewer.send_reply(conv, "q", "hello")
    stream = ack["stream"]
    start = await viewer.expect("stream.start", stream=stream)
    assert start["reply_to"] == ack["seq"] and start["role"] == "assistant"
    text, end = await viewer.follow(conv, stream)
    assert end == {
        "type": "stream.end",
        "conv": conv,
        "stream": stream,
        "seq": ack["seq"] + 1,
        "status": "complete",
        "length": len(text),
    }
    msg = await viewer.expect("message", id=stream)
    assert msg["text"] == text and len(text.split(" ")) == 20
    assert (await run.engine.transport.read_streams([conv]))[0] == []
    assert run.engine.replies.active == {}


async def test_stop_commits_what_was_said(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    viewer = await run.connect("viewer")
    await viewer.subscribe(conv)
    stream = (await viewer.send_reply(conv, "q", "#tokens=100000 #rate=50"))["stream"]
    await viewer.expect("delta", stream=stream)
    stopping = await viewer.request({"op": "stop", "conv": conv, "stream": stream}, "stopping")
    assert stopping["type"] == "stopping"
    end = await viewer.expect("stream.end", stream=stream)
    assert end["status"] == "stopped"
    (row,) = [m for m in await run.engine.log.after(conv, 0, 10) if m["id"] == stream]
    assert row["status"] == "stopped" and len(row["text"]) == end["length"]


async def test_a_failed_model_stores_nothing(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    viewer = await run.connect("viewer")
    await viewer.subscribe(conv)
    stream = (await viewer.send_reply(conv, "q", "#fail@4"))["stream"]
    text, end = await viewer.follow(conv, stream)
    assert end["type"] == "stream.error" and end["code"] == "model_failed"
    assert len(text.split(" ")) == 4
    assert [m["id"] for m in await run.engine.log.after(conv, 0, 10)] == ["q"]
    assert run.engine.replies.runner.failed == 1


async def test_a_reply_ending_during_a_log_outage_commits_after_it(env: Env, clock):
    run = await env.start()
    conv = env.conv()
    viewer = await run.connect("viewer")
    await viewer.subscribe(conv)
    stream = (await viewer.send_reply(conv, "q", "#tokens=10 #rate=100"))["stream"]
    run.chaos.break_for("postgres", 1.5)
    end = await viewer.expect("stream.end", stream=stream, timeout=10)
    assert run.engine.replies.runner.commit_retries > 0 and end["status"] == "complete"


async def test_the_reply_limit_is_answered_after_the_ack(env: Env, clock):
    run = await env.start(streams={"max_streams": 1})
    conv = env.conv()
    c = await run.connect("alice")
    await c.send_reply(conv, "q1", "#tokens=1000 #rate=20")
    await c.send({"op": "send", "conv": conv, "id": "q2", "text": "x", "reply": True, "ref": "z"})
    ack = await c.expect("ack", id="q2")
    assert "stream" not in ack
    err = await c.expect("error", ref="z")
    assert err["code"] == "too_many_streams" and err["retryable"] is True


async def test_a_retry_starts_the_reply_its_first_try_could_not(env: Env, clock):
    """The commit of a send asking for a reply runs, but its answer is lost: the
    client is told ``unavailable`` and retries with the same id, a duplicate.
    The reply the first try never started starts then (once); so does one
    refused at the reply limit when its send is retried."""
    run = await env.start(streams={"max_streams": 1})
    conv = env.conv()
    c = await run.connect("alice")
    await c.subscribe(conv)
    log = run.engine.committer._log
    commit = log.commit
    lost: list[str] = []

    async def _answer_lost(msgs, *args, **kwargs):
        result = await commit(msgs, *args, **kwargs)
        if not lost and any(m.client_id == "q" for m in msgs):
            lost.append("q")
            raise StoreUnavailable("postgres: connection lost after the statement ran")
        return result

    log.commit = _answer_lost
    frame = {"op": "send", "conv": conv, "id": "q", "text": "hello", "reply": True}
    first = await c.request(frame, "ack")
    assert first["type"] == "error" and first["code"] == "unavailable", first
    again = await c.request(frame, "ack")
    assert again["duplicate"] is True and again["seq"] == 1 and "stream" in again, again
    text, end = await c.follow(conv, again["stream"])
    assert end["status"] == "complete" and len(text.split(" ")) == 20
    third = await c.request(frame, "ack")
    assert third["duplicate"] is True and "stream" not in third, "one reply per message"
    # At the limit: acked without a reply; the retry after the slot frees starts it.
    busy = await c.send_reply(conv, "long", "#tokens=60 #rate=50")
    limited = {"op": "send", "conv": conv, "id": "q2", "text": "x", "reply": True, "ref": "z"}
    await c.send(limited)
    assert "stream" not in await c.expect("ack", id="q2")
    assert (await c.expect("error", ref="z"))["code"] == "too_many_streams"
    await c.follow(conv, busy["stream"])
    with trio.fail_after(10):
        while run.engine.replies.active:
            await trio.sleep(0.05)
    retried = await c.request({**limited, "ref": "y"}, "ack")
    assert retried["duplicate"] is True and "stream" in retried, retried
    assert run.engine.replies.owed.paid == 2


# -- the relay -------------------------------------------------------------------


async def test_rows_nobody_published_are_swept(env: Env, clock):
    run = await env.start(relay={"claim_after": 0.5, "poll_interval": 0.2})
    conv = env.conv()
    reader = await run.connect("reader")
    await reader.subscribe(conv)
    swept = run.engine.relay.published
    for k in range(3):
        await run.engine.log.commit([NewMessage(conv, f"m{k}", "w", "x")], [], False)
    got = await reader.messages(conv, 3, timeout=10)
    assert [m["seq"] for m in got] == [1, 2, 3]
    # They may reach the reader first by a resync (its subscription's confirmation
    # reads the log); the sweep publishes them all the same, once they are old enough.
    with trio.fail_after(10):
        while run.engine.relay.published < swept + 3:
            await trio.sleep(0.05)
    assert (await run.engine.log.stats())["outbox_rows"] == 0


async def test_another_process_sees_every_message(env: Env, clock):
    a = await env.start()
    b = await env.start()
    conv = env.conv()
    on_a, on_b = await a.connect("alice"), await b.connect("bob")
    await on_a.subscribe(conv)
    await on_b.subscribe(conv)
    await _send(on_a, conv, "from-a")
    await _send(on_b, conv, "from-b")
    for c in (on_a, on_b):
        got = await c.messages(conv, 2)
        assert [(m["seq"], m["id"]) for m in got] == [(1, "from-a"), (2, "from-b")]


# -- shutdown ------------------------------------------------------------------


async def test_an_orderly_shutdown_answers_every_send_and_ends_every_reply(env: Env, clock):
    run = await env.start(server={"shutdown_grace": 5.0}, model={"fake_token_rate": 20.0})
    conv = env.conv()
    viewer = await run.connect("viewer")
    await viewer.subscribe(conv)
    stream = (await viewer.send_reply(conv, "q", "#tokens=100000"))["stream"]
    await viewer.expect("delta", stream=stream)
    sender = await run.connect("sender")
    run.chaos.break_for("postgres", 60, latency=0.2)
    for i in range(40):
        await sender.send({"op": "send", "conv": conv, "id": f"s{i}", "text": "x", "ref": i})
    await trio.sleep(0.05)
    with trio.fail_after(10):
        await run.shutdown()
    await _drain(sender)  # every frame read lands in sender.frames
    answers = [f for f in sender.frames if isinstance(f.get("ref"), int)]
    assert sorted(a["ref"] for a in answers) == list(range(40)), "every send answered"
    assert all(a["type"] == "ack" for a in answers), "the committer ran until they were"
    end = await viewer.expect("stream.end", stream=stream)
    assert end["status"] == "interrupted", "what it said is kept, marked interrupted"
    (row,) = [m for m in await run.engine.log.after(conv, 0, 100) if m["id"] == stream]
    assert row["status"] == "interrupted" and len(row["text"]) == end["length"] > 0
    assert await viewer.closed_code() == 1001
    assert await sender.closed_code() == 1001


async def _drain(client) -> None:
    """Read until the server closes the connection."""
    with trio.move_on_after(5):
        try:
            while True:
                await client.recv(timeout=5)
        except ConnectionGone:
            pass


async def test_a_feed_closed_while_busy_does_not_hold_up_the_shutdown(env: Env, clock):
    # The drain waits for every feed to settle. A feed busy with a join (its
    # snapshot slow to load) whose clients all leave meanwhile is closed and
    # ends: it settled too, and the wait ends with it (it used to wait out
    # the shutdown's whole deadline).
    run = await env.start()
    conv = env.conv()
    first = await run.connect("first")
    await first.subscribe(conv)
    feed = run.engine.hub.feeds[conv]
    run.chaos.break_for("postgres", 60, latency=0.5)
    second = await run.connect("second")
    await second.send({"op": "subscribe", "conv": conv})
    with trio.fail_after(5):
        while feed._is_idle:  # the join is queued: the feed is busy
            await trio.sleep(0.01)
    async with trio.open_nursery() as nursery:
        settled = trio.Event()

        async def settle() -> None:
            await run.engine.hub.wait_settled()
            settled.set()

        nursery.start_soon(settle)
        await first.close()
        await second.close()
        with trio.fail_after(3):
            await settled.wait()
    assert conv not in run.engine.hub.feeds
