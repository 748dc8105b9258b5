"""asyncio on a thread of its own: the ``thread`` bridge, the way past trio-asyncio.

asyncpg and redis-py run on a plain asyncio loop in a dedicated thread; Trio
tasks hand it calls and sleep until their outcome comes back. Nothing here
depends on trio-asyncio (expected to break on Python 3.14), only on public
APIs of asyncio and Trio.

Each direction has one queue and at most one pending wakeup: a burst of calls
(or of results) costs one wakeup of the other thread, not one each. A call
whose Trio task is cancelled returns at once; its asyncio task is cancelled
and winds down on its own, and what it returns is released
(:func:`~chatd.adapters.asyncio_side.consume_result`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

from chatd.adapters.asyncio_side import consume_result, log_stray_error

log = logging.getLogger("chatd.bridge")

T = TypeVar("T")

#: Longest wait at exit for abandoned asyncio tasks and for the thread to end.
_STOP_DEADLINE = 3.0


class _Call:
    """One call in flight: started and cancelled on the asyncio thread,
    delivered or abandoned on the Trio thread."""

    __slots__ = ("abandoned", "args", "fn", "task", "waiter")

    def __init__(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.waiter = trio.lowlevel.current_task()
        self.task: asyncio.Future[Any] | None = None
        self.abandoned = False


class ThreadLoop:
    """Runs asyncio coroutine functions on the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken) -> None:
        self.loop = loop
        self._token = token
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._inbox_woken = False
        self._outbox: collections.deque[tuple[_Call, outcome.Outcome[Any]]] = collections.deque()
        self._outbox_woken = False

    async def run(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
        """``fn(*args)`` on the loop thread; on cancellation, returns at once."""
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(fn, args)
        self._send(lambda: self._start(call))

        def abort(_: Any) -> trio.lowlevel.Abort:
            call.abandoned = True
            self._send(lambda: self._cancel(call))
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    # -- Trio thread -> loop thread ------------------------------------------------

    def _send(self, job: Callable[[], None]) -> None:
        # Append before looking at the flag; the loop thread clears the flag
        # before draining: a job is never left behind without a wakeup.
        self._inbox.append(job)
        if not self._inbox_woken:
            self._inbox_woken = True
            self.loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._inbox_woken = False
        inbox = self._inbox
        while inbox:
            inbox.popleft()()

    def _start(self, call: _Call) -> None:
        try:
            call.task = asyncio.ensure_future(call.fn(*call.args))
        except BaseException as exc:  # delivered to the caller, whatever it is
            self._reply(call, outcome.Error(exc))
            return
        call.task.add_done_callback(lambda task: self._finished(call, task))

    def _finished(self, call: _Call, task: asyncio.Future[Any]) -> None:
        if not call.abandoned:
            self._reply(call, outcome.capture(task.result))

    def _cancel(self, call: _Call) -> None:
        if call.task is not None:
            call.task.cancel()
            call.task.add_done_callback(consume_result)

    # -- loop thread -> Trio thread ------------------------------------------------

    def _reply(self, call: _Call, result: outcome.Outcome[Any]) -> None:
        self._outbox.append((call, result))
        if not self._outbox_woken:
            self._outbox_woken = True
            try:
                self._token.run_sync_soon(self._drain_outbox)
            except trio.RunFinishedError:
                pass  # the Trio run is over: nobody is waiting

    def _drain_outbox(self) -> None:
        self._outbox_woken = False
        outbox = self._outbox
        while outbox:
            call, result = outbox.popleft()
            # A call cancelled on the Trio side was already answered; the loop
            # thread releases what its task returned (``_cancel``).
            if not call.abandoned:
                trio.lowlevel.reschedule(call.waiter, result)


@asynccontextmanager
async def open_thread_loop() -> AsyncIterator[ThreadLoop]:
    """Start the loop thread for the lifetime of the server; stop it within a bound."""
    # The class itself, not asyncio.new_event_loop(): trio-asyncio, once
    # imported (tests use both bridges), replaces the policy's loop factory.
    loop = asyncio.SelectorEventLoop()
    loop.set_exception_handler(log_stray_error)
    thread = threading.Thread(target=_run_loop, args=(loop,), name="chatd-asyncio", daemon=True)
    thread.start()
    try:
        yield ThreadLoop(loop, trio.lowlevel.current_trio_token())
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_STOP_DEADLINE):
            await _stop(loop, thread)
        if thread.is_alive():
            log.warning("the asyncio thread did not stop within %gs", _STOP_DEADLINE)
        else:
            loop.close()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Cancel what is left on the loop (abandoned calls), stop it, join the thread."""
    loop.call_soon_threadsafe(lambda: asyncio.ensure_future(_wind_down(loop)))
    await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)


async def _wind_down(loop: asyncio.AbstractEventLoop) -> None:
    me = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not me]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=_STOP_DEADLINE / 2)
    await loop.shutdown_asyncgens()
    loop.stop()
