"""What one client may spend: token buckets, and refusals logged at a bounded rate.

Both run on Trio's clock, so a mock clock drives them in tests.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import trio


class TokenBucket:
    """``rate`` actions per second sustained, ``burst`` at once (rate 0: no limit)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = trio.current_time()

    def take(self, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens: 0.0 if allowed, else the seconds until they are available.

        A cost above the burst is charged as the whole burst (it can never fit).
        """
        if self.rate <= 0:
            return 0.0
        cost = min(cost, self.burst)
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate

    def reserve(self, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens now, in debt if need be: the seconds to wait before
        acting (for backpressure: the action happens, later)."""
        if self.rate <= 0:
            return 0.0
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - cost
        self._at = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RefusalLog:
    """Logs refusals (bad tokens, limits, bad input) at most ``per_minute`` a minute.

    A client hammering the server must not be able to fill the log (or the
    disk): past the budget lines are counted, and the next line logged says
    how many were left out. Every refusal is counted by kind either way.
    """

    def __init__(self, logger: logging.Logger, per_minute: int) -> None:
        self._log = logger
        self._per_minute = per_minute
        self._window = -math.inf
        self._logged = 0
        self._suppressed = 0
        #: Refusals by kind (the client error code), for ``status``.
        self.counts: Counter[str] = Counter()

    def refuse(self, kind: str, who: str, message: str) -> None:
        self.counts[kind] += 1
        now = trio.current_time()
        if now - self._window >= 60.0:
            self._window, self._logged = now, 0
        if self._logged >= self._per_minute:
            self._suppressed += 1
            return
        self._logged += 1
        more = f" ({self._suppressed} more refusals not logged)" if self._suppressed else ""
        self._suppressed = 0
        self._log.info("refused %s from %s: %s%s", kind, who, message, more)
