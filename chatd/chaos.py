"""Chaos gates: break Postgres or Redis for a while without touching the servers.

The gateway checks :meth:`Chaos.check` before every call to a component, so
while a gate is open every call raises exactly as an outage would. Gates are
timed on Trio's clock, so tests can drive them with a mock clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from chatd.errors import BusUnavailable, StoreUnavailable, Unavailable

COMPONENTS = ("postgres", "redis")
_ERRORS: dict[str, type[Unavailable]] = {"postgres": StoreUnavailable, "redis": BusUnavailable}


@dataclass
class _Gate:
    broken_until: float = -math.inf


class Chaos:
    """One gate per component; all closed (healthy) at start."""

    def __init__(self) -> None:
        self._gates = {name: _Gate() for name in COMPONENTS}

    def _gate(self, component: str) -> _Gate:
        try:
            return self._gates[component]
        except KeyError:
            raise ValueError(
                f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}"
            ) from None

    def break_for(self, component: str, seconds: float) -> None:
        """Open the gate of ``component`` for ``seconds`` (``math.inf``: until healed)."""
        if not seconds > 0:
            raise ValueError("seconds must be positive")
        self._gate(component).broken_until = trio.current_time() + seconds

    def heal(self, component: str | None = None) -> None:
        """Close one gate, or all of them."""
        for name in [component] if component else COMPONENTS:
            self._gate(name).broken_until = -math.inf

    def remaining(self, component: str) -> float:
        """Seconds the gate stays open; 0 when healthy."""
        return max(0.0, self._gate(component).broken_until - trio.current_time())

    def status(self) -> dict[str, float]:
        return {name: self.remaining(name) for name in COMPONENTS}

    def check(self, component: str) -> None:
        """Raise the component's outage error while its gate is open."""
        if self.remaining(component) > 0:
            raise _ERRORS[component](f"{component} is broken by the chaos switch")
