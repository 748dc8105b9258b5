"""asyncio hosted inside the Trio run by trio-asyncio: the ``trio-asyncio`` bridge.

One thread: asyncio callbacks run between Trio tasks, in Trio's scheduler.
trio-asyncio 0.16 warns on Python 3.12+ and is expected to break on 3.14
(docs/operations.md, "The asyncio bridge"); :mod:`chatd.adapters.loop_thread`
is the way past it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio

from chatd.adapters.asyncio_side import consume_result, log_stray_error

T = TypeVar("T")

#: At most this many asyncio callbacks run per Trio scheduler pass.
READY_BURST = 256


class TrioAsyncioLoop:
    """Runs asyncio coroutine functions on the loop trio-asyncio hosts in this run."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self._cross = trio_asyncio.aio_as_trio(_detached, loop=loop)

    async def run(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
        """``fn(*args)`` on the asyncio side; on cancellation, returns at once."""
        return await self._cross(fn, args)


@asynccontextmanager
async def open_trio_asyncio_loop() -> AsyncIterator[TrioAsyncioLoop]:
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(log_stray_error)
        _run_ready_callbacks_together(loop)
        yield TrioAsyncioLoop(loop)


async def _detached(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    """Run ``fn`` as its own asyncio task, so a deadline never waits for its cleanup.

    Cancelling a driver call can itself block on a hung server (asyncpg
    sending a cancel request, a pool resetting a connection). On cancellation
    this returns at once; the task is cancelled and winds down on its own.
    """
    task = asyncio.ensure_future(fn(*args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(consume_result)
        raise


def _run_ready_callbacks_together(loop: Any) -> None:
    """Make the loop run every ready asyncio callback per Trio scheduler pass.

    trio-asyncio 0.16 runs one callback per pass, and each pass is a
    checkpoint with its own epoll_wait; a Postgres round trip schedules several
    callbacks, so at low load most of chatd's CPU went to scheduler passes
    (about nine epoll_waits per message, measured with strace). asyncio's own
    loop runs all ready callbacks at once. Each extra callback here is exactly
    one step of trio-asyncio's own (``no_wait``) path, in queue order, so
    ``stop()`` and the shutdown drain behave as before. This replaces a
    private method of trio-asyncio (pinned <0.17 in pyproject.toml);
    ``tests/test_bridge.py`` fails if it stops working.
    """
    one_step = type(loop)._main_loop_one

    async def main_loop_one(no_wait: bool = False) -> None:
        await one_step(loop, no_wait)
        if no_wait:
            return
        for _ in range(READY_BURST):
            try:
                await one_step(loop, True)
            except trio.WouldBlock:
                return

    loop._main_loop_one = main_loop_one
