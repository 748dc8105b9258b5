"""What the asyncio side does for itself, whichever loop hosts it.

A call abandoned at its deadline keeps running on the asyncio side until it
ends; what it returns then (a claim holding an open transaction) is released
here, and its errors are logged, not raised into the server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("chatd.bridge")


def consume_result(task: asyncio.Future[Any]) -> None:
    """Done-callback of an abandoned call: release what nobody will receive."""
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
        asyncio.ensure_future(abandon()).add_done_callback(consume_result)


def log_stray_error(loop: Any, context: dict[str, Any]) -> None:
    """Log an error no caller is waiting for, instead of crashing the server.

    trio-asyncio's default handler re-raises it into the loop's nursery, which
    would stop chatd. Every call's own outcome reaches its caller through the
    bridge; what ends up here is driver cleanup nobody awaits any more (e.g.
    asyncpg resetting a connection on release after its call was abandoned
    at the deadline while Postgres hung).
    """
    exc = context.get("exception")
    log.warning("asyncio: %s%s", context.get("message", "error"), f": {exc!r}" if exc else "")
