"""The invariants of ``docs/invariants.md``, checked after a program ran and healed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from tests.conftest import sql, wait_until
from tests.faults import Watcher, check_durable, check_outbox_drains

if TYPE_CHECKING:
    from fuzz.program import World, _Stream


async def check(world: World) -> None:
    srv = world.srv
    await _replies_end(world)  # 9
    with trio.fail_after(30):
        while srv.engine.replies.active:
            await trio.sleep(0.05)
    await check_outbox_drains(srv)  # 7
    rows_by_conv = {}
    for conv in world.convs():
        acked = {s.mid: s.seq for s in world.sent if s.conv == conv and s.duplicate_of is None}
        rows_by_conv[conv] = await check_durable(srv, conv, acked)  # 1, 3, 8
    await check_given_rows(world, rows_by_conv)


async def check_given_rows(world: World, rows_by_conv: dict[str, list[dict[str, Any]]]) -> None:
    """2, 4, 5, 6, 7: what follows from the stored rows (durable, gapless, as 1, 3
    and 8 checked) and from what the clients saw; the simulator calls it too."""
    srv = world.srv
    for s in world.sent:  # 4
        if s.duplicate_of is not None:
            assert s.seq == world.sent[s.duplicate_of].seq, f"retry of {s.mid} got a new seq"
    for st_ in world.streams:  # 2
        _stored_reply(world, st_, [r for r in rows_by_conv[st_.conv] if r["client_id"] == st_.id])
    for rows in rows_by_conv.values():
        for row in rows:
            if row["role"] == "assistant":  # also replies whose ack was lost to a kill
                assert row["status"] in ("complete", "stopped", "interrupted"), row
    for w in world.watchers:  # 5, 6
        await _delivered(world, w, rows_by_conv[w.conv])
    for w, start in world.old_watchers:  # 5: what a client got before leaving
        assert w.seqs == list(range(start + 1, start + 1 + len(w.seqs))), (
            f"watcher from cursor {start} got {w.seqs} before reconnecting"
        )
    # 7: no leaked feeds, sessions or reply tasks.
    assert set(srv.engine.hub.feeds) <= set(world.convs())
    with trio.fail_after(10):
        while len(srv.engine.sessions) != len(world.connected()) + world.others:
            await trio.sleep(0.05)
    with trio.move_on_after(10):  # a finished reply may still be publishing its end
        while srv.engine.replies.running:
            await trio.sleep(0.05)
    assert srv.engine.replies.running == 0, "no reply task is left"


async def _replies_end(world: World) -> None:
    """9: every reply that started ends within the bound once the faults are over:
    no process is generating or committing one, nothing is left in flight in
    Postgres, and every client that followed a reply live has its end
    (``stream.end``/``stream.error``, or its committed message)."""
    convs = world.convs()
    deadline = trio.current_time() + world.bound
    srv = world.srv

    async def _inflight() -> list[dict[str, Any]]:
        try:
            return await sql(
                world.srv,
                "SELECT stream_id, owner FROM replies_in_flight WHERE conv_id = ANY($1)",
                convs,
            )
        except Exception as exc:  # a recovering Postgres: ask again
            return [{"error": repr(exc)}]

    def _unended() -> list[tuple[str, str]]:
        return [
            (w.conv, sid)
            for w in world.watchers
            for sid in w.live
            if sid not in w.ends and sid not in w.messages
        ]

    while True:
        left, unended = await _inflight(), _unended()
        running = len(srv.engine.replies.active), await world.peer.active_replies()
        if (not left and not unended and running == (0, 0)) or trio.current_time() > deadline:
            break
        await trio.sleep(0.1)
    after = f"{world.bound:g}s after the faults"
    assert running == (0, 0), f"replies still running (here, on the peer) {after}: {running}"
    assert not left, f"replies still in flight {after}: {left}"
    assert not unended, f"clients saw no end {after}: {unended}"


def _stored_reply(world: World, st_: _Stream, rows: list[dict[str, Any]]) -> None:
    """2: a stored reply is complete, stopped by a user, or interrupted by a fault
    that allows it (its process killed, paused or cut off past its lease)."""
    fails = st_.fail_at is not None and st_.fail_at <= st_.tokens
    interruptible = world.may_interrupt(st_)
    if not rows:
        assert fails or interruptible, f"reply {st_.id} ({st_.tokens} tokens) was never committed"
        if not fails and not world.redis_lost:
            # Interrupted with nothing stored: nobody had kept any of its text
            # (the taker knows everything any client saw).
            seen = [w.texts.get(st_.id) for w in world.all_watchers() if w.texts.get(st_.id)]
            assert not seen, f"reply {st_.id} was seen ({seen}) but nothing was stored"
        return
    (row,) = rows
    assert row["role"] == "assistant"
    words = len(row["body"].split(" ")) if row["body"] else 0
    if row["status"] == "interrupted":
        assert interruptible, f"reply {st_.id} interrupted without a fault that allows it: {row}"
        assert words <= st_.tokens, row
    elif fails and not st_.stop_requested:
        raise AssertionError(f"a reply that failed in the model was stored: {row}")
    elif row["status"] == "complete":
        assert words == st_.tokens, f"incomplete reply stored as complete: {row}"
    else:
        assert st_.stop_requested and words <= st_.tokens, row


#: stream.error codes that promise nothing was stored.
_NOTHING_STORED = ("interrupted", "model_failed")


async def _delivered(world: World, w: Watcher, rows: list[dict[str, Any]]) -> None:
    start = world.starts[id(w)]
    expected = list(range(start + 1, len(rows) + 1))

    async def _caught_up() -> bool:
        return len(w.seqs) >= len(expected)

    try:
        await wait_until(_caught_up, timeout=20)
    except trio.TooSlowError:
        pass
    assert w.seqs == expected, (
        f"watcher of {w.conv} from cursor {start} got {w.seqs}, expected {expected}"
    )
    for sid, end in w.ends.items():
        if end["type"] == "stream.error" and end.get("code") in _NOTHING_STORED:
            # Followers told a reply ended with nothing stored (its taker knew
            # none of it, or the model failed) never see it stored after all.
            stored = [r for r in rows if r["client_id"] == sid]
            assert not stored, f"{sid} ended {end['code']} (nothing stored), then stored: {stored}"
    for sid, text in w.texts.items():
        row = next((r for r in rows if r["client_id"] == sid), None)
        if row is None:
            continue
        body = row["body"]
        if row["status"] == "interrupted" and world.redis_lost:
            # Redis restarted empty: the taker knew only the checkpoint, which
            # may be behind what the client saw. The two still agree.
            assert body.startswith(text) or text.startswith(body), (sid, text, body)
            continue
        assert body.startswith(text), f"deltas diverged from committed text of {sid}"
        # A reply followed live to its end, with Redis healthy, is complete.
        followed = sid in w.live and sid in w.ends
        if not world.redis_faults and followed and row["status"] == "complete":
            assert text == body, f"deltas of {sid} missed text without any fault"
