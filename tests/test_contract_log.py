"""The Log port's contract, against the memory twin and against Postgres alike."""

from __future__ import annotations

import uuid

import pytest
import trio

from chatd.errors import ReplyTaken, StoreError, StoreUnavailable
from chatd.protocol import encode
from chatd.records import Checkpoint, NewMessage, Registration, SnapshotAsk, message_event


def _conv() -> str:
    return f"k-{uuid.uuid4().hex[:10]}"


def _msg(conv: str, cid: str, text: str = "hi", user: str = "u", **kw) -> NewMessage:
    return NewMessage(conv, cid, user, text, **kw)


async def test_commit_assigns_gapless_seqs_and_returns_the_events(logs):
    log, _, _ = logs
    a, b = _conv(), _conv()
    results, events = await log.commit(
        [_msg(a, "a1", "one"), _msg(b, "b1", "x"), _msg(a, "a2", 'two "quoted" \u2028 é 🙂')],
        [],
        False,
    )
    assert [(r.conv, r.client_id, r.seq, r.duplicate) for r in results] == [
        (a, "a1", 1, False),
        (b, "b1", 1, False),
        (a, "a2", 2, False),
    ]
    m = results[2].message
    assert (m["id"], m["user"], m["role"], m["status"]) == ("a2", "u", "user", "complete")
    assert m["text"] == 'two "quoted" \u2028 é 🙂' and isinstance(m["ts"], int)
    # Events come back in send order, each exactly the live message event.
    assert [e.conv for e in events] == [a, b, a]
    for e, r in zip(events, results, strict=True):
        assert e.payload == encode(message_event(r.conv, r.message))
    # Outbox ids follow (conversation, seq), whatever the send order.
    keyed = [(e.id, (r.conv, r.seq)) for e, r in zip(events, results, strict=True)]
    assert sorted(keyed) == sorted(keyed, key=lambda pair: pair[1])
    results, _ = await log.commit([_msg(a, "a3")], [], False)
    assert results[0].seq == 3


async def test_duplicates_across_and_within_batches(logs):
    log, _, _ = logs
    c = _conv()
    await log.commit([_msg(c, "early", "first")], [], False)
    results, events = await log.commit(
        [
            _msg(c, "x1", "new"),
            _msg(c, "early", "retried with other text"),
            _msg(c, "x1", "repeated in the batch"),
            _msg(c, "x2", "another", role="assistant", status="stopped"),
        ],
        [],
        False,
    )
    assert [(r.client_id, r.seq, r.duplicate) for r in results] == [
        ("x1", 2, False),
        ("early", 1, True),
        ("x1", 2, True),
        ("x2", 3, False),
    ]
    assert results[1].message["text"] == "first", "a duplicate reports the original"
    assert results[2].message == results[0].message
    assert results[3].message["role"] == "assistant" and results[3].message["status"] == "stopped"
    assert len(events) == 2, "duplicates have no outbox row"


async def test_a_message_that_cannot_be_stored_fails_the_whole_batch(logs):
    log, _, _ = logs
    c = _conv()
    with pytest.raises(StoreError):
        await log.commit([_msg(c, "ok"), _msg(c, "bad", "nul \x00 byte")], [], False)
    with pytest.raises(StoreError):
        await log.commit([_msg(c, "bad-role", role="robot")], [], False)
    assert await log.after(c, 0, 10) == [], "nothing was written"
    results, _ = await log.commit([_msg(c, "ok")], [], False)
    assert results[0].seq == 1


async def test_snapshots(logs):
    log, _, _ = logs
    c = _conv()
    for k in range(9):
        await log.commit([_msg(c, f"m{k}", f"text {k}")], [], False)
    await log.commit([_msg(c, "~reply", "done", role="assistant")], [], False)
    afters = (None, 0, 3, 5, 10, 12)
    other = _conv()
    await log.commit([_msg(other, "~other", "elsewhere", role="assistant")], [], False)
    asks = [
        SnapshotAsk(c, afters, ("~reply", "~other")),
        SnapshotAsk(_conv(), (None, 3)),
        SnapshotAsk(other, (0,), ("~reply",)),
    ]
    snaps, empty, elsewhere = await log.snapshots(asks, 4, 5)
    got = [([m["seq"] for m in s.messages], s.head, s.recovered) for s in snaps]
    assert got == [
        ([7, 8, 9, 10], 10, True),  # no cursor: the latest N
        ([7, 8, 9, 10], 10, False),  # too far behind: the latest N, not recovered
        ([7, 8, 9, 10], 10, False),
        ([6, 7, 8, 9, 10], 10, True),  # within max_catchup: everything after
        ([], 10, True),
        ([], 10, True),
    ]
    # Per conversation: ~other is committed, but in another one.
    assert all(s.committed_streams == {"~reply"} for s in snaps)
    assert snaps[3].messages[0]["text"] == "text 5"
    assert [(s.messages, s.head, s.recovered) for s in empty] == [([], 0, True), ([], 0, True)]
    assert [m["text"] for m in elsewhere[0].messages] == ["elsewhere"]
    assert elsewhere[0].committed_streams == frozenset()


async def test_after_and_history_pages(logs):
    log, _, _ = logs
    c = _conv()
    for k in range(7):
        await log.commit([_msg(c, f"m{k}")], [], False)
    assert [m["seq"] for m in await log.after(c, 2, 3)] == [3, 4, 5]
    assert [m["seq"] for m in await log.after(c, 6, 10)] == [7]
    assert await log.after(c, 7, 10) == []
    assert [m["seq"] for m in await log.history(c, None, 3)] == [5, 6, 7]
    assert [m["seq"] for m in await log.history(c, 5, 3)] == [2, 3, 4]
    assert [m["seq"] for m in await log.history(c, 2, 3)] == [1]
    assert await log.history(_conv(), None, 3) == []


async def test_find_returns_the_message_stored_under_a_client_id(logs):
    log, _, _ = logs
    c = _conv()
    await log.commit(
        [_msg(c, "m1"), _msg(c, "~r", "said", user="bot", role="assistant")], [], False
    )
    found = await log.find(c, "~r")
    assert found is not None
    assert (found["seq"], found["id"], found["text"], found["role"]) == (
        2,
        "~r",
        "said",
        "assistant",
    )
    assert found == (await log.after(c, 1, 1))[0]
    assert await log.find(c, "never-sent") is None
    assert await log.find(_conv(), "~r") is None  # ids are per conversation


async def test_claims_skip_each_other_and_only_a_clean_exit_deletes(logs):
    a, b, _ = logs
    c = _conv()
    _, events = await a.commit([_msg(c, f"m{k}") for k in range(4)], [], False)
    ids = [e.id for e in events]
    with pytest.raises(RuntimeError):
        async with a.claim_outbox(10, 0.0) as claimed:
            assert [e.id for e in claimed] == ids
            raise RuntimeError("publish failed")
    async with a.claim_outbox(2, 0.0) as first:
        assert [e.id for e in first] == ids[:2], "put back, and claimed in id order"
        async with b.claim_outbox(10, 0.0) as second:
            assert [e.id for e in second] == ids[2:], "rows another claim holds are skipped"
    assert (await a.stats())["outbox_rows"] == 0


async def test_claims_respect_min_age_and_commits_delete_what_was_published(logs):
    log, other, _ = logs
    c = _conv()
    _, events = await log.commit([_msg(c, "m0"), _msg(c, "m1")], [], False)
    async with log.claim_outbox(10, 60.0) as young:
        assert young == []
    async with other.claim_outbox(10, 0.0) as held:
        assert len(held) == 2
        # A commit deleting published rows skips those a claim holds (SKIP LOCKED).
        await log.commit([_msg(c, "m2")], [events[0].id], False)
    assert (await log.stats())["outbox_rows"] == 1  # m2's own row
    _, events = await log.commit([_msg(c, "m3")], [], False)
    await log.commit([], [events[0].id], False)
    stats = await log.stats()
    assert stats["outbox_rows"] == 1 and stats["outbox_oldest_s"] >= 0
    assert stats["migrations_pending"] == 0


async def test_notify_wakes_the_other_relays(logs):
    a, b, _ = logs
    c = _conv()
    # The first wait connects its listener (Postgres: LISTEN); nothing is pending yet.
    with trio.move_on_after(0.3) as idle:
        await b.wait_for_notify()
    assert idle.cancelled_caught
    await a.commit([_msg(c, "quiet")], [], False)
    with trio.move_on_after(0.3) as quiet:
        await b.wait_for_notify()
    assert quiet.cancelled_caught, "a commit without notify wakes nobody"
    await a.commit([_msg(c, "loud")], [], True)
    with trio.fail_after(3):
        await b.wait_for_notify()
    await a.notify_relays()
    with trio.fail_after(3):
        await b.wait_for_notify()


async def test_the_chaos_gate_breaks_calls(logs):
    log, _, chaos = logs
    chaos.break_for("postgres", 30)
    with pytest.raises(StoreUnavailable, match="chaos"):
        await log.commit([_msg(_conv(), "m")], [], False)
    chaos.break_for("postgres", 30, latency=2.0)
    with pytest.raises(StoreUnavailable, match="no answer within"):
        await log.after(_conv(), 0, 1)
    chaos.heal()
    assert await log.after(_conv(), 0, 1) == []


async def test_memberships(logs):
    log, other, _ = logs
    c, d = _conv(), _conv()
    assert await log.memberships([(c, "ann"), (d, "ann")]) == {}
    await log.set_membership(c, "ann", "rw")
    await log.set_membership(d, "ann", "r")
    await other.set_membership(c, "bob", "w")
    got = await other.memberships([(c, "ann"), (d, "ann"), (c, "bob"), (d, "bob")])
    assert got == {(c, "ann"): "rw", (d, "ann"): "r", (c, "bob"): "w"}
    await log.set_membership(c, "ann", "r")  # changed, not added
    await log.set_membership(d, "ann", "")  # removed
    assert await log.memberships([(c, "ann"), (d, "ann")]) == {(c, "ann"): "r"}
    assert await other.members(c) == {"ann": "r", "bob": "w"}
    assert await other.members(d) == {}


async def test_leases_fence_a_process_that_let_its_lapse(logs):
    log, other, _ = logs
    a, b = f"p-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"
    assert await log.heartbeat(a, 0.5) is True, "registers"
    assert await log.heartbeat(a, 0.5) is True, "renews"
    assert await other.heartbeat(b, 30) is True
    await trio.sleep(0.7)
    assert await log.heartbeat(a, 0.5) is False, "expired: fenced"
    await other.take_orphans(b)  # marks a dead
    assert await log.heartbeat(a, 0.5) is False, "dead stays dead"
    assert await other.heartbeat(b, 30) is True


async def test_a_taker_past_its_own_lease_takes_nothing_and_declares_no_one_dead(logs):
    """A process cut off past its lease must not declare itself (or anyone)
    dead and take replies over, its own included: only a live process may."""
    log, other, _ = logs
    c = _conv()
    a, b = f"p-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"
    meta = '{"reply_to": 1, "user": "assistant", "role": "assistant", "ts": 1}'
    await log.heartbeat(a, 0.5)
    await other.heartbeat(b, 0.5)
    await log.register_replies(a, [Registration(f"~{c}-a", c, meta)])
    await trio.sleep(0.7)  # both leases lapse
    assert await log.take_orphans(a) == [], "not its own lapsed replies"
    assert await other.take_orphans(b) == [], "nor another's, while its own lease lapsed"
    assert await other.take_orphans(f"p-{uuid.uuid4().hex[:8]}") == [], "nor with no lease"
    assert await other.heartbeat(b, 30) is False, "lapsed: fenced, but not declared dead..."
    live = f"p-{uuid.uuid4().hex[:8]}"
    assert await other.heartbeat(live, 30) is True
    taken = await other.take_orphans(live)
    assert [o.stream for o in taken] == [f"~{c}-a"], "...until a live process does"


async def test_replies_in_flight_checkpoints_and_takeover(logs):
    log, other, _ = logs
    c = _conv()
    r1, r2 = f"~{c}-1", f"~{c}-2"
    owner, taker = f"p-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"
    await log.heartbeat(owner, 0.5)
    await other.heartbeat(taker, 30)
    meta = '{"reply_to": 1, "user": "assistant", "role": "assistant", "ts": 1}'
    await log.register_replies(owner, [Registration(r1, c, meta), Registration(r2, c, meta)])
    # Registering again changes nothing (a retried batch).
    await log.register_replies(owner, [Registration(r1, c, "{}")])
    await log.checkpoint(owner, [Checkpoint(r1, 0, "héllo"), Checkpoint(r2, 0, "x")])
    await log.checkpoint(owner, [Checkpoint(r1, 5, " wörld")])
    await log.checkpoint(owner, [Checkpoint(r1, 3, "stale")])  # not at 3: ignored
    await log.checkpoint(taker, [Checkpoint(r2, 1, "not mine")])  # not its owner: ignored
    held = {f.stream: (f.text, f.meta["reply_to"]) for f in (await other.inflight([c]))[0]}
    assert held == {r1: ("héllo wörld", 1), r2: ("x", 1)}
    assert await other.take_orphans(taker) == [], "the owner is alive"
    await trio.sleep(0.7)
    taken = sorted(await other.take_orphans(taker), key=lambda o: o.stream)
    assert [(o.stream, o.conv, o.text) for o in taken] == [
        (r1, c, "héllo wörld"),
        (r2, c, "x"),
    ]
    assert await log.take_orphans(f"p-{uuid.uuid4().hex[:8]}") == [], "taken once"
    # The taker asks again (as after a lost answer): what it took and has not
    # ended comes back to it; a reply its owner registers meanwhile does not.
    await other.register_replies(taker, [Registration(f"~{c}-3", c, meta)])
    again = sorted(o.stream for o in await other.take_orphans(taker))
    assert again == [r1, r2], "a taker finds again what it took"
    # The owner, waking late, can no longer append (it is not the owner).
    await log.checkpoint(owner, [Checkpoint(r1, 11, "!")])
    # The final commit removes the row in the same transaction; a failed reply is dropped.
    msg = NewMessage(c, r1, "assistant", "héllo wörld", role="assistant", status="interrupted")
    results, _ = await other.commit([msg], [], False, finished=[r1])
    assert results[0].message["status"] == "interrupted"
    # A drop goes only by the row's holder: the old owner's is refused (False).
    assert await log.drop_reply(r2, owner) is False, "taken: not the owner's to drop"
    assert await other.drop_reply(r2, taker) is True
    assert await other.drop_reply(f"~{c}-3", taker) is True
    assert await other.drop_reply(f"~{c}-none", taker) is True, "no row: nothing left"
    assert (await log.inflight([c]))[0] == []


async def test_a_reply_commit_is_refused_once_its_process_is_declared_dead(logs):
    # The fence of a reply's final commit: a taker that knew none of the reply's
    # text drops its row and stores nothing; the owner, waking, must not store it.
    log, other, _ = logs
    c = _conv()
    owner, taker, alive = (f"p-{uuid.uuid4().hex[:8]}" for _ in range(3))
    await log.heartbeat(owner, 0.5)
    await log.heartbeat(alive, 30)
    await other.heartbeat(taker, 30)
    meta = '{"reply_to": 1, "user": "assistant", "role": "assistant", "ts": 1}'
    await log.register_replies(owner, [Registration(f"~{c}-1", c, meta)])
    await log.register_replies(alive, [Registration(f"~{c}-2", c, meta)])
    await trio.sleep(0.7)
    (orphan,) = await other.take_orphans(taker)  # the owner is declared dead
    assert orphan.text == ""
    assert await other.drop_reply(orphan.stream, taker) is True
    late = NewMessage(c, f"~{c}-1", "assistant", "too late", role="assistant", status="complete")
    with pytest.raises(ReplyTaken):
        await log.commit([late], [], False, finished=[f"~{c}-1"], owner=owner)
    assert await other.after(c, 0, 10) == [], "nothing committed"
    # A live owner commits as before; without an owner there is no check.
    mine = NewMessage(c, f"~{c}-2", "assistant", "in time", role="assistant", status="complete")
    results, _ = await log.commit([mine], [], False, finished=[f"~{c}-2"], owner=alive)
    assert results[0].seq == 1 and not results[0].duplicate
    results, _ = await log.commit([late], [], False, finished=[f"~{c}-1"])
    assert results[0].seq == 2, "unfenced (owner=None): as before"
    assert (await log.inflight([c]))[0] == []
