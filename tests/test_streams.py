"""Streaming replies: the transient token lane, resume mid-stream, stop, failures."""

from __future__ import annotations

import trio

from chatd.server import serve
from tests.conftest import make_config, sql, wait_until


def _fast(postgres, redis_server, **model):
    return make_config(
        postgres,
        redis_server,
        model={"fake_tokens": 30, "fake_token_rate": 200.0, **model},
    )


async def _assistant_rows(srv, conv):
    return await sql(
        srv,
        "SELECT seq, client_id, role, status, body FROM messages "
        "WHERE conv_id = $1 AND role = 'assistant' ORDER BY seq",
        conv,
    )


async def test_deltas_concatenate_to_the_committed_text(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(serve, _fast(postgres, redis_server))
    viewer = await connect(srv, "viewer")
    await viewer.subscribe(conv)
    alice = await connect(srv, "alice")
    ack = await alice.send_reply(conv, "q1", "tell me something")
    stream = ack["stream"]
    start = await viewer.expect("stream.start", stream=stream)
    assert start["reply_to"] == ack["seq"] and start["role"] == "assistant"
    text, end = await viewer.follow(conv, stream)
    assert end["type"] == "stream.end" and end["status"] == "complete"
    # The durable message arrives as a normal event, with the stream's id.
    msgs = [m for m in await viewer.messages(conv, 2) if m["id"] == stream]
    assert msgs and msgs[0]["text"] == text and msgs[0]["seq"] == end["seq"]
    assert len(text.split(" ")) == 30
    rows = await _assistant_rows(srv, conv)
    assert [(r["client_id"], r["status"], r["body"]) for r in rows] == [(stream, "complete", text)]
    # The partial is gone from Redis once committed.
    assert (await srv.transport.read_streams([conv]))[0] == []
    # The sender is not subscribed: it got the ack, not the stream.
    assert not [f for f in alice.frames if f.get("type") == "delta"]


async def test_reconnect_mid_stream_resumes_at_its_offset(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(
        serve,
        make_config(postgres, redis_server, model={"fake_tokens": 60, "fake_token_rate": 60.0}),
    )
    alice = await connect(srv, "alice")
    await alice.subscribe(conv)
    ack = await alice.send_reply(conv, "q1", "a long one")
    stream = ack["stream"]
    results = []

    async def reconnecting_viewer(cut_after: int, with_offset: bool):
        c = await connect(srv, f"v{cut_after}")
        snap = await c.subscribe(conv)
        text = "".join(s["text"] for s in snap["streams"] if s["stream"] == stream)
        # Read some deltas live, then drop the connection.
        seen = 0
        while seen < cut_after:
            f = await c._next_stream_frame(conv, stream, 10)
            if f["type"] == "delta":
                assert f["offset"] == len(text)
                text += f["text"]
                seen += 1
            elif f["type"] != "stream.start":
                break
        await c.close()
        await trio.sleep(0.1)  # tokens keep coming while it is away
        c2 = await connect(srv, f"v{cut_after}b")
        frame = {"op": "subscribe", "conv": conv, "after": snap["head"]}
        if with_offset:
            frame["streams"] = {stream: len(text)}
        snap2 = await c2.request(frame, "snapshot")
        assert snap2["type"] == "snapshot"
        mine = [s for s in snap2["streams"] if s["stream"] == stream]
        committed = [m for m in snap2["messages"] if m["id"] == stream]
        if committed:  # it finished while we were away
            results.append((cut_after, committed[0]["text"]))
            return
        (s,) = mine
        if with_offset:
            assert s["offset"] == len(text), "resumes exactly at the client's offset"
            have = text + s["text"]
        else:
            assert s["offset"] == 0
            assert s["text"].startswith(text)
            have = s["text"]
        final, end = await c2.follow(conv, stream, have=have)
        assert end["type"] == "stream.end"
        results.append((cut_after, final))

    async with trio.open_nursery() as n:
        for cut in (1, 5, 15):
            n.start_soon(reconnecting_viewer, cut, True)
        n.start_soon(reconnecting_viewer, 8, False)
    rows = await _assistant_rows(srv, conv)
    assert len(rows) == 1
    assert len(results) == 4
    for cut, final in results:
        assert final == rows[0]["body"], f"viewer cut after {cut} deltas ended with different text"


async def test_resume_while_redis_cannot_say_what_is_in_flight(
    nursery, postgres, redis_server, connect, conv
):
    """A client resuming with its offset while Redis is unreachable gets a snapshot
    without the reply; once Redis is back the reply continues from the client's
    offset, never again from 0 (found by ``chatd bench reconnect``). The reply
    (2 s) outlives the outage and the pub/sub reconnect, so ``stream.end`` comes."""
    srv = await nursery.start(
        serve,
        make_config(postgres, redis_server, model={"fake_tokens": 120, "fake_token_rate": 60.0}),
    )
    alice = await connect(srv, "alice")
    stream = (await alice.send_reply(conv, "q1", "a long one"))["stream"]
    viewer = await connect(srv, "viewer")
    snap = await viewer.subscribe(conv)
    text = "".join(s["text"] for s in snap["streams"] if s["stream"] == stream)
    while len(text) < 10:
        f = await viewer._next_stream_frame(conv, stream, 10)
        if f["type"] == "delta":
            assert f["offset"] == len(text)
            text += f["text"]
    await viewer.close()

    srv.chaos.break_for("redis", 0.4)
    back = await connect(srv, "viewer")
    snap2 = await back.request(
        {"op": "subscribe", "conv": conv, "after": snap["head"], "streams": {stream: len(text)}},
        "snapshot",
    )
    assert snap2["type"] == "snapshot" and snap2["streams"] == [], "Redis could not be asked"
    final, end = await back.follow(conv, stream, have=text, timeout=15)
    assert end["type"] == "stream.end"
    rows = await _assistant_rows(srv, conv)
    assert [r["body"] for r in rows] == [final]


async def test_deltas_lost_before_the_end_are_filled_from_postgres(
    nursery, postgres, redis_server, connect, conv
):
    """Deltas lost on the way at the end of a reply leave no partial in Redis to
    fill from; the client still gets the whole text, from the committed message,
    before ``stream.end`` (the flake CI found in the Redis-outage resume test)."""
    srv = await nursery.start(serve, _fast(postgres, redis_server, fake_token_rate=100.0))
    viewer = await connect(srv, "viewer")
    await viewer.subscribe(conv)
    hub = srv.engine.hub
    route = hub._route_event
    lost = []

    def lose_late_deltas(feed, data):
        if feed.conv == conv and '"type":"delta"' in data and '"offset":0,' not in data:
            lost.append(data)  # as if Redis pub/sub had dropped it
            return
        route(feed, data)

    hub._route_event = lose_late_deltas
    alice = await connect(srv, "alice")
    stream = (await alice.send_reply(conv, "q1", "tell me something"))["stream"]
    fills = hub.counters.stream_fills
    final, end = await viewer.follow(conv, stream)
    assert lost, "the test lost no delta"
    assert end["type"] == "stream.end" and end["length"] == len(final)
    rows = await _assistant_rows(srv, conv)
    assert [r["body"] for r in rows] == [final]
    assert hub.counters.stream_fills == fills + 1


async def test_concurrent_streams_in_several_conversations(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(serve, _fast(postgres, redis_server))
    convs = [f"{conv}-{i}" for i in range(5)]
    viewers = []
    for c in convs:
        v = await connect(srv, f"viewer-{c}")
        await v.subscribe(c)
        viewers.append(v)
    sender = await connect(srv, "sender")
    acks = [await sender.send_reply(c, "q", f"question {i}") for i, c in enumerate(convs)]
    texts = {}

    async def watch(v, c, stream):
        texts[c] = (await v.follow(c, stream))[0]

    async with trio.open_nursery() as n:
        for v, c, ack in zip(viewers, convs, acks, strict=True):
            n.start_soon(watch, v, c, ack["stream"])
    for c, ack in zip(convs, acks, strict=True):
        rows = await _assistant_rows(srv, c)
        assert [(r["client_id"], r["body"]) for r in rows] == [(ack["stream"], texts[c])]
    assert len(set(texts.values())) > 1, "different prompts give different replies"


async def test_stop_commits_what_was_said_as_stopped(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(serve, _fast(postgres, redis_server))
    viewer = await connect(srv, "viewer")
    await viewer.subscribe(conv)
    alice = await connect(srv, "alice")
    ack = await alice.send_reply(conv, "q1", "go on forever #tokens=100000 #rate=50")
    stream = ack["stream"]
    text = ""
    while len(text.split(" ")) < 5:
        f = await viewer._next_stream_frame(conv, stream, 5)
        if f["type"] == "delta":
            text += f["text"]
    stopping = await alice.request({"op": "stop", "conv": conv, "stream": stream}, "stopping")
    assert stopping["type"] == "stopping", stopping
    final, end = await viewer.follow(conv, stream, have=text)
    assert end["type"] == "stream.end" and end["status"] == "stopped"
    rows = await _assistant_rows(srv, conv)
    assert [(r["status"], r["body"]) for r in rows] == [("stopped", final)]
    # Stopping it again: it is no longer generating anywhere.
    again = await alice.request({"op": "stop", "conv": conv, "stream": stream}, "stopping")
    assert again["type"] == "error" and again["code"] == "unknown_stream"


async def test_stop_reaches_a_stream_running_in_another_process(
    nursery, postgres, redis_server, connect, conv
):
    a = await nursery.start(serve, _fast(postgres, redis_server))
    b = await nursery.start(serve, _fast(postgres, redis_server))
    alice = await connect(a, "alice")
    await alice.subscribe(conv)
    ack = await alice.send_reply(conv, "q1", "#tokens=100000 #rate=50")
    await alice.expect("delta", stream=ack["stream"])
    bob = await connect(b, "bob")
    stopping = await bob.request({"op": "stop", "conv": conv, "stream": ack["stream"]}, "stopping")
    assert stopping["type"] == "stopping", stopping
    end = await alice.expect("stream.end", stream=ack["stream"])
    assert end["status"] == "stopped"


async def test_model_failure_discards_the_partial(nursery, postgres, redis_server, connect, conv):
    srv = await nursery.start(serve, _fast(postgres, redis_server))
    viewer = await connect(srv, "viewer")
    await viewer.subscribe(conv)
    alice = await connect(srv, "alice")
    ack = await alice.send_reply(conv, "q1", "this will break #fail@5")
    text, end = await viewer.follow(conv, ack["stream"])
    assert end["type"] == "stream.error" and end["code"] == "model_failed", end
    assert len(text.split(" ")) == 5
    assert await _assistant_rows(srv, conv) == [], "Postgres never holds an incomplete reply"
    assert (await srv.transport.read_streams([conv]))[0] == []
    assert srv.engine.replies.runner.failed == 1


async def test_redis_failing_mid_stream_still_commits(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(
        serve,
        make_config(postgres, redis_server, model={"fake_tokens": 40, "fake_token_rate": 40.0}),
    )
    viewer = await connect(srv, "viewer")
    await viewer.subscribe(conv)
    alice = await connect(srv, "alice")
    ack = await alice.send_reply(conv, "q1", "hello")
    stream = ack["stream"]
    await viewer.expect("delta", stream=stream)
    srv.chaos.break_for("redis", 0.6)  # tokens published now are gone
    # The model keeps generating and the reply commits to Postgres.
    await wait_until(lambda: _has_assistant(srv, conv), timeout=10)
    rows = await _assistant_rows(srv, conv)
    assert rows[0]["status"] == "complete" and len(rows[0]["body"].split(" ")) == 40
    assert srv.engine.replies.lane.failures > 0
    # After recovery the relay publishes the message: the bubble locks to it.
    msg = await viewer.expect("message", conv=conv, id=stream, timeout=10)
    assert msg["text"] == rows[0]["body"]
    # A reconnecting client gets it from the snapshot, with no stale partial.
    late = await connect(srv, "late")
    snap = await late.subscribe(conv)
    assert [m["text"] for m in snap["messages"] if m["id"] == stream] == [rows[0]["body"]]
    assert snap["streams"] == []


async def _has_assistant(srv, conv):
    return bool(await _assistant_rows(srv, conv))


async def test_stream_tasks_end_with_their_streams(nursery, postgres, redis_server, connect, conv):
    srv = await nursery.start(serve, _fast(postgres, redis_server))
    replies = srv.engine.replies
    assert replies.running == 0
    alice = await connect(srv, "alice")
    await alice.subscribe(conv)
    acks = [await alice.send_reply(conv, f"q{i}", f"q {i}") for i in range(4)]
    assert replies.running > 0
    ends = [await alice.expect("stream.end", stream=a["stream"]) for a in acks]
    assert all(e["status"] == "complete" for e in ends)
    await wait_until(_async(lambda: replies.running == 0), timeout=5)
    assert replies.active == {}


def _async(fn):
    async def _pred():
        return fn()

    return _pred


async def test_duplicate_send_does_not_start_a_second_reply(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(serve, _fast(postgres, redis_server))
    alice = await connect(srv, "alice")
    await alice.subscribe(conv)
    ack = await alice.send_reply(conv, "q1", "once")
    dup = await alice.request(
        {"op": "send", "conv": conv, "id": "q1", "text": "once", "reply": True}, "ack"
    )
    assert dup["duplicate"] is True and "stream" not in dup
    await alice.expect("stream.end", stream=ack["stream"])
    assert len(await _assistant_rows(srv, conv)) == 1


async def test_stream_protocol_errors(server, connect, conv):
    c = await connect(server, "alice")
    bad = await c.request({"op": "send", "conv": conv, "id": "~abc", "text": "x"}, "ack")
    assert bad["code"] == "bad_field" and "reserved" in bad["message"]
    bad = await c.request({"op": "send", "conv": conv, "id": "a", "text": "x", "reply": 1}, "ack")
    assert bad["code"] == "bad_field" and "'reply'" in bad["message"]
    bad = await c.request({"op": "stop", "conv": conv, "stream": "~nope"}, "stopping")
    assert bad["code"] == "unknown_stream"
    bad = await c.request({"op": "subscribe", "conv": conv, "streams": {"~a": -1}}, "snapshot")
    assert bad["code"] == "bad_field"
    bad = await c.request({"op": "subscribe", "conv": conv, "streams": [1]}, "snapshot")
    assert bad["code"] == "bad_field"
    assert (await c.request({"op": "ping"}, "pong"))["type"] == "pong"


async def test_too_many_streams_is_refused_after_the_ack(
    nursery, postgres, redis_server, connect, conv
):
    cfg = make_config(
        postgres, redis_server, streams={"max_streams": 1}, model={"fake_token_rate": 20.0}
    )
    srv = await nursery.start(serve, cfg)
    alice = await connect(srv, "alice")
    await alice.send_reply(conv, "q1", "#tokens=1000")
    await alice.send(
        {"op": "send", "conv": conv, "id": "q2", "text": "x", "reply": True, "ref": "z"}
    )
    ack = await alice.expect("ack", id="q2")
    assert "stream" not in ack
    err = await alice.expect("error", ref="z")
    assert err["code"] == "too_many_streams" and err["retryable"] is True


async def test_a_reply_cut_off_by_a_hard_stop_is_committed_interrupted(
    nursery, postgres, redis_server, connect, conv
):
    cfg = _fast(postgres, redis_server)
    box = {}

    async def doomed(task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as box["scope"]:
            await serve(cfg, task_status=task_status)
        box["done"] = True

    srv = await nursery.start(doomed)
    viewer_srv = await nursery.start(serve, cfg)
    viewer = await connect(viewer_srv, "viewer")
    await viewer.subscribe(conv)
    alice = await connect(srv, "alice")
    ack = await alice.send_reply(conv, "q1", "#tokens=100000 #rate=50")
    await viewer.expect("delta", stream=ack["stream"])
    with trio.fail_after(5):
        box["scope"].cancel()
        while not box.get("done"):
            await trio.sleep(0.01)
    assert srv.engine.replies.active == {}
    end = await viewer.expect("stream.end", stream=ack["stream"])
    assert end["status"] == "interrupted"
    rows = await _assistant_rows(viewer_srv, conv)
    assert [(r["client_id"], r["status"]) for r in rows] == [(ack["stream"], "interrupted")]
    assert len(rows[0]["body"]) == end["length"] > 0


async def test_reply_finishing_while_postgres_is_down_commits_after_recovery(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(serve, _fast(postgres, redis_server))
    viewer = await connect(srv, "viewer")
    await viewer.subscribe(conv)
    ack = await viewer.send_reply(conv, "q1", "#tokens=10 #rate=100")
    srv.chaos.break_for("postgres", 1.5)  # the reply ends (0.1 s) inside the outage
    end = await viewer.expect("stream.end", stream=ack["stream"], timeout=10)
    assert srv.engine.replies.runner.commit_retries > 0
    rows = await _assistant_rows(srv, conv)
    assert [(r["seq"], r["status"]) for r in rows] == [(end["seq"], "complete")]


async def test_reply_whose_commit_keeps_failing_ends_in_stream_error(
    nursery, postgres, redis_server, connect, conv
):
    cfg = make_config(
        postgres,
        redis_server,
        model={"fake_token_rate": 100.0},
        streams={"commit_timeout": 1.0},
    )
    srv = await nursery.start(serve, cfg)
    viewer = await connect(srv, "viewer")
    await viewer.subscribe(conv)
    ack = await viewer.send_reply(conv, "q1", "#tokens=5")
    srv.chaos.break_for("postgres", 5)
    err = await viewer.expect("stream.error", stream=ack["stream"], timeout=10)
    assert err["code"] == "commit_failed" and err["retryable"] is True
    srv.chaos.heal()
    assert await _assistant_rows(srv, conv) == [], "nothing half-written"
