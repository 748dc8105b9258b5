"""The faults the memory twins inject for the simulator (``sim/``), each as the real
server would show it: a lost pub/sub message cuts its subscriber, a lost answer
leaves the write done (and a claim rolled back)."""

from __future__ import annotations

import pytest
import trio

from chatd.adapters.memory_log import MemoryDatabase, MemoryLog
from chatd.adapters.memory_transport import MemoryBroker, MemoryTransport
from chatd.chaos import Chaos
from chatd.errors import BusUnavailable, StoreUnavailable
from chatd.records import NewMessage


async def test_a_lost_answer_leaves_the_commit_done_and_a_retry_is_a_duplicate():
    db = MemoryDatabase(seed=1)
    log = MemoryLog(db, Chaos())
    db.answer_loss = 1.0
    with pytest.raises(StoreUnavailable, match="connection lost after the statement ran"):
        await log.commit([NewMessage("c", "m1", "u", "hi")], [], False)
    assert [m["id"] for m in db.convs["c"].messages] == ["m1"]
    db.answer_loss = 0.0
    (retry,), _ = await log.commit([NewMessage("c", "m1", "u", "hi")], [], False)
    assert retry.duplicate and retry.seq == 1


async def test_a_claim_whose_answer_is_lost_leaves_no_row_locked():
    db = MemoryDatabase(seed=1)
    log = MemoryLog(db, Chaos())
    await log.commit([NewMessage("c", f"m{i}", "u", "hi") for i in range(3)], [], False)
    db.answer_loss = 1.0
    with pytest.raises(StoreUnavailable):
        async with log.claim_outbox(10, 0.0):
            pass
    assert db.claimed == set()
    db.answer_loss = 0.0
    async with log.claim_outbox(10, 0.0) as events:
        assert len(events) == 3
    assert db.outbox == {}


async def test_a_lost_pubsub_message_cuts_its_subscriber_who_then_resubscribes():
    broker = MemoryBroker(seed=1)
    sub, pub = MemoryTransport(broker, Chaos()), MemoryTransport(broker, Chaos())
    sub.want("c")
    with trio.fail_after(2):
        assert [m.kind for m in await sub.receive(0.1)] == ["subscribe"]
    broker.drop_rate = 1.0
    await pub.publish("c", '{"n":1}')
    with pytest.raises(BusUnavailable):
        await sub.receive(0.1)
    broker.drop_rate = 0.0
    # Subscribed again on a new connection: confirmed, so the caller resyncs.
    with trio.fail_after(2):
        assert [m.kind for m in await sub.receive(0.1)] == ["subscribe"]
    await pub.publish("c", '{"n":2}')
    assert [(m.kind, m.data) for m in await sub.receive(0.1)] == [("message", '{"n":2}')]


async def test_late_messages_and_late_confirmations_keep_the_connection_in_order(autojump_clock):
    broker = MemoryBroker(seed=1)
    t, other = MemoryTransport(broker, Chaos()), MemoryTransport(broker, Chaos())
    broker.confirm_delay = 0.5
    t.want("c")
    t0 = trio.current_time()
    assert await t.receive(0.1) == [], "the SUBSCRIBE has not taken effect yet"
    await other.publish("c", "lost")  # before it takes effect: not delivered to t
    got = await t.receive(2.0)
    assert [(m.kind, m.conv) for m in got] == [("subscribe", "c")]
    assert trio.current_time() - t0 >= 0.5
    broker.confirm_delay, broker.delay = 0.0, 0.3
    t1 = trio.current_time()
    await other.publish("c", "one")
    broker.delay = 0.0  # a later, faster message does not overtake
    await other.publish("c", "two")
    got = await t.receive(2.0)
    assert [m.data for m in got] == ["one", "two"]
    assert trio.current_time() - t1 >= 0.3
