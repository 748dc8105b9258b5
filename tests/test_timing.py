"""The shutdown clock and the backoff, on Trio's mock clock."""

from __future__ import annotations

import math

import pytest
import trio

from chatd.backoff import Backoff
from chatd.shutdown import ShutdownClock


async def test_phases_split_the_grace_period(mock_clock):
    clock = ShutdownClock(5.0)
    assert not clock.started and clock.deadline == math.inf
    mock_clock.jump(10)
    clock.begin()
    assert clock.deadline_of("drain") == pytest.approx(13.0)
    assert clock.deadline_of("close") == pytest.approx(14.0)
    assert clock.deadline_of("final") == pytest.approx(15.0)
    mock_clock.jump(1)
    clock.begin()  # idempotent: the countdown started once
    assert clock.deadline_of("final") == pytest.approx(15.0)
    assert ShutdownClock(2.0).reserve == 0.5


async def test_a_running_shield_is_tightened_when_the_shutdown_begins(autojump_clock):
    clock = ShutdownClock(4.0)
    t0 = trio.current_time()
    with clock.shield(60.0) as scope:
        assert scope.deadline == pytest.approx(t0 + 60)
        clock.begin()
        assert scope.deadline == pytest.approx(t0 + 2.0)  # drain: 4 - 2 x 1
        await trio.sleep(30)
    assert scope.cancelled_caught and trio.current_time() == pytest.approx(t0 + 2.0)
    with clock.shield(60.0, "final") as late:
        await trio.sleep(30)
    assert late.cancelled_caught and trio.current_time() == pytest.approx(t0 + 4.0)


async def test_a_shield_holds_off_cancellation_only_until_its_bound(autojump_clock):
    clock = ShutdownClock(5.0)
    finished = []
    with trio.CancelScope() as outer:
        outer.cancel()
        with clock.shield(1.5):
            await trio.sleep(1.0)
            finished.append("inside")
            await trio.sleep(10)
            finished.append("never")
    assert finished == ["inside"]


def test_backoff_doubles_with_jitter_up_to_its_cap():
    b = Backoff(0.1, 1.0, jitter=0.25)
    delays = [b.next() for _ in range(8)]
    nominal = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    for d, n in zip(delays, nominal, strict=True):
        assert 0.75 * n <= d <= n
    b.reset()
    assert b.delay == 0.1 and b.next() <= 0.1
