"""Chaos gates: break Postgres or Redis for a while without touching the servers.

Every adapter call goes through :meth:`Chaos.call` (the memory twins, whose
calls answer the moment they run, through :meth:`Chaos.call_at_once`), real
and memory adapters alike, so while a gate is open every call raises exactly
as an outage would (or, in the gentler modes, is delayed, or a fraction of
calls fail), and every call that can take time has its deadline. Gates are
timed on Trio's clock, so tests can drive them with a mock clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from chatd.errors import BusUnavailable, StoreUnavailable, Unavailable

COMPONENTS = ("postgres", "redis")
_ERRORS: dict[str, type[Unavailable]] = {"postgres": StoreUnavailable, "redis": BusUnavailable}

T = TypeVar("T")


@dataclass
class _Gate:
    broken_until: float = -math.inf
    latency: float = 0.0
    fraction: float = 1.0
    tripped: int = 0


class Chaos:
    """One gate per component; all closed (healthy) at start."""

    def __init__(self, seed: int | None = None) -> None:
        self._gates = {name: _Gate() for name in COMPONENTS}
        self._rng = random.Random(seed)

    def _gate(self, component: str) -> _Gate:
        try:
            return self._gates[component]
        except KeyError:
            raise ValueError(
                f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}"
            ) from None

    def break_for(
        self,
        component: str,
        seconds: float,
        *,
        latency: float = 0.0,
        fraction: float | None = None,
    ) -> None:
        """Open the gate of ``component`` for ``seconds`` (``math.inf``: until healed).

        By default every call fails. ``latency`` (seconds) delays every call
        instead; ``fraction`` fails that share of calls (after the delay, if any).
        """
        gate = self._gate(component)
        if not seconds > 0:
            raise ValueError("seconds must be positive")
        if latency < 0 or not math.isfinite(latency):
            raise ValueError("latency must be a non-negative number of seconds")
        if fraction is None:
            fraction = 0.0 if latency > 0 else 1.0
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be between 0 and 1")
        gate.broken_until = trio.current_time() + seconds
        gate.latency = latency
        gate.fraction = fraction

    def heal(self, component: str | None = None) -> None:
        """Close one gate, or all of them."""
        for name in [component] if component else COMPONENTS:
            self._gate(name).broken_until = -math.inf

    def remaining(self, component: str) -> float:
        """Seconds the gate stays open; 0 when healthy."""
        return max(0.0, self._gate(component).broken_until - trio.current_time())

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, gate in self._gates.items():
            left = self.remaining(name)
            out[name] = {
                "broken": left > 0,
                "remaining_s": round(left, 3) if math.isfinite(left) else "until healed",
                "latency_ms": round(gate.latency * 1000, 1) if left > 0 else 0,
                "fraction": gate.fraction if left > 0 else 0,
                "tripped_calls": gate.tripped,
            }
        return out

    def check(self, component: str) -> float:
        """Called before each call: raise the component's outage error while its
        gate is open, or return the delay to apply first (0 when healthy)."""
        gate = self._gates[component]
        if gate.broken_until <= trio.current_time():
            return 0.0
        if gate.latency == 0 and self._rng.random() < gate.fraction:
            gate.tripped += 1
            raise _ERRORS[component](f"{component} is broken by the chaos switch")
        return gate.latency

    def check_after_delay(self, component: str) -> None:
        """For a delayed call: fail ``fraction`` of them."""
        gate = self._gates[component]
        if self._rng.random() < gate.fraction:
            gate.tripped += 1
            raise _ERRORS[component](f"{component} is broken by the chaos switch")

    async def call(
        self, components: tuple[str, ...], deadline: float, fn: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``fn()`` as a call to ``components``: their gates first, all under ``deadline``.

        No answer within the deadline raises the first component's outage error
        (the outcome of a write is then unknown).
        """
        try:
            delays = [(c, self.check(c)) for c in components]
            with trio.fail_after(deadline):
                for component, delay in delays:
                    if delay:
                        # Latency mode: slow, still under the call's deadline.
                        await trio.sleep(delay)
                        self.check_after_delay(component)
                return await fn()
        except trio.TooSlowError:
            raise _ERRORS[components[0]](
                f"{'+'.join(components)}: no answer within {deadline:g}s"
            ) from None

    async def call_at_once(
        self, components: tuple[str, ...], deadline: float, fn: Callable[[], T]
    ) -> T:
        """:meth:`call` for a call answered the moment it runs (the memory twins).

        Only an open gate's latency can make it take time, so only then is there
        a deadline to keep: with every gate closed it is one checkpoint and the
        answer, without a cancel scope (the simulator makes a hundred such calls
        a run). The same scheduling and the same random draws as :meth:`call`.
        """
        now = trio.current_time()
        if any(self._gates[c].broken_until > now for c in components):

            async def answered() -> T:
                return fn()

            return await self.call(components, deadline, answered)
        await trio.lowlevel.checkpoint()
        return fn()
