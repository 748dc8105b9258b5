"""The one crossing from Trio into asyncio, where asyncpg and redis-py live.

:class:`Bridge` runs an asyncio-side coroutine function from Trio:

* through the component's chaos gate and under its deadline
  (:meth:`chatd.chaos.Chaos.call`), so nothing waits forever;
* mapping asyncpg/redis/OS errors to :class:`~chatd.errors.StoreUnavailable`,
  :class:`~chatd.errors.BusUnavailable` or :class:`~chatd.errors.StoreError`.

Callers pass a coroutine function that does a whole batch of work: one
crossing costs tens of microseconds (``chatd bench bridge``), so hot loops
stay on the asyncio side. The loop itself is hosted by trio-asyncio
(:mod:`~chatd.adapters.loop_trio_asyncio`) or runs on a thread of its own
(:mod:`~chatd.adapters.loop_thread`), as ``[server].asyncio_bridge`` says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import asyncpg
import redis.exceptions
import trio

from chatd.chaos import Chaos
from chatd.errors import BusUnavailable, StoreError, StoreUnavailable, Unavailable

T = TypeVar("T")

#: The ways across (``[server].asyncio_bridge``).
BRIDGES = ("thread", "trio-asyncio")
DEFAULT_BRIDGE = "trio-asyncio"


class _Loop(Protocol):
    """An asyncio loop Trio tasks cross into: ``run`` returns ``fn(*args)``'s
    outcome and, when its caller is cancelled, returns at once (the asyncio
    task is cancelled and winds down on its own)."""

    async def run(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T: ...


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


class Bridge:
    """Runs asyncio-side coroutine functions from Trio, gated and with deadlines."""

    def __init__(
        self, loop: _Loop, chaos: Chaos, *, postgres_timeout: float, redis_timeout: float
    ) -> None:
        # The loop is held, not found from the current task, so any Trio task
        # in this run (not only children of serve) can cross, and several
        # servers can share one Trio run.
        self.loop = loop
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
        with trio.move_on_after(_CLEANUP_DEADLINE):
            await self.loop.run(fn, args)

    async def _call(
        self,
        component: str,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        deadline: float | None,
    ) -> T:
        try:
            return await self.chaos.call(
                (component,),
                self._timeouts[component] if deadline is None else deadline,
                lambda: self.loop.run(fn, args),
            )
        except Exception as exc:
            mapped = _map_error(exc, component)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc


@asynccontextmanager
async def open_bridge(
    chaos: Chaos,
    *,
    postgres_timeout: float,
    redis_timeout: float,
    kind: str = DEFAULT_BRIDGE,
) -> AsyncIterator[Bridge]:
    """Open the asyncio loop for the lifetime of the server.

    ``kind`` is ``"thread"`` (a loop on a thread of its own) or
    ``"trio-asyncio"`` (a loop inside the Trio run); see ``[server].asyncio_bridge``.
    """
    if kind == "thread":
        from chatd.adapters.loop_thread import open_thread_loop as opener
    elif kind == "trio-asyncio":
        # Imported only when chosen: trio-asyncio patches asyncio's policy on
        # import, and warns (and may fail) on newer Pythons.
        from chatd.adapters.loop_trio_asyncio import open_trio_asyncio_loop as opener
    else:
        raise ValueError(f"unknown asyncio bridge {kind!r}: one of {', '.join(BRIDGES)}")
    async with opener() as loop:
        yield Bridge(loop, chaos, postgres_timeout=postgres_timeout, redis_timeout=redis_timeout)


#: Longest wait for a local cleanup on the asyncio side (closing, releasing).
_CLEANUP_DEADLINE = 2.0
