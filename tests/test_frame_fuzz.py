"""Hypothesis over client frames: any JSON, any op, any field types and sizes, in any
order, from clients holding different grants (jwt mode), on the memory engine.

After each program: no session crashed, no frame answered ``internal``, every
client still answers a ping (unless the server closed it with a code it
documents), no client received anything of a conversation it may not read,
and every message stored was written by a user allowed to write there.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.config import AuthConfig
from chatd.identity import Grants, merge_rights
from chatd.ports import ConnectionGone
from chatd.tokens import mint
from tests.engine_env import Env

SECRET = "f" * 64
CONVS = ["c0", "c1", "c2", "p-x", "p-y"]
#: user -> the grants its token carries; u2 also holds a membership (c2: write).
TOKENS = {"u0": {"c0": "rw", "p-*": "r"}, "u1": {"c1": "r", "c0": "w"}, "u2": {}}
MEMBERSHIPS = {("c2", "u2"): "w", ("c1", "u0"): "r"}
READ_FRAMES = ("message", "snapshot", "history", "stream.start", "delta", "stream.end", "typing")

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_conv = st.sampled_from(CONVS) | st.text(max_size=12)
_text = st.text(min_size=1, max_size=30) | st.just("nul \x00 byte") | st.just("x" * 20000)


_known = st.sampled_from(CONVS)
_id = st.sampled_from(["m1", "m2", "m3"])
_offsets = st.dictionaries(st.text(max_size=5), st.integers(-1, 50), max_size=3)

#: Frames of every op with every field present and of its type (the ones that reach
#: the access checks), over the conversations the grants are about.
_valid = st.one_of(
    st.builds(lambda c, a: {"op": "subscribe", "conv": c, "after": a}, _known, st.integers(0, 5)),
    st.builds(lambda c: {"op": "unsubscribe", "conv": c}, _known),
    st.builds(
        lambda c, i, t, r: {"op": "send", "conv": c, "id": i, "text": t, "reply": r},
        _known,
        _id,
        st.text(min_size=1, max_size=20),
        st.booleans(),
    ),
    st.builds(lambda c: {"op": "history", "conv": c}, _known),
    st.builds(lambda c: {"op": "typing", "conv": c}, _known),
    st.builds(lambda c: {"op": "stop", "conv": c, "stream": "~x"}, _known),
    st.just({"op": "status"}),
    st.just({"op": "ping"}),
)


def _junk_op(name: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Frames of op ``name`` whose fields may be missing or of any JSON type."""
    return st.fixed_dictionaries(
        {"op": st.just(name)}, optional={"ref": _json, **{k: v | _json for k, v in fields.items()}}
    )


_junk = st.one_of(
    _junk_op("subscribe", conv=_conv, after=st.integers(-5, 10), streams=_offsets),
    _junk_op("send", conv=_conv, id=st.text(max_size=10), text=_text, reply=st.booleans()),
    _junk_op("history", conv=_conv, before=st.integers(-1, 20), limit=st.integers(-1, 1000)),
    _junk_op("stop", conv=_conv, stream=st.text(max_size=10)),
    _junk_op("hello", user=_json, token=_json),
    _junk_op("refresh", token=st.text(max_size=20)),
    st.dictionaries(st.text(max_size=8), _json, max_size=4),
    _json.map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=20),
)
_frames = st.one_of(_valid, _valid, _junk)
_program = st.lists(st.tuples(st.sampled_from(sorted(TOKENS)), _frames), min_size=1, max_size=25)


def _rights(user: str, conv: str) -> str:
    return merge_rights(
        Grants.from_claim({"convs": TOKENS[user]}).rights(conv), MEMBERSHIPS.get((conv, user), "")
    )


@settings(max_examples=60)
@given(program=_program)
async def test_no_frame_crashes_leaks_or_writes_without_a_grant(autojump_clock, program):
    async with trio.open_nursery() as nursery:
        env = Env("memory", nursery, None, None)
        run = await env.start(
            auth={"mode": "jwt", "secret": SECRET},
            model={"fake_tokens": 3, "fake_token_rate": 50.0},
        )
        for (conv, user), rights in MEMBERSHIPS.items():
            await run.engine.log.set_membership(conv, user, rights)
        clients = {}
        for user, convs in TOKENS.items():
            token = mint(AuthConfig(mode="jwt", secret=SECRET), user, convs=convs)
            clients[user] = await run.connect(token=token)
        for user, frame in program:
            data = frame if isinstance(frame, str | bytes) else json.dumps(frame)
            try:
                await clients[user].ws.send_message(data)
            except ConnectionGone:
                pass
        await trio.sleep(2)  # replies finish, everything is delivered
        for user, client in clients.items():
            try:
                await client.request({"op": "ping"}, "pong", timeout=5)
            except ConnectionGone as exc:
                assert exc.code in (1009, 4008), f"{user} was closed with {exc.code}"
        assert run.engine.counters.crashed == 0
        for user, client in clients.items():
            for f in client.frames:
                assert f.get("code") != "internal", (user, f)
                if f.get("type") in READ_FRAMES and "conv" in f:
                    assert "r" in _rights(user, f["conv"]), (user, f)
        for conv, c in env.db.convs.items():
            for m in c.messages:
                if m["role"] == "user":
                    assert "w" in _rights(m["user"], conv), (conv, m)
        nursery.cancel_scope.cancel()
