"""Bad input gets a clear error naming the problem; the connection stays usable."""

from __future__ import annotations

import json

import pytest
import trio

from chatd.server import serve
from tests.conftest import make_config

BAD_FRAMES = [
    ("{not json", "bad_json", "invalid JSON"),
    ("[1, 2]", "bad_frame", "JSON object"),
    ('"hello"', "bad_frame", "JSON object"),
    ('{"conv": "c"}', "bad_field", "missing field 'op'"),
    ('{"op": 7}', "bad_field", "'op' must be a string"),
    ('{"op": "fly"}', "unknown_op", "unknown op 'fly'"),
    ('{"op": "send", "id": "x", "text": "t"}', "bad_field", "missing field 'conv'"),
    ('{"op": "send", "conv": "c", "text": "t"}', "bad_field", "missing field 'id'"),
    ('{"op": "send", "conv": "c", "id": "x"}', "bad_field", "missing field 'text'"),
    ('{"op": "send", "conv": 5, "id": "x", "text": "t"}', "bad_field", "'conv' must be a string"),
    ('{"op": "send", "conv": "c", "id": "x", "text": 5}', "bad_field", "'text' must be a string"),
    ('{"op": "send", "conv": "c", "id": "x", "text": ""}', "bad_field", "'text' must not be empty"),
    (
        '{"op": "send", "conv": "no spaces", "id": "x", "text": "t"}',
        "bad_field",
        "field 'conv': a conversation id has",
    ),
    ('{"op": "subscribe", "conv": "c", "after": "3"}', "bad_field", "'after' must be an integer"),
    ('{"op": "subscribe", "conv": "c", "after": -1}', "bad_field", "'after' must be between"),
    ('{"op": "subscribe", "conv": "c", "after": true}', "bad_field", "'after' must be an integer"),
    ('{"op": "history", "conv": "c", "limit": 100000}', "bad_field", "'limit' must be between"),
    ('{"op": "hello", "user": "again"}', "already_authenticated", "already said hello"),
    ('{"op": "ping", "ref": {"x": 1}}', "bad_field", "'ref' must be"),
]


@pytest.mark.parametrize(("frame", "code", "words"), BAD_FRAMES)
async def test_bad_frame_gets_named_error_and_connection_survives(
    server, connect, frame, code, words
):
    c = await connect(server)
    await c.send(frame)
    err = await c.expect("error")
    assert err["code"] == code, err
    assert words in err["message"], err
    assert err["retryable"] is False
    pong = await c.request({"op": "ping"}, "pong")
    assert pong["type"] == "pong"


async def test_over_long_text_is_rejected(nursery, postgres, redis_server, connect, conv):
    srv = await nursery.start(
        serve, make_config(postgres, redis_server, server={"max_text_chars": 10})
    )
    c = await connect(srv)
    err = await c.send_message(conv, "m1", "x" * 11)
    assert (
        err["type"] == "error"
        and err["code"] == "too_long"
        and "'text' is too long" in err["message"]
    )
    ok = await c.send_message(conv, "m1", "x" * 10)
    assert ok["type"] == "ack"


async def test_ops_before_hello_are_refused(server, connect, conv):
    c = await connect(server, user=None)
    err = await c.request({"op": "subscribe", "conv": conv}, "error")
    assert err["code"] == "not_authenticated"
    await c.hello("alice")
    assert (await c.subscribe(conv))["type"] == "snapshot"


async def test_token_hello_is_refused_clearly(server, connect):
    c = await connect(server, user=None)
    err = await c.request({"op": "hello", "token": "abc"}, "error")
    assert err["code"] == "unauthorized" and "token" in err["message"]


async def test_binary_frame_is_refused(server, connect):
    c = await connect(server)
    await c.ws.send_message(b"\x00\x01")
    err = await c.expect("error")
    assert err["code"] == "bad_frame" and "binary" in err["message"]


async def test_oversized_frame_closes_with_1009_and_others_are_undisturbed(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(
        serve, make_config(postgres, redis_server, server={"max_frame_bytes": 2048})
    )
    bystander = await connect(srv, "bob")
    await bystander.subscribe(conv)
    big = await connect(srv, "mallory")
    await big.send(json.dumps({"op": "send", "conv": conv, "id": "x", "text": "y" * 5000}))
    assert await big.closed_code() == 1009
    ack = await bystander.send_message(conv, "fine")
    assert ack["type"] == "ack"
    assert (await bystander.messages(conv, 1))[0]["id"] == "fine"


async def test_hello_timeout_closes(nursery, postgres, redis_server, connect):
    srv = await nursery.start(
        serve, make_config(postgres, redis_server, server={"hello_timeout": 0.3})
    )
    c = await connect(srv, user=None)
    assert await c.closed_code() == 4001


async def test_garbage_storm_does_not_disturb_other_clients(server, connect, conv):
    good = await connect(server, "good")
    await good.subscribe(conv)
    bad = await connect(server, "bad")

    async def storm():
        for i in range(200):
            await bad.send(["{", "[]", '{"op":1}', '{"op":"send"}', "null"][i % 5])

    async with trio.open_nursery() as n:
        n.start_soon(storm)
        for k in range(10):
            assert (await good.send_message(conv, f"m{k}"))["type"] == "ack"
    got = await good.messages(conv, 10)
    assert [m["seq"] for m in got] == list(range(1, 11))
