"""Regression tests for the two commit-path bugs of issue 13 (both reproduced on the old code).

1. A reply-requesting send that commits while the server shuts down crashed
   ``serve()`` (``Nursery is closed to new arrivals``) and was never answered.
2. A commit batch retried one message at a time after a bad message ran out
   of its bounded shield mid-loop: the rest of the batch was never answered.
"""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed

from chatd.server import serve
from tests.conftest import make_config


async def _answers(client, want: int, timeout: float) -> list[dict]:
    """Read frames until ``want`` answers with a ref arrived (or the connection closed)."""
    got: list[dict] = []
    with trio.move_on_after(timeout):
        try:
            while len(got) < want:
                frame = json.loads(await client.ws.get_message())
                if "ref" in frame:
                    got.append(frame)
        except ConnectionClosed:
            pass
    return got


async def test_reply_send_committing_during_shutdown_is_answered_and_serve_exits_cleanly(
    nursery, postgres, redis_server, connect, conv
):
    cfg = make_config(postgres, redis_server, model={"fake_token_rate": 50.0})
    outcome: dict[str, object] = {}

    async def run_server(task_status=trio.TASK_STATUS_IGNORED):
        try:
            with trio.CancelScope() as outcome["scope"]:
                await serve(cfg, task_status=task_status)
            outcome["result"] = "returned"
        except BaseException as exc:  # what escaped serve() is the finding
            outcome["result"] = exc

    srv = await nursery.start(run_server)
    alice = await connect(srv, "alice")
    srv.chaos.break_for("postgres", 30, latency=0.5)
    await alice.send(
        {"op": "send", "conv": conv, "id": "q1", "text": "hi", "reply": True, "ref": "s1"}
    )
    await trio.sleep(0.1)
    outcome["scope"].cancel()  # type: ignore[union-attr]
    answers = await _answers(alice, 1, timeout=10)
    with trio.fail_after(10):
        while "result" not in outcome:
            await trio.sleep(0.01)
    assert outcome["result"] == "returned", f"serve() raised {outcome['result']!r}"
    assert len(answers) == 1, "the send was never answered"
    (answer,) = answers
    assert answer["type"] == "ack" or (
        answer["type"] == "error" and answer["code"] == "unavailable" and answer["retryable"]
    ), answer


async def test_every_send_of_a_batch_with_a_bad_message_is_answered(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(serve, make_config(postgres, redis_server))
    alice = await connect(srv, "alice")
    srv.chaos.break_for("postgres", 60, latency=1.0)
    # A first send keeps the committer busy for a second, so the next six queue
    # up and commit as one batch.
    await alice.send({"op": "send", "conv": conv, "id": "first", "text": "x", "ref": "first"})
    await trio.sleep(0.2)
    texts = ["nul \u0000 byte", "two", "three", "four", "five", "six"]
    for i, text in enumerate(texts):
        await alice.send({"op": "send", "conv": conv, "id": f"m{i}", "text": text, "ref": i})
    answers = await _answers(alice, len(texts) + 1, timeout=30)
    srv.chaos.heal()
    assert sorted(str(a["ref"]) for a in answers) == sorted(
        ["first", *map(str, range(len(texts)))]
    ), answers
    by_ref = {a["ref"]: a for a in answers}
    assert by_ref[0]["type"] == "error", by_ref[0]
    for i in range(1, len(texts)):
        a = by_ref[i]
        assert a["type"] == "ack" or (a["code"] == "unavailable" and a["retryable"]), a
    # Nothing waits in the connection's in-flight budget: the next sends go through.
    for i in range(len(texts)):
        reply = await alice.send_message(conv, f"again{i}")
        assert reply["type"] == "ack", reply
