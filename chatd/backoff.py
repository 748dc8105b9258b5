"""Retry backoff: one helper for every component that waits out an outage.

Exponential from ``[retry].backoff_min`` to ``[retry].backoff_max``, with
jitter, so the processes and feeds that lost a server at the same moment do
not retry in lock-step. Time is Trio's clock (a mock clock drives it in tests).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from chatd.config import RetryConfig
from chatd.entropy import new_rng


@dataclass
class Backoff:
    """The delay before the next retry; :meth:`reset` after a success."""

    low: float
    high: float
    #: Each delay is drawn from [delay * (1 - jitter), delay].
    jitter: float = 0.25
    delay: float = field(init=False)
    #: Seeded from the OS at the first retry only: a feed is created per
    #: conversation, and most never retry (seeding costs more than the feed).
    _rng: random.Random | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.delay = self.low

    @classmethod
    def of(cls, cfg: RetryConfig) -> Backoff:
        return cls(cfg.backoff_min, cfg.backoff_max)

    def next(self) -> float:
        """The delay to wait now; the one after it doubles, up to ``high``."""
        d = self.delay
        self.delay = min(d * 2, self.high)
        if self._rng is None:
            self._rng = new_rng()
        return d * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self.delay = self.low

    async def sleep(self) -> None:
        await trio.sleep(self.next())
