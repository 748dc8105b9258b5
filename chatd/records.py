"""The records that cross the ports: what the engine and the adapters exchange.

Plain data, no I/O. Messages on the wire and in snapshots are dicts (they are
encoded straight to JSON); everything else is a small dataclass. The per-send
records are slotted, not frozen: a frozen dataclass's ``__init__`` costs four
times as much, and every send builds several.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class NewMessage:
    """A message to commit. ``client_id`` is the idempotency key within ``conv``."""

    conv: str
    client_id: str
    user: str
    text: str
    role: str = "user"
    status: str = "complete"


@dataclass(slots=True)
class Committed:
    """The outcome of one send: its seq, and whether it had been committed before."""

    conv: str
    client_id: str
    seq: int
    duplicate: bool
    #: The message as stored (for a duplicate: the original), as on the wire.
    message: dict[str, Any]


@dataclass(slots=True)
class OutboxEvent:
    """A committed outbox row: the live event to publish on ``conv``'s channel."""

    id: int
    conv: str
    payload: str


@dataclass(frozen=True)
class Snapshot:
    messages: list[dict[str, Any]]
    head: int
    #: False when the client's cursor was too far behind to recover in one
    #: snapshot: ``messages`` then holds only the latest ones.
    recovered: bool
    #: Those of the asked-about stream ids that are already committed messages.
    committed_streams: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SnapshotAsk:
    """Clients joining one conversation together: one cursor each (None: none),
    and the reply ids they say they hold part of."""

    conv: str
    afters: tuple[int | None, ...]
    streams: tuple[str, ...] = ()


@dataclass(frozen=True)
class InFlight:
    """A reply still generating, as the transport holds it: metadata and partial text."""

    stream: str
    meta: dict[str, Any]
    text: str


@dataclass(frozen=True)
class Registration:
    """A reply starting: recorded in the log under its process's lease."""

    stream: str
    conv: str
    #: The reply's metadata as JSON (who asked, what it answers, when it began).
    meta: str


@dataclass(frozen=True)
class Checkpoint:
    """New text of one reply, appended to what the log holds of it."""

    stream: str
    #: The length (code points) the log holds now; the append happens only then.
    old_length: int
    text: str


@dataclass(frozen=True)
class Orphan:
    """A reply whose process died, now taken over: what the log knew of it."""

    stream: str
    conv: str
    meta: dict[str, Any]
    #: The text checkpointed so far ("" in transient mode).
    text: str


@dataclass(frozen=True)
class LaneOp:
    """One reply's update in a lane batch: extend its partial, publish its frames."""

    conv: str
    stream: str
    #: The partial's UTF-8 length in the transport before this op, or -1 to rewrite it whole.
    expect_bytes: int
    #: Text to append (or, when rewriting, the whole partial).
    text: str
    #: The reply's tokens; the first ``upto`` of them are the whole partial,
    #: joined only if the transport does not hold what we expect.
    parts: list[str]
    upto: int
    #: Stream metadata JSON while the reply lives; "" ends it (partial deleted).
    meta: str
    frames: tuple[str, ...]

    def whole(self) -> str:
        return "".join(self.parts[: self.upto])


@dataclass(frozen=True)
class BusMessage:
    """What the transport's subscription yields."""

    #: "message" (a conversation's events), "subscribe" (the channel is live
    #: again: re-read what may have been missed), or "control".
    kind: str
    conv: str
    #: For "message": one or more events, one JSON object per line.
    data: str = ""


@dataclass(slots=True)
class Outcome:
    """A commit's outcome, sent back to the task that submitted the message."""

    msg: NewMessage
    #: Whatever the submitter attached; the committer never looks at it.
    tag: Any
    #: The commit, or the ChatdError that says why there is none.
    result: Committed | Exception


def message(
    seq: int, client_id: str, user: str, role: str, status: str, text: str, ts: int
) -> dict[str, Any]:
    """A message as it appears on the wire (without ``type``/``conv``)."""
    return {
        "seq": seq,
        "id": client_id,
        "user": user,
        "role": role,
        "status": status,
        "text": text,
        "ts": ts,
    }


#: What a message costs on the wire beyond its text and ids (keys, numbers, quotes).
_MESSAGE_OVERHEAD = 96


def wire_size(msg: dict[str, Any]) -> int:
    """About how many bytes ``msg`` takes in a frame (its text counted as one byte
    per character: a budget, not an exact count; cheap enough for every message)."""
    return len(msg["text"]) + len(msg["id"]) + len(msg["user"]) + _MESSAGE_OVERHEAD


def fit_newest(messages: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The newest of ``messages`` (in seq order) within ``budget`` bytes; at least one."""
    total, start = 0, len(messages)
    while start > 0:
        total += wire_size(messages[start - 1])
        if total > budget and start < len(messages):
            break
        start -= 1
    return messages[start:]


def fit_oldest(messages: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The oldest of ``messages`` (in seq order) within ``budget`` bytes; at least one."""
    total, end = 0, 0
    while end < len(messages):
        total += wire_size(messages[end])
        if total > budget and end > 0:
            break
        end += 1
    return messages[:end]


def message_event(conv: str, msg: dict[str, Any]) -> dict[str, Any]:
    """The live ``message`` event for one committed message."""
    return {"type": "message", "conv": conv, **msg}


def event_template(m: NewMessage) -> tuple[str, str]:
    """The live event's JSON around its seq and ts, which only the commit knows.

    ``head + str(seq) + mid + str(ts) + "}"`` encodes exactly as
    ``orjson.dumps(message_event(conv, message(...)))``.
    """
    d = orjson.dumps
    head = b'{"type":"message","conv":' + d(m.conv) + b',"seq":'
    mid = b"".join(
        [
            *(b',"id":', d(m.client_id), b',"user":', d(m.user), b',"role":', d(m.role)),
            *(b',"status":', d(m.status), b',"text":', d(m.text), b',"ts":'),
        ]
    )
    return head.decode(), mid.decode()


def join_events(payloads: list[str]) -> str:
    """Several events of one conversation as one transport message (a line each).

    JSON text never holds a raw newline, so the subscriber splits on it.
    """
    return "\n".join(payloads)


def split_events(data: str) -> list[str]:
    return data.split("\n") if "\n" in data else [data]
