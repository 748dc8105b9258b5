"""One assistant reply in flight: its text so far, its state, and its frames."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson
import trio

from chatd.protocol import encode

#: Message ids starting with this are reserved for replies (clients may not use them).
REPLY_ID_PREFIX = "~"


@dataclass(eq=False)
class Reply:
    id: str
    conv: str
    reply_to: int
    prompt: str
    user: str
    started_ms: int
    #: Where the tokens come from instead of the model: an agent streaming its
    #: own reply in (chatd.durable.agents). It may set ``interrupted``.
    source: Callable[[Reply], AsyncIterator[str]] | None = None
    parts: list[str] = field(default_factory=list)
    length: int = 0
    state: str = "generating"  # -> committing -> ended
    stopped: bool = False
    #: Cut off by a shutdown while generating.
    interrupted: bool = False
    #: Taken over by another process (this one was presumed dead): not ours to end.
    taken: bool = False
    #: Recorded in the log under this process's lease (engine/custody.py). Until
    #: then the lane publishes nothing of it, unless it has ended.
    registered: bool = False
    #: The process id it was registered under (or may have been: a registration
    #: whose answer was lost): its final commit is refused once that process
    #: is declared dead (another may have taken it over).
    owner: str | None = None
    #: Its process lost its lease while its registration's outcome was unknown:
    #: a taker may hold it or may have ended it with nothing (it knew none of
    #: its text, the lane publishing nothing before registration). It ends
    #: the same way: nothing stored, ``stream.error``.
    abandoned: bool = False
    #: The parts and code points the log holds (checkpoint mode).
    checkpointed_parts: int = 0
    checkpointed: int = 0
    truncated: bool = False
    scope: trio.CancelScope | None = None
    # What the transport has acknowledged (the lane's bookkeeping).
    sent_parts: int = 0
    sent_offset: int = 0
    sent_bytes: int = 0  # -1: unknown, rewrite the partial whole
    start_sent: bool = False
    end_frame: str | None = None
    end_sent: bool = False
    given_up_at: float = 0.0
    flushed: trio.Event = field(default_factory=trio.Event)

    def append(self, token: str) -> None:
        self.parts.append(token)
        self.length += len(token)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def meta(self) -> dict[str, Any]:
        return {
            "reply_to": self.reply_to,
            "user": self.user,
            "role": "assistant",
            "ts": self.started_ms,
        }

    @cached_property
    def meta_json(self) -> str:
        # Sent with every lane batch while the reply lives; it never changes.
        return orjson.dumps(self.meta()).decode()

    def start_frame(self) -> str:
        return encode({"type": "stream.start", "conv": self.conv, "stream": self.id, **self.meta()})

    def delta_frame(self, offset: int, text: str) -> str:
        return encode(
            {"type": "delta", "conv": self.conv, "stream": self.id, "offset": offset, "text": text}
        )

    def end(self, seq: int, status: str, length: int) -> dict[str, Any]:
        return {
            "type": "stream.end",
            "conv": self.conv,
            "stream": self.id,
            "seq": seq,
            "status": status,
            "length": length,
        }

    def error(self, code: str, message: str, *, retryable: bool) -> dict[str, Any]:
        return {
            "type": "stream.error",
            "conv": self.conv,
            "stream": self.id,
            "code": code,
            "message": message,
            "retryable": retryable,
        }

    def wake(self) -> None:
        """Whoever waits for the lane to ship this reply looks again."""
        self.flushed.set()
        self.flushed = trio.Event()


def now_ms() -> int:
    # A wall-clock timestamp for clients; every duration uses Trio's clock.
    return int(time.time() * 1000)
