"""The Transport port's contract, against the memory twin and against Redis alike."""

from __future__ import annotations

import uuid

import orjson
import pytest
import trio

from chatd.adapters.redis_transport import RedisTransport
from chatd.errors import BusUnavailable
from chatd.records import BusMessage, LaneOp


def _conv() -> str:
    return f"k-{uuid.uuid4().hex[:10]}"


async def _until(transport, predicate, seconds: float = 3.0) -> list[BusMessage]:
    """Receive until ``predicate(everything so far)`` holds."""
    got: list[BusMessage] = []
    with trio.fail_after(seconds):
        while not predicate(got):
            got += await transport.receive(0.2)
    return got


async def _subscribed(transport, conv: str) -> None:
    transport.want(conv)
    await _until(transport, lambda got: any(m.kind == "subscribe" and m.conv == conv for m in got))


async def test_a_subscription_is_confirmed_then_receives_its_conversation_only(transports):
    t, other, _ = transports
    mine, theirs = _conv(), _conv()
    await _subscribed(t, mine)
    await other.publish_events([(mine, '{"n":1}'), (theirs, '{"n":9}'), (mine, '{"n":2}')])
    got = await _until(t, lambda got: any(m.kind == "message" for m in got))
    msgs = [m for m in got if m.kind == "message"]
    # One message per conversation per call, its events a line each, in order.
    assert msgs == [BusMessage("message", mine, '{"n":1}\n{"n":2}')]
    await other.publish(mine, '{"typing":true}')
    got = await _until(t, lambda got: bool(got))
    assert got == [BusMessage("message", mine, '{"typing":true}')]


async def test_at_most_once_and_unsubscribing(transports):
    t, other, _ = transports
    c = _conv()
    await other.publish(c, '{"before":1}')  # nobody listens: gone for good
    await _subscribed(t, c)
    assert await t.receive(0.2) == []
    t.unwant(c)
    assert await t.receive(0.1) == []  # applies the unsubscribe
    await other.publish(c, '{"after":1}')
    assert await t.receive(0.3) == []


async def test_control_messages_reach_every_process(transports):
    t, other, _ = transports
    await _subscribed(t, _conv())
    await other.publish_control('{"op":"stop"}')
    got = await _until(t, lambda got: any(m.kind == "control" for m in got))
    assert [m for m in got if m.kind == "control"] == [BusMessage("control", "", '{"op":"stop"}')]


def _op(conv, stream, parts, upto, expect, text, frames=(), meta='{"reply_to":1}'):
    return LaneOp(conv, stream, expect, text, parts, upto, meta, tuple(frames))


async def test_the_lane_extends_partials_atomically_and_publishes_frames(transports):
    t, other, _ = transports
    c = _conv()
    await _subscribed(other, c)
    parts = ["héllo", " wörld"]
    sizes = await t.lane([_op(c, "~s1", parts, 1, 0, "héllo", ['{"d":1}'])], 60)
    assert sizes == [len(b"h\xc3\xa9llo")]
    sizes = await t.lane([_op(c, "~s1", parts, 2, sizes[0], " wörld", ['{"d":2}'])], 60)
    assert sizes == [len("héllo wörld".encode())]
    (inflight,) = (await t.read_streams([c]))[0]
    assert (inflight.stream, inflight.meta, inflight.text) == (
        "~s1",
        {"reply_to": 1},
        "héllo wörld",
    )
    assert await t.read_partial(c, "~s1") == "héllo wörld"
    assert await t.stream_exists(c, "~s1")
    got = await _until(other, lambda got: len(got) >= 2)
    assert [m.data for m in got] == ['{"d":1}', '{"d":2}']
    # The caller's idea of the partial is wrong (Redis restarted, say): rewritten whole.
    sizes = await t.lane([_op(c, "~s1", [*parts, "!"], 3, 3, "!")], 60)
    assert sizes == [len("héllo wörld!".encode())]
    assert await t.read_partial(c, "~s1") == "héllo wörld!"
    # An ending op deletes the partial and the metadata, then publishes the end.
    sizes = await t.lane([_op(c, "~s1", parts, 2, sizes[0], "", ['{"end":1}'], meta="")], 60)
    assert sizes == [0]
    assert (await t.read_streams([c]))[0] == []
    assert await t.read_partial(c, "~s1") is None
    assert not await t.stream_exists(c, "~s1")
    got = await _until(other, lambda got: bool(got))
    assert [m.data for m in got] == ['{"end":1}']


async def test_a_seized_reply_takes_no_more_from_its_old_owner(transports):
    """Takeover fences the transport: after ``seize_partial`` the old owner's lane
    ops are refused (-2, nothing published), except the one that ends the reply."""
    t, other, _ = transports
    c = _conv()
    await _subscribed(other, c)
    sizes = await t.lane([_op(c, "~z", ["abc"], 1, 0, "abc", ['{"d":1}'])], 60)
    assert await other.seize_partial(c, "~z", 60) == "abc"
    assert await other.seize_partial(c, "~none", 60) is None
    refused = await t.lane([_op(c, "~z", ["abc", "def"], 2, sizes[0], "def", ['{"d":2}'])], 60)
    assert refused == [-2]
    rewrite = await t.lane([_op(c, "~z", ["abc", "def"], 2, -1, "abcdef", ['{"d":3}'])], 60)
    assert rewrite == [-2], "not by rewriting it whole either"
    assert await t.read_partial(c, "~z") == "abc"
    # Its end (by the taker, or a late duplicate) still goes through.
    assert await other.lane([_op(c, "~z", ["abc"], 1, -1, "", ['{"end":1}'], meta="")], 60) == [0]
    got = await _until(other, lambda got: len(got) >= 2)
    assert [m.data for m in got] == ['{"d":1}', '{"end":1}']
    assert (await t.read_streams([c]))[0] == []


async def _forget_scripts(t) -> None:
    """Redis forgets every script it was sent (as after a restart); the memory
    twin has none to forget."""
    if isinstance(t, RedisTransport):
        await t.bridge.redis(lambda client: client.script_flush(), t.client)


async def test_the_lane_and_stream_reads_survive_redis_forgetting_their_scripts(transports):
    """The scripts go by their SHA1; when Redis lacks one, it is loaded and the
    calls it refused are run again, once each: nothing is lost or doubled."""
    t, other, _ = transports
    c = _conv()
    await _subscribed(other, c)
    await _forget_scripts(t)
    a = _op(c, "~f", ["one"], 1, 0, "one", ['{"d":1}'])
    b = _op(c, "~g", ["two"], 1, -1, "two", ['{"d":2}'])
    assert await t.lane([a, b], 60) == [3, 3]
    await _forget_scripts(t)
    assert await t.lane([_op(c, "~f", ["one", "!"], 2, 3, "!", ['{"d":3}'])], 60) == [4]
    await _forget_scripts(t)
    texts = {f.stream: f.text for f in (await t.read_streams([c, _conv()]))[0]}
    assert texts == {"~f": "one!", "~g": "two"}
    got = await _until(other, lambda got: len(got) >= 3)
    assert sorted(m.data for m in got) == ['{"d":1}', '{"d":2}', '{"d":3}']
    await trio.sleep(0.2)
    assert len(got + await other.receive(0.1)) == 3, "each frame published once"


async def test_lane_metadata_of_several_replies(transports):
    t, _, _ = transports
    c = _conv()
    meta = orjson.dumps({"reply_to": 7, "user": "assistant"}).decode()
    await t.lane(
        [
            _op(c, "~a", ["one"], 1, 0, "one", meta=meta),
            _op(c, "~b", ["two"], 1, -1, "two", meta=meta),
        ],
        60,
    )
    streams = sorted((await t.read_streams([c]))[0], key=lambda f: f.stream)
    assert [(f.stream, f.text, f.meta["reply_to"]) for f in streams] == [
        ("~a", "one", 7),
        ("~b", "two", 7),
    ]


async def test_partials_expire(transports):
    t, _, _ = transports
    c = _conv()
    await t.lane([_op(c, "~s", ["x"], 1, 0, "x")], 1)
    assert await t.read_partial(c, "~s") == "x"
    await trio.sleep(1.3)
    assert await t.read_partial(c, "~s") is None
    assert (await t.read_streams([c]))[0] == []


async def test_the_chaos_gate_breaks_calls(transports):
    t, _, chaos = transports
    chaos.break_for("redis", 30)
    with pytest.raises(BusUnavailable, match="chaos"):
        await t.publish(_conv(), "{}")
    with pytest.raises(BusUnavailable):
        await t.receive(0.1)
    chaos.heal()
    assert await t.ping()
