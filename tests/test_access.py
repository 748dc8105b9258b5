"""Who may do what, and how much: every op against every grant, memberships and
their revocation, token expiry and refresh, and the per-client limits. Engine
tests: each runs on the memory adapters (autojump clock) and on the real servers.
"""

from __future__ import annotations

import trio

from chatd.config import AuthConfig
from chatd.ports import ConnectionGone
from chatd.tokens import mint
from tests.engine_env import Env

SECRET = "k" * 64
JWT = {"mode": "jwt", "secret": SECRET, "membership_ttl": 0.5, "leeway": 0.0}


def _token(user: str, convs: dict[str, str] | None = None, **kw) -> str:
    return mint(AuthConfig(mode="jwt", secret=SECRET), user, convs=convs, **kw)


async def _op(client, conv: str, op: str) -> dict:
    """Run ``op`` on ``conv``; return the answer (or a synthetic ok for typing)."""
    frames = {
        "subscribe": ({"op": "subscribe", "conv": conv}, "snapshot"),
        "history": ({"op": "history", "conv": conv}, "history"),
        "send": ({"op": "send", "conv": conv, "id": f"{op}-{id(client)}", "text": "x"}, "ack"),
        "stop": ({"op": "stop", "conv": conv, "stream": "~none"}, "stopping"),
        "typing": ({"op": "typing", "conv": conv}, None),
    }
    frame, _ = frames[op]
    if op == "typing":
        # typing has no answer unless refused: ping behind it to know it was handled.
        await client.send({**frame, "ref": "t"})
        pong = await client.request({"op": "ping"}, "pong")
        refused = [f for f in client._unread if f.get("ref") == "t"]
        return refused[0] if refused else pong
    return await client.request(frame, "answer")


async def test_every_op_needs_its_grant(env: Env, clock):
    run = await env.start(auth=JWT)
    conv = env.conv()
    needs = {"subscribe": "r", "history": "r", "send": "w", "stop": "w", "typing": "w"}
    for grant in ("", "r", "w", "rw"):
        client = await run.connect(
            token=_token(f"u{grant or 'none'}", {conv: grant} if grant else {})
        )
        for op, need in needs.items():
            answer = await _op(client, conv, op)
            if need in grant:
                assert answer.get("code") != "forbidden", (grant, op, answer)
            else:
                assert answer["code"] == "forbidden", (grant, op, answer)
                assert conv in answer["message"] and answer["conv"] == conv
    # Nothing was written by a client without the write grant.
    rows = await run.engine.log.after(conv, 0, 100)
    assert {m["user"] for m in rows} == {"uw", "urw"}
    assert run.engine.refusals.counts["forbidden"] == 2 * 3 + 2 + 2  # none: 5, r: 3, w: 2


async def test_prefix_grants_and_the_operator_grant(env: Env, clock):
    run = await env.start(auth=JWT)
    team = env.conv("team")
    client = await run.connect(token=_token("ann", {f"{team}-*": "r"}))
    assert (await client.subscribe(f"{team}-a"))["type"] == "snapshot"
    denied = await client.request({"op": "subscribe", "conv": env.conv("other")}, "snapshot")
    assert denied["code"] == "forbidden"
    assert (await client.request({"op": "status"}, "status"))["code"] == "forbidden"
    ops = await run.connect(token=_token("ops", operator=True))
    assert (await ops.request({"op": "status"}, "status"))["type"] == "status"


async def test_a_membership_grants_and_its_revocation_ends_a_live_subscription(env: Env, clock):
    run = await env.start(auth=JWT)
    conv = env.conv()
    log = run.engine.log
    writer = await run.connect(token=_token("wendy", {conv: "rw"}))
    member = await run.connect(token=_token("mo"))  # no grant in the token
    assert (await member.request({"op": "subscribe", "conv": conv}, "x"))["code"] == "forbidden"
    await log.set_membership(conv, "mo", "r")
    await trio.sleep(0.6)  # the cached refusal ages out (membership_ttl)
    assert (await member.subscribe(conv))["type"] == "snapshot"
    await writer.send_message(conv, "m1")
    assert (await member.messages(conv, 1))[0]["id"] == "m1"
    assert (await member.send_message(conv, "no"))["code"] == "forbidden", "read only"
    await log.set_membership(conv, "mo", "")
    t0 = trio.current_time()
    gone = await member.expect("unsubscribed", conv=conv, timeout=5)
    assert gone["reason"] == "access revoked"
    assert trio.current_time() - t0 <= 0.5 + 0.5, "within membership_ttl (+ one round trip)"
    await writer.send_message(conv, "m2")
    await trio.sleep(0.3)
    assert not [f for f in member._unread if f.get("type") == "message"], "nothing after revocation"
    assert run.engine.counters.revoked_subscriptions == 1


async def test_expiry_closes_the_connection_and_refresh_extends_it(env: Env, clock):
    run = await env.start(auth=JWT)
    conv = env.conv()
    client = await run.connect(token=_token("ed", {conv: "rw"}, ttl=3))
    await client.subscribe(conv)
    refreshed = await client.request(
        {"op": "refresh", "token": _token("ed", {conv: "rw"}, ttl=6)}, "refreshed"
    )
    assert refreshed["type"] == "refreshed" and refreshed["expires_in"] >= 5
    other = await client.request({"op": "refresh", "token": _token("mallory", {conv: "rw"})}, "x")
    assert other["code"] == "unauthorized" and "mallory" in other["message"]
    await trio.sleep(4)  # past the first token's expiry: still open
    assert (await client.request({"op": "ping"}, "pong"))["type"] == "pong"
    assert await client.closed_code(timeout=10) == 4003
    assert run.engine.counters.expired_tokens == 1


async def test_a_refresh_with_narrower_grants_ends_what_they_no_longer_allow(env: Env, clock):
    run = await env.start(auth=JWT)
    a, b = env.conv("a"), env.conv("b")
    client = await run.connect(token=_token("nora", {a: "r", b: "r"}))
    await client.subscribe(a)
    await client.subscribe(b)
    await client.request({"op": "refresh", "token": _token("nora", {a: "r"})}, "refreshed")
    gone = await client.expect("unsubscribed", conv=b)
    assert gone["reason"] == "access revoked"


async def test_names_nobody_may_claim_are_refused_at_hello(env: Env, clock):
    run = await env.start()
    for name in ("assistant", "Assistant", "alice\u200b", "ali\u202ece", " alice"):
        client = await run.connect(user=None)
        answer = await client.request({"op": "hello", "user": name}, "welcome")
        assert answer["code"] == "bad_field" and "user" in answer["message"], answer
    client = await run.connect(user=None)
    token = await client.request({"op": "hello", "token": _token("x")}, "welcome")
    assert token["code"] == "unauthorized" and "anonymous mode" in token["message"]


async def test_the_send_rate_limit(env: Env, clock):
    run = await env.start(limits={"send_rate": 5.0, "send_burst": 5})
    conv = env.conv()
    client = await run.connect("fast")
    acks = [await client.send_message(conv, f"m{i}") for i in range(5)]
    assert all(a["type"] == "ack" for a in acks)
    limited = await client.send_message(conv, "m5")
    assert limited["code"] == "rate_limited" and limited["retryable"] is True
    assert 1 <= limited["retry_after_ms"] <= 200 and limited["id"] == "m5"
    await trio.sleep(limited["retry_after_ms"] / 1000)
    assert (await client.send_message(conv, "m5"))["seq"] == 6, "nothing was committed before"
    other = await run.connect("bystander")
    assert (await other.send_message(conv, "b"))["type"] == "ack", "the limit is per connection"


async def test_reply_limits_per_connection_and_per_user(env: Env, clock):
    run = await env.start(
        limits={"replies_per_connection": 1, "replies_per_user": 2}, model={"fake_token_rate": 5.0}
    )
    conv = env.conv()
    first = await run.connect("rita")
    await first.send_reply(conv, "q1", "#tokens=100")
    await first.send(
        {"op": "send", "conv": conv, "id": "q2", "text": "x", "reply": True, "ref": "z"}
    )
    assert "stream" not in await first.expect("ack", id="q2")
    err = await first.expect("error", ref="z")
    assert err["code"] == "too_many_replies" and "per connection" in err["message"]
    second = await run.connect("rita")
    await second.send_reply(conv, "q3", "#tokens=100")
    third = await run.connect("rita")
    await third.send(
        {"op": "send", "conv": conv, "id": "q4", "text": "x", "reply": True, "ref": "y"}
    )
    err = await third.expect("error", ref="y")
    assert err["code"] == "too_many_replies" and "per user" in err["message"]
    others = await run.connect("sam")
    assert "stream" in await others.send_reply(conv, "q5", "#tokens=3"), (
        "other users are not held up"
    )


async def test_a_dead_peer_is_dropped_by_the_keepalive(env: Env, clock):
    run = await env.start(limits={"ping_interval": 1.0, "ping_timeout": 1.0})
    conv = env.conv()
    alive = await run.connect("alive")
    dead = await run.connect("dead")
    await dead.subscribe(conv)
    dead.server_side.pongs = trio.Event()  # it stops answering pings
    with trio.fail_after(10):
        while run.engine.counters.dead_peers < 1:
            await trio.sleep(0.1)
    with trio.fail_after(5):
        while len(run.engine.sessions) != 1:
            await trio.sleep(0.05)
    assert conv not in run.engine.hub.feeds, "its subscription was released"
    await trio.sleep(2.5)
    assert (await alive.request({"op": "ping"}, "pong"))["type"] == "pong", "the living stay"


async def test_a_client_that_stops_reading_is_cut_off_at_the_write_deadline(env: Env, clock):
    run = await env.start(
        limits={"write_timeout": 1.0},
        server={"send_queue_frames": 100000, "send_queue_bytes": 1 << 30},
    )
    conv = env.conv()
    stuck = await run.connect("stuck", capacity=2)
    await stuck.subscribe(conv)
    writer = await run.connect("writer")
    for i in range(20):
        await writer.send_message(conv, f"m{i}")
    with trio.fail_after(10):
        while run.engine.counters.slow_disconnects < 1:
            await trio.sleep(0.1)
    try:
        while True:
            await stuck.recv(timeout=5)
    except ConnectionGone as exc:
        assert exc.code == 1006  # aborted: no close frame after a frame cut mid-write


async def test_a_client_over_its_frame_budget_is_held_back_not_answered_faster(env: Env, clock):
    run = await env.start(limits={"frame_rate": 10.0, "frame_burst": 10})
    client = await run.connect("chatty")
    t0 = trio.current_time()
    for _ in range(30):
        await client.send({"op": "ping"})
    pongs = [await client.expect("pong", timeout=10) for _ in range(30)]
    took = trio.current_time() - t0
    assert len(pongs) == 30, "nothing refused: only slowed down"
    assert took >= 1.8, f"30 frames at 10/s after a burst of 10 took {took:.2f}s"
    assert run.engine.counters.throttled >= 19


async def test_history_pages_cost_by_their_size(env: Env, clock):
    run = await env.start(limits={"read_rate": 1.0, "read_burst": 20})
    conv = env.conv()
    client = await run.connect("reader")
    big = await client.request({"op": "history", "conv": conv, "limit": 500}, "history")
    assert big["type"] == "history", "a 500-message page costs 10 of the 20"
    big = await client.request({"op": "history", "conv": conv, "limit": 500}, "history")
    assert big["type"] == "history"
    third = await client.request({"op": "history", "conv": conv, "limit": 500}, "history")
    assert third["code"] == "rate_limited" and third["retry_after_ms"] >= 9000
