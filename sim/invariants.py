"""The invariants of docs/invariants.md on the simulation's memory database.

The checks that read only what clients saw and what is stored are the
fuzzer's own (``fuzz/invariants.py``); what this module adds is reading the
stored state from :class:`MemoryDatabase` instead of SQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from fuzz.invariants import check_given_rows
from sim import intruder as intr
from sim.config import LEASE

if TYPE_CHECKING:
    from sim.world import SimWorld


def rows(world: SimWorld, conv: str) -> list[dict[str, Any]]:
    """The stored messages of ``conv``, as the fuzzer's SQL returns them."""
    assert world.db is not None
    stored = world.db.convs.get(conv)
    if stored is None:
        return []
    return [
        {
            "seq": m["seq"],
            "client_id": m["id"],
            "role": m["role"],
            "status": m["status"],
            "body": m["text"],
        }
        for m in stored.messages
    ]


async def check(world: SimWorld) -> None:
    assert world.db is not None
    db = world.db
    srv = world.sim_srv
    if world.postgres_faults:
        # Every process renews its lease once after the faults, so one cut off
        # past its lease has noticed (custody.fenced, which World.may_interrupt
        # reads) before a reply taken from it is judged.
        await _leases_renewed(world)
    await _replies_end(world)  # 9
    with trio.fail_after(30):
        while srv.engine.replies.active:
            await trio.sleep(0.05)
    with trio.fail_after(20):  # 7: the outbox drains
        while db.outbox:
            await trio.sleep(0.05)
    rows_by_conv = {}
    for conv in world.convs():
        stored = rows(world, conv)
        assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1)), "gapless"  # 3
        by_id = {r["client_id"]: r["seq"] for r in stored}
        assert len(by_id) == len(stored), "a message id is stored at most once"  # 4
        for s in world.sent:  # 1, 8
            if s.conv == conv and s.duplicate_of is None:
                assert by_id.get(s.mid) == s.seq, (
                    f"acked {s.mid} at seq {s.seq}, stored at {by_id.get(s.mid)}"
                )
        rows_by_conv[conv] = stored
    await world.quiet()  # a watcher closed as a slow consumer has reconnected
    await check_given_rows(world, rows_by_conv)
    intr.check_nothing_stored(world)  # 10: no access without a grant
    if world.intruder is not None:
        await intr.settle(world.intruder)
        await world.intruder.probe(world)
        world.intruder.check_frames()


async def _leases_renewed(world: SimWorld) -> None:
    custodies = [world.sim_srv.engine.replies.custody]
    peer = world.sim_peer.current
    if peer is not None and peer.engine is not None:
        custodies.append(peer.engine.replies.custody)
    before = [c.renewals for c in custodies]
    with trio.fail_after(LEASE * 5):  # renewals come every lease/3 once the log answers
        while any(c.renewals <= n for c, n in zip(custodies, before, strict=True)):
            await trio.sleep(0.05)


async def _replies_end(world: SimWorld) -> None:
    """9: once the faults are over, within the bound, no reply runs or is in flight
    in the log, and every client that followed one live has its end."""
    assert world.db is not None
    convs = set(world.convs())
    deadline = trio.current_time() + world.bound

    def _left() -> list[str]:
        assert world.db is not None
        return [s for s, row in world.db.replies.items() if row.get("conv") in convs]

    def _unended() -> list[tuple[str, str]]:
        return [
            (w.conv, sid)
            for w in world.watchers
            for sid in w.live
            if sid not in w.ends and sid not in w.messages
        ]

    while True:
        left, unended = _left(), _unended()
        running = len(world.sim_srv.engine.replies.active), await world.peer.active_replies()
        if (not left and not unended and running == (0, 0)) or trio.current_time() > deadline:
            break
        await trio.sleep(0.1)
    after = f"{world.bound:g}s after the faults"
    assert running == (0, 0), f"replies still running (here, on the peer) {after}: {running}"
    assert not left, f"replies still in flight {after}: {left}"
    assert not unended, f"clients saw no end {after}: {unended}"
