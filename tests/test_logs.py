"""Operator logs: JSON lines, and repeats rate-limited with a count of what was left out."""

from __future__ import annotations

import io
import json
import logging

from chatd.config import LogConfig
from chatd.logs import DependencyOneLine, JsonFormatter, RepeatLimit, setup_logging


def _logger(
    name: str, per_minute: int, fmt: logging.Formatter
) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(fmt)
    handler.addFilter(RepeatLimit(per_minute))
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_repeats_are_limited_and_counted(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("chatd.logs.time.monotonic", lambda: now[0])
    logger, out = _logger("chatd.test.repeats", 3, logging.Formatter("%(message)s"))
    for i in range(10):
        logger.warning("Postgres pool retry failed: %s", f"attempt {i}")
    logger.warning("a different message")  # its own budget
    now[0] += 61
    logger.warning("Postgres pool retry failed: %s", "attempt 10")
    lines = out.getvalue().splitlines()
    assert lines == [
        "Postgres pool retry failed: attempt 0",
        "Postgres pool retry failed: attempt 1",
        "Postgres pool retry failed: attempt 2",
        "a different message",
        "Postgres pool retry failed: attempt 10 (7 more like this not logged)",
    ]


def test_json_lines():
    logger, out = _logger("chatd.test.json", 0, JsonFormatter())
    logger.info("ready: %d clients", 3)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("crashed")
    # One line per event, the traceback included.
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "ready: 3 clients" and first["level"] == "info"
    assert first["logger"] == "chatd.test.json" and first["ts"].endswith("+00:00")
    assert second["msg"] == "crashed" and "ValueError: boom" in second["exc"]


def test_setup_logging_installs_one_handler():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(LogConfig(level="warning", format="json"))
        setup_logging(LogConfig(level="warning", format="json"))
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_dependencys_traceback_is_one_line():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(DependencyOneLine())
    for name in ("asyncpg.pool", "chatd.engine"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except OSError:
            logger.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
        logger.handlers[:] = []
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "Failed to restore the pool connection floor; retrying: "
        "ConnectionRefusedError: [Errno 111] Connect call failed"
    )
    assert lines[2] == "Traceback (most recent call last):"  # chatd's own: kept whole
