"""Durable Streams: the protocol's rules as pure functions over a stream's state.

Both stores (:mod:`chatd.adapters.postgres_durable` and
:mod:`chatd.adapters.memory_durable`) load a stream's row and its producer's
row, ask :func:`plan_append` / :func:`plan_create` what to do, and apply the
plan atomically (Postgres: in one transaction holding the stream's row lock,
which also serializes producers per stream as the protocol requires). So the
rules exist once, and the contract tests keep the two stores honest.

Positions: a stream is a sequence of *units* — bytes, or messages for
``application/json`` streams. A position counts units from the start; the wire
offset is ``0000000000000000_<position, 16 digits>``, fixed width so that
offsets sort as their positions do. Data is stored as chunks (one append of
bytes, or one JSON message), each covering ``[pos, stop)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import orjson

#: Offsets as the reference server writes them; the conformance suite's fork
#: tests name the start of a stream in this form.
_OFFSET = re.compile(r"^(\d{16})_(\d{16})$")
_TTL = re.compile(r"^(0|[1-9][0-9]{0,9})$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_MAX_SAFE = 2**53 - 1
_DIGITS = re.compile(r"^(0|[1-9][0-9]*)$")
START = 0


class DSError(Exception):
    """A request the protocol refuses: its HTTP status, a message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def offset(pos: int) -> str:
    return f"{0:016d}_{pos:016d}"


def parse_offset(text: str | None, tail: int | None = None) -> int | None:
    """A position from a wire offset: ``-1`` (or none) the start; ``now`` the tail
    (returned as None when ``tail`` is unknown). Malformed: 400."""
    if text is None or text == "-1":
        return START
    if text == "now":
        return tail
    m = _OFFSET.match(text)
    if m is None:
        raise DSError(400, f"malformed offset {text!r}")
    return int(m.group(2))


def media_type(content_type: str) -> str:
    """``text/plain; charset=utf-8`` -> ``text/plain`` (compared case-insensitively)."""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    return media_type(content_type) == "application/json"


def is_text(content_type: str) -> bool:
    """Sent as text in SSE (else base64)."""
    mt = media_type(content_type)
    return mt.startswith("text/") or mt == "application/json"


def parse_ttl(value: str | None) -> int | None:
    if value is None:
        return None
    if not _TTL.match(value):
        raise DSError(400, f"Stream-TTL must be whole seconds without sign or zeros, got {value!r}")
    return int(value)


def parse_expires(value: str | None) -> float | None:
    if value is None:
        return None
    if not _RFC3339.match(value):
        raise DSError(400, f"Stream-Expires-At must be an RFC 3339 time, got {value!r}")
    try:
        when = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError:
        raise DSError(400, f"Stream-Expires-At is not a valid time: {value!r}") from None
    return when.timestamp()


def format_expires(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")


def parse_int_header(name: str, value: str) -> int:
    if not _DIGITS.match(value) or int(value) > _MAX_SAFE:
        raise DSError(400, f"{name} must be an integer from 0 to 2^53-1, got {value!r}")
    return int(value)


def is_true(value: str | None) -> bool:
    """``Stream-Closed`` counts only when it is exactly ``true`` (any case)."""
    return value is not None and value.strip().lower() == "true"


def json_messages(body: bytes, *, allow_empty: bool) -> list[bytes]:
    """The messages of a JSON-mode body: an array is flattened one level."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DSError(400, f"the body is not valid JSON: {exc}") from None
    if isinstance(value, list):
        if not value and not allow_empty:
            raise DSError(400, "an empty JSON array appends nothing")
        return [orjson.dumps(v) for v in value]
    return [orjson.dumps(value)]


# -- state ---------------------------------------------------------------------


@dataclass(frozen=True)
class Producer:
    epoch: int
    seq: int


@dataclass(frozen=True)
class StreamRow:
    """One stream's state, as both stores keep it."""

    id: int
    path: str
    content_type: str
    ttl: int | None = None
    expires_at: float | None = None
    closed: bool = False
    tail: int = 0
    #: Last read or write (wall clock seconds): a TTL counts from it.
    touched: float = 0.0
    #: (producer, epoch, seq) of the append that closed the stream.
    closed_by: tuple[str, int, int] | None = None
    stream_seq: str | None = None
    fork_of: str | None = None
    fork_pos: int | None = None
    #: Deleted while forks still read it: 410 to its own clients.
    deleted: bool = False
    #: Forks that name this stream as their source.
    refs: int = 0

    def expired(self, now: float) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return True
        return self.ttl is not None and now >= self.touched + self.ttl


@dataclass(frozen=True)
class Append:
    """One POST, parsed."""

    content_type: str | None
    body: bytes
    close: bool
    producer: tuple[str, int, int] | None = None
    stream_seq: str | None = None


@dataclass(frozen=True)
class AppendPlan:
    """What an append does: the status and headers to answer, and the new state."""

    status: int
    headers: dict[str, str]
    row: StreamRow
    #: Chunks to store: (pos, stop, data).
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)
    producer: Producer | None = None
    #: Data was stored or the stream was closed: live readers look again.
    changed: bool = False


def chunk_body(row: StreamRow, body: bytes, *, allow_empty: bool) -> list[tuple[int, int, bytes]]:
    """Cut a body into chunks starting at the stream's tail."""
    if not body:
        return []
    pos = row.tail
    if is_json(row.content_type):
        out = []
        for msg in json_messages(body, allow_empty=allow_empty):
            out.append((pos, pos + 1, msg))
            pos += 1
        return out
    return [(pos, pos + len(body), body)]


def _closed_headers(row: StreamRow) -> dict[str, str]:
    return {"Stream-Closed": "true", "Stream-Next-Offset": offset(row.tail)}


def plan_append(row: StreamRow, producer: Producer | None, req: Append, now: float) -> AppendPlan:
    """The protocol's append rules, in its order of precedence."""
    if row.closed:
        if req.producer is not None and row.closed_by == req.producer:
            headers = _closed_headers(row) | _producer_headers(req.producer[1], req.producer[2])
            return AppendPlan(204, headers, row)
        if not req.body and req.close:
            return AppendPlan(204, _closed_headers(row), row)
        raise DSError(409, "the stream is closed", _closed_headers(row))
    if req.body:
        if req.content_type is None:
            raise DSError(400, "Content-Type is required with a body")
        if media_type(req.content_type) != media_type(row.content_type):
            raise DSError(
                409, f"Content-Type {req.content_type!r} is not the stream's {row.content_type!r}"
            )
    elif not req.close:
        raise DSError(400, "an empty body appends nothing (send Stream-Closed: true to close)")
    new_producer = None
    extra: dict[str, str] = {}
    if req.producer is not None:
        _pid, epoch, seq = req.producer
        if producer is not None and epoch < producer.epoch:
            raise DSError(
                403,
                f"producer epoch {epoch} is stale (the stream is at {producer.epoch})",
                {"Producer-Epoch": str(producer.epoch)},
            )
        if producer is None or epoch > producer.epoch:
            if seq != 0:
                if producer is None:
                    raise DSError(
                        409,
                        f"a new producer starts at sequence 0, got {seq}",
                        {"Producer-Expected-Seq": "0", "Producer-Received-Seq": str(seq)},
                    )
                raise DSError(400, f"a new epoch must start at sequence 0, got {seq}")
        elif seq <= producer.seq:
            return AppendPlan(204, _producer_headers(epoch, producer.seq), row)
        elif seq > producer.seq + 1:
            raise DSError(
                409,
                f"producer sequence gap: expected {producer.seq + 1}, got {seq}",
                {
                    "Producer-Expected-Seq": str(producer.seq + 1),
                    "Producer-Received-Seq": str(seq),
                },
            )
        new_producer = Producer(epoch, seq)
        extra = _producer_headers(epoch, seq)
    if req.stream_seq is not None:
        if row.stream_seq is not None and req.stream_seq.encode() <= row.stream_seq.encode():
            raise DSError(409, f"Stream-Seq {req.stream_seq!r} is not after {row.stream_seq!r}")
    chunks = chunk_body(row, req.body, allow_empty=False)
    tail = chunks[-1][1] if chunks else row.tail
    new_row = replace(
        row,
        tail=tail,
        touched=now,
        closed=row.closed or req.close,
        closed_by=req.producer if req.close else row.closed_by,
        stream_seq=req.stream_seq if req.stream_seq is not None else row.stream_seq,
    )
    headers = {"Stream-Next-Offset": offset(tail)} | extra
    if new_row.closed:
        headers["Stream-Closed"] = "true"
    # 200 says "new data from a producer"; a close-only request has none.
    status = 200 if new_producer is not None and chunks else 204
    return AppendPlan(status, headers, new_row, chunks, new_producer, changed=True)


def _producer_headers(epoch: int, seq: int) -> dict[str, str]:
    return {"Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


@dataclass(frozen=True)
class Create:
    """One PUT, parsed."""

    content_type: str | None
    ttl: int | None
    expires_at: float | None
    closed: bool
    body: bytes
    fork_of: str | None = None
    fork_offset: str | None = None
    fork_sub: int | None = None


def same_config(row: StreamRow, req: Create) -> bool:
    """Does an existing stream match a repeated PUT (200), or not (409)?"""
    if req.content_type is not None and media_type(req.content_type) != media_type(
        row.content_type
    ):
        return False
    if req.fork_of is None and req.content_type is None and not row.fork_of:
        if media_type(row.content_type) != "application/octet-stream":
            return False
    if req.fork_of != row.fork_of:
        return False
    if req.fork_of is not None and req.fork_offset is not None:
        if (parse_offset(req.fork_offset) or 0) + (req.fork_sub or 0) != row.fork_pos:
            return False
    if req.fork_of is None:
        if req.ttl != row.ttl or req.expires_at != row.expires_at:
            return False
    elif (req.ttl is not None and req.ttl != row.ttl) or (
        req.expires_at is not None and req.expires_at != row.expires_at
    ):
        return False
    return req.closed == row.closed


def check_existing(row: StreamRow, req: Create, path: str) -> None:
    """A PUT of a path that holds a stream: fine (200) only with the same configuration."""
    if row.deleted:
        raise DSError(409, f"{path} was deleted and cannot be created again yet")
    if not same_config(row, req):
        raise DSError(409, f"a stream with another configuration exists at {path}")


def check_source(source: StreamRow | None, path: str) -> StreamRow:
    """A fork's source must exist and not be deleted."""
    if source is None:
        raise DSError(404, f"no source stream at {path}")
    if source.deleted:
        raise DSError(409, f"the source stream {path} was deleted")
    return source


def check_create(req: Create) -> None:
    if req.ttl is not None and req.expires_at is not None:
        raise DSError(400, "give Stream-TTL or Stream-Expires-At, not both")
    if req.fork_of is None and (req.fork_offset is not None or req.fork_sub is not None):
        raise DSError(400, "Stream-Fork-Offset needs Stream-Forked-From")


def fork_expiry(source: StreamRow, req: Create) -> tuple[int | None, float | None]:
    """A fork's TTL and expiry: its own if asked, else the source's (the protocol's table)."""
    if req.ttl is not None or req.expires_at is not None:
        return req.ttl, req.expires_at
    return source.ttl, source.expires_at


def window(
    chunks: list[tuple[int, int, bytes]], pos: int, max_bytes: int
) -> list[tuple[int, int, bytes]]:
    """The chunks a read from ``pos`` returns (``chunks`` in order, each ending
    after ``pos``): the first cut to start at ``pos``, at most ``max_bytes``
    in all but never nothing when there is something."""
    out: list[tuple[int, int, bytes]] = []
    size = 0
    for start, stop, data in chunks:
        if stop <= pos:
            continue
        if start < pos:
            data, start = data[pos - start :], pos
        if out and size + len(data) > max_bytes:
            break
        out.append((start, stop, data))
        size += len(data)
    return out


def fork_chunks(chunks: list[tuple[int, int, bytes]], stop: int) -> list[tuple[int, int, bytes]]:
    """A source's chunks up to position ``stop``, the last cut there (a fork's copy)."""
    out = []
    for start, end, data in chunks:
        if start >= stop:
            break
        if end > stop:
            data, end = data[: stop - start], stop
        out.append((start, end, data))
    return out


def fork_position(source: StreamRow, req: Create) -> int:
    """Where a fork diverges from ``source``: its offset plus sub-offset, at most the tail."""
    pos = source.tail if req.fork_offset is None else parse_offset(req.fork_offset, source.tail)
    assert pos is not None
    if pos > source.tail:
        raise DSError(400, "Stream-Fork-Offset is past the source stream's tail")
    pos += req.fork_sub or 0
    if pos > source.tail:
        raise DSError(400, "Stream-Fork-Sub-Offset reaches past the source stream's data")
    return pos


def new_stream(id_: int, path: str, req: Create, now: float, source: StreamRow | None) -> StreamRow:
    """The row of a stream a PUT creates (a fork's position still to be applied)."""
    content_type = req.content_type
    ttl, expires = req.ttl, req.expires_at
    if source is not None:
        if content_type is not None and media_type(content_type) != media_type(source.content_type):
            raise DSError(409, "a fork's Content-Type must be its source's")
        content_type = source.content_type
        ttl, expires = fork_expiry(source, req)
    return StreamRow(
        id=id_,
        path=path,
        content_type=(content_type or "application/octet-stream").strip(),
        ttl=ttl,
        expires_at=expires,
        touched=now,
        fork_of=req.fork_of,
    )
