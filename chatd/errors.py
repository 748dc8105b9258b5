"""chatd's own exceptions. asyncpg and redis errors never escape the gateway."""

from __future__ import annotations


class ChatdError(Exception):
    """Base class for chatd errors."""


class Unavailable(ChatdError):
    """A backing service cannot serve the call right now; retrying later may work."""

    component = "unknown"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StoreUnavailable(Unavailable):
    """Postgres is unreachable, timed out, or refused the work transiently."""

    component = "postgres"


class BusUnavailable(Unavailable):
    """Redis is unreachable or timed out."""

    component = "redis"


class StoreError(ChatdError):
    """Postgres rejected the work for a non-transient reason (a bug or bad schema)."""


class ReplyTaken(StoreError):
    """A reply's commit was refused: its process lost its lease and another may have
    taken the reply over (``Log.commit`` with ``owner``). Nothing was committed."""

    def __init__(self, owner: str) -> None:
        super().__init__(f"process {owner} was declared dead: its replies may be a taker's")
        self.owner = owner


class ServiceStartError(ChatdError):
    """An embedded PostgreSQL or Redis could not be started; the message says why."""


class ModelError(ChatdError):
    """The model backend failed to produce a reply (HTTP error, timeout, bad chunk)."""
