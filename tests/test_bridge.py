"""The asyncio bridge itself: how it runs asyncio callbacks, and that it stops."""

from __future__ import annotations

import asyncio

import trio

from chatd.adapters.bridge import _READY_BURST, open_bridge
from chatd.chaos import Chaos


def _bridge():
    return open_bridge(Chaos(), postgres_timeout=2.0, redis_timeout=2.0)


async def test_ready_callbacks_run_together_not_one_per_scheduler_pass():
    async with _bridge() as bridge:
        loop = bridge._loop
        ran: list[int] = []
        for i in range(50):
            loop.call_soon(ran.append, i)
        # trio-asyncio alone runs one callback per pass: three passes, three callbacks.
        for _ in range(3):
            await trio.lowlevel.checkpoint()
        assert ran == list(range(50))


async def test_callbacks_queued_before_exit_all_run_and_the_loop_stops():
    ran: list[int] = []
    with trio.fail_after(10):
        async with _bridge() as bridge:
            for i in range(3 * _READY_BURST):
                bridge._loop.call_soon(ran.append, i)
    assert ran == list(range(3 * _READY_BURST))


async def test_calls_cross_with_timers_and_tasks():
    async def _aio(n: int) -> int:
        await asyncio.sleep(0.01)  # a timer handle
        done = await asyncio.gather(*(asyncio.sleep(0, result=i) for i in range(n)))
        return sum(done)

    async with _bridge() as bridge:
        async with trio.open_nursery() as nursery:
            results: list[int] = []

            async def one() -> None:
                results.append(await bridge.redis(_aio, 20))

            for _ in range(10):
                nursery.start_soon(one)
    assert results == [190] * 10
