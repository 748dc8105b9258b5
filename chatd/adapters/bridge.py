"""The one crossing from Trio into asyncio, where asyncpg and redis-py live.

:class:`Bridge` runs an asyncio-side coroutine function from Trio:

* through the component's chaos gate and under its deadline
  (:meth:`chatd.chaos.Chaos.call`), so nothing waits forever;
* mapping asyncpg/redis/OS errors to :class:`~chatd.errors.StoreUnavailable`,
  :class:`~chatd.errors.BusUnavailable` or :class:`~chatd.errors.StoreError`.

Callers pass a coroutine function that does a whole batch of work: one
crossing costs ~36 us, so hot loops stay on the asyncio side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import redis.exceptions
import trio
import trio_asyncio

from chatd.chaos import Chaos
from chatd.errors import BusUnavailable, StoreError, StoreUnavailable, Unavailable

log = logging.getLogger("chatd.bridge")

T = TypeVar("T")

# SQLSTATE classes that mean "not now", not "never": connection exceptions,
# insufficient resources, operator intervention (shutdown, starting up),
# transaction rollback (serialization failure, deadlock), system errors.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40", "58")
_TRANSIENT_SQLSTATES = ("55P03", "55006")  # lock_not_available, object_in_use


def _map_error(exc: Exception, component: str) -> Exception | None:
    """Translate a driver exception into chatd's own; None if it is not a driver error."""
    if isinstance(exc, Unavailable | StoreError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES:
            return StoreUnavailable(f"postgres: {type(exc).__name__}: {exc}")
        return StoreError(f"postgres: {type(exc).__name__} ({state}): {exc}")
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.exceptions.InternalClientError):
        return StoreUnavailable(f"postgres: {type(exc).__name__}: {exc}")
    if isinstance(exc, redis.exceptions.RedisError):
        return BusUnavailable(f"redis: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError | asyncio.TimeoutError | EOFError):
        cls = BusUnavailable if component == "redis" else StoreUnavailable
        return cls(f"{component}: {type(exc).__name__}: {exc}")
    return None


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
        task.add_done_callback(_consume_result)
        raise


def _consume_result(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    if task.exception() is not None:
        log.debug("abandoned call ended with %r", task.exception())
        return
    # A result that holds a resource (a claim's open transaction) and that
    # nobody will receive any more is released.
    result = task.result()
    abandon = getattr(result, "abandon", None)
    if abandon is not None:
        asyncio.ensure_future(abandon()).add_done_callback(_consume_result)


class Bridge:
    """Runs asyncio-side coroutine functions from Trio, gated and with deadlines."""

    def __init__(
        self, loop: Any, chaos: Chaos, *, postgres_timeout: float, redis_timeout: float
    ) -> None:
        # Bound explicitly so any Trio task in this run (not only children of
        # serve) can cross, and several servers can share one Trio run.
        self._loop = loop
        self.chaos = chaos
        self._timeouts = {"postgres": postgres_timeout, "redis": redis_timeout}

    async def postgres(
        self, fn: Callable[..., Awaitable[T]], *args: Any, deadline: float | None = None
    ) -> T:
        """Run ``fn(*args)`` on the asyncio side as a Postgres call."""
        return await self._call("postgres", fn, args, deadline)

    async def redis(
        self, fn: Callable[..., Awaitable[T]], *args: Any, deadline: float | None = None
    ) -> T:
        """Run ``fn(*args)`` on the asyncio side as a Redis call."""
        return await self._call("redis", fn, args, deadline)

    async def cleanup(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Release a resource on the asyncio side (close a connection, return it to
        its pool): local work no outage can refuse, so no chaos gate; bounded."""
        cross = trio_asyncio.aio_as_trio(_detached, loop=self._loop)
        with trio.move_on_after(_CLEANUP_DEADLINE):
            await cross(fn, args)

    async def _call(
        self,
        component: str,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        deadline: float | None,
    ) -> T:
        cross = trio_asyncio.aio_as_trio(_detached, loop=self._loop)
        try:
            return await self.chaos.call(
                (component,),
                self._timeouts[component] if deadline is None else deadline,
                lambda: cross(fn, args),
            )
        except Exception as exc:
            mapped = _map_error(exc, component)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc


@asynccontextmanager
async def open_bridge(
    chaos: Chaos, *, postgres_timeout: float, redis_timeout: float
) -> AsyncIterator[Bridge]:
    """Open the asyncio loop (trio-asyncio) for the lifetime of the server."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_stray_error)
        _run_ready_callbacks_together(loop)
        yield Bridge(loop, chaos, postgres_timeout=postgres_timeout, redis_timeout=redis_timeout)


#: Longest wait for a local cleanup on the asyncio side (closing, releasing).
_CLEANUP_DEADLINE = 2.0
#: At most this many asyncio callbacks run per Trio scheduler pass.
_READY_BURST = 256


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
        for _ in range(_READY_BURST):
            try:
                await one_step(loop, True)
            except trio.WouldBlock:
                return

    loop._main_loop_one = main_loop_one


def _log_stray_error(loop: Any, context: dict[str, Any]) -> None:
    """Log an error no caller is waiting for, instead of crashing the server.

    trio-asyncio's default handler re-raises it into the loop's nursery, which
    would stop chatd. Every call's own outcome reaches its caller through the
    bridge; what ends up here is driver cleanup nobody awaits any more (e.g.
    asyncpg resetting a connection on release after its call was abandoned
    at the deadline while Postgres hung).
    """
    exc = context.get("exception")
    log.warning("asyncio: %s%s", context.get("message", "error"), f": {exc!r}" if exc else "")
