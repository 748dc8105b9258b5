"""The asyncio bridges themselves: calls, cancellation, abandoned results, stopping.

Both ways across (``[server].asyncio_bridge``) must behave alike; the
trio-asyncio one also has a private tweak of its own tested here.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from chatd.adapters.bridge import BRIDGES, open_bridge
from chatd.adapters.loop_trio_asyncio import READY_BURST
from chatd.chaos import Chaos
from chatd.errors import BusUnavailable


def _bridge(kind: str = "trio-asyncio", timeout: float = 2.0):
    return open_bridge(Chaos(), postgres_timeout=timeout, redis_timeout=timeout, kind=kind)


@pytest.fixture(params=BRIDGES)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


async def test_ready_callbacks_run_together_not_one_per_scheduler_pass():
    async with _bridge() as bridge:
        loop = bridge.loop.loop
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
            for i in range(3 * READY_BURST):
                bridge.loop.loop.call_soon(ran.append, i)
    assert ran == list(range(3 * READY_BURST))


async def test_calls_cross_with_timers_and_tasks(kind: str):
    async def _aio(n: int) -> int:
        await asyncio.sleep(0.01)  # a timer handle
        done = await asyncio.gather(*(asyncio.sleep(0, result=i) for i in range(n)))
        return sum(done)

    async with _bridge(kind) as bridge:
        async with trio.open_nursery() as nursery:
            results: list[int] = []

            async def one() -> None:
                results.append(await bridge.redis(_aio, 20))

            for _ in range(10):
                nursery.start_soon(one)
    assert results == [190] * 10


async def test_many_concurrent_calls_each_get_their_own_result(kind: str):
    async def _echo(i: int) -> int:
        await asyncio.sleep(0)
        return i

    got: dict[int, int] = {}
    async with _bridge(kind) as bridge:

        async def one(i: int) -> None:
            got[i] = await bridge.postgres(_echo, i)

        async with trio.open_nursery() as nursery:
            for i in range(2000):
                nursery.start_soon(one, i)
    assert got == {i: i for i in range(2000)}


async def test_errors_cross_mapped_and_unmapped(kind: str):
    async def _refused() -> None:
        raise ConnectionRefusedError("nobody home")

    async def _bug() -> None:
        raise KeyError("a bug stays a bug")

    async with _bridge(kind) as bridge:
        with pytest.raises(BusUnavailable, match="redis: ConnectionRefusedError: nobody home"):
            await bridge.redis(_refused)
        with pytest.raises(KeyError, match="a bug stays a bug"):
            await bridge.redis(_bug)


async def test_the_thread_bridge_runs_asyncio_off_the_trio_thread():
    async def _where() -> int | None:
        return threading.get_ident()

    async with _bridge("thread") as bridge:
        assert await bridge.redis(_where) != threading.get_ident()
    async with _bridge("trio-asyncio") as bridge:
        assert await bridge.redis(_where) == threading.get_ident()


async def test_a_deadline_returns_at_once_even_if_the_call_ignores_cancellation(kind: str):
    """A hung driver whose cancellation itself hangs must not hold the caller."""

    async def _hangs_through_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(1.0)  # cleanup that blocks (a cancel request to a hung server)
            raise

    async with _bridge(kind, timeout=0.2) as bridge:
        start = trio.current_time()
        with pytest.raises(BusUnavailable, match=r"no answer within 0\.2s"):
            await bridge.redis(_hangs_through_cancel)
        assert trio.current_time() - start < 0.9
        # The bridge still serves calls while the abandoned one winds down.
        assert await bridge.redis(asyncio.sleep, 0, 7) == 7


class _Claim:
    def __init__(self, released: list[str]) -> None:
        self.released = released

    async def abandon(self) -> None:
        self.released.append("released")


async def test_a_result_nobody_receives_is_released(kind: str):
    """A call that completes after its caller gave up returns a resource: it is released."""
    released: list[str] = []

    async def _slow_claim() -> _Claim:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # a driver that finishes its work anyway and returns the claim
        return _Claim(released)

    async with _bridge(kind, timeout=0.1) as bridge:
        with pytest.raises(BusUnavailable):
            await bridge.redis(_slow_claim)
        with trio.fail_after(2):
            while not released:
                await trio.sleep(0.01)
    assert released == ["released"]


async def test_exit_stops_the_loop_with_calls_abandoned_in_it(kind: str):
    async def _forever() -> None:
        await asyncio.sleep(3600)

    threads_before = threading.active_count()
    with trio.fail_after(10):
        async with _bridge(kind) as bridge:
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(bridge.cleanup, _forever)
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    assert threading.active_count() == threads_before


def test_an_unknown_bridge_is_refused():
    async def main() -> None:
        async with _bridge("uvloop"):
            pass

    with pytest.raises(ValueError, match="unknown asyncio bridge 'uvloop'"):
        trio.run(main)
