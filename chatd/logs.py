"""Logs an operator can use: one line per event, text or JSON, repeats rate-limited.

A fault that repeats (Postgres down, every pool retry failing) must not
bury everything else or fill the disk: :class:`RepeatLimit` lets each message
template through at most ``[log].repeats_per_minute`` times a minute per
logger, and the next line let through says how many were left out.
Secrets never reach a log line: chatd logs no token, password or DSN (config
is printed masked, ``chatd.config.as_dict``).
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime

import orjson

from chatd.config import LogConfig

_TEXT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class RepeatLimit(logging.Filter):
    """At most ``per_minute`` records per (logger, message template) a minute.

    Logging runs outside Trio too (the CLI, worker supervisors), so this
    window is on the monotonic clock, not Trio's.
    """

    def __init__(self, per_minute: int) -> None:
        super().__init__()
        self._per_minute = per_minute
        #: (logger, template) -> [window start, let through, left out]
        self._seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if self._per_minute <= 0:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= 60.0:
            if len(self._seen) > 10_000:  # templates are few; this is a safety bound
                self._seen.clear()
            left_out = int(entry[2]) if entry else 0
            self._seen[key] = [now, 1, 0]
            return self._note(record, left_out)
        if entry[1] >= self._per_minute:
            entry[2] += 1
            return False
        entry[1] += 1
        left_out, entry[2] = int(entry[2]), 0
        return self._note(record, left_out)

    @staticmethod
    def _note(record: logging.LogRecord, left_out: int) -> bool:
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like this not logged)"
        return True


class DependencyOneLine(logging.Filter):
    """A dependency's expected failure is one line, not a traceback.

    asyncpg's pool logs every failed reconnect with its traceback while
    Postgres is down (every few seconds, ~40 lines each); the exception's
    type and message say all an operator can act on. Tracebacks from chatd's
    own code (bugs) are kept.
    """

    PREFIXES = ("asyncpg", "redis", "hypercorn", "trio_websocket")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith(self.PREFIXES):
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(cfg: LogConfig) -> None:
    """Configure the root logger for ``chatd serve`` (stderr, one line per event)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.format == "json" else logging.Formatter(_TEXT))
    handler.addFilter(DependencyOneLine())
    handler.addFilter(RepeatLimit(cfg.repeats_per_minute))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
