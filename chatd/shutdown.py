"""The one deadline of a shutdown, its phases, and the bounded shields that obey them.

``[server].shutdown_grace`` bounds the whole shutdown. When it begins
(:meth:`ShutdownClock.begin`: a graceful stop, or ``serve()`` cancelled), it
is cut into three phases, each with a deadline:

* ``drain`` — answer every send in flight, end every reply (grace minus two
  reserves);
* ``close`` — flush every client's queue and send its close frame (one reserve);
* ``final`` — close the pools and the Redis client (one reserve).

A reserve is a quarter of the grace, at most one second. Every shielded
section in chatd is opened with :meth:`ShutdownClock.shield`, so it is bounded
twice: by its own limit (a commit's deadline) and by its phase's deadline,
which also tightens the shields already running when the shutdown begins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import trio

Phase = Literal["drain", "close", "final"]
_ORDER: dict[str, int] = {"drain": 2, "close": 1, "final": 0}


class ShutdownClock:
    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.reserve = min(1.0, grace / 4)
        self._end = math.inf  # when everything must be done
        #: Shields running now, and the phase each belongs to.
        self._scopes: dict[trio.CancelScope, Phase] = {}

    @property
    def started(self) -> bool:
        return self._end != math.inf

    def deadline_of(self, phase: Phase = "drain") -> float:
        """When ``phase`` must be over (inf until the shutdown begins)."""
        return self._end - _ORDER[phase] * self.reserve

    @property
    def deadline(self) -> float:
        """When draining must be done."""
        return self.deadline_of("drain")

    def begin(self) -> None:
        """Start the countdown (idempotent); tighten every shield running now."""
        if self.started:
            return
        self._end = trio.current_time() + self.grace
        for scope, phase in self._scopes.items():
            scope.deadline = min(scope.deadline, self.deadline_of(phase))

    @contextmanager
    def shield(self, seconds: float, phase: Phase = "drain") -> Iterator[trio.CancelScope]:
        """A shielded scope that ends after ``seconds`` or at ``phase``'s deadline."""
        deadline = min(trio.current_time() + seconds, self.deadline_of(phase))
        scope = trio.CancelScope(shield=True, deadline=deadline)
        self._scopes[scope] = phase
        try:
            with scope:
                yield scope
        finally:
            del self._scopes[scope]
