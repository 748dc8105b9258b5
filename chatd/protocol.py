"""Wire protocol v1: JSON text frames. See ``docs/protocol.md``.

:func:`parse` turns one client frame into a validated :class:`Request` or raises
:class:`ProtocolError` naming what is wrong; the connection stays usable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

PROTOCOL_VERSION = 1

#: WebSocket close codes chatd uses (4000-4999 are application codes; a frame over
#: ``[server].max_frame_bytes`` is closed with 1009 by trio-websocket itself).
CLOSE_SLOW_CONSUMER = 4008
CLOSE_HELLO_TIMEOUT = 4001
CLOSE_TOKEN_EXPIRED = 4003
CLOSE_NO_PONG = 4009
CLOSE_GOING_AWAY = 1001

_CONV = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_IDENT_MAX = 128
_USER_MAX = 64
_TOKEN_MAX = 8192

OPS = (
    "hello",
    "refresh",
    "subscribe",
    "unsubscribe",
    "send",
    "stop",
    "history",
    "typing",
    "ping",
    "status",
)
#: Message ids starting with this are reserved for assistant replies.
RESERVED_ID_PREFIX = "~"
_MAX_STREAM_OFFSETS = 64


class ProtocolError(Exception):
    """A refused client frame: ``code`` is stable, ``message`` says what is wrong;
    ``extra`` fields go into the error frame (``conv``, ``retry_after_ms``...)."""

    def __init__(self, code: str, message: str, ref: Any = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.extra = extra


@dataclass(frozen=True)
class Limits:
    max_text_chars: int
    history_max: int


@dataclass(slots=True)
class Request:
    op: str
    ref: Any
    fields: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(frame: dict[str, Any]) -> str:
    """Encode a server frame as JSON text."""
    return orjson.dumps(frame).decode()


def error_frame(
    code: str, message: str, ref: Any = None, *, retryable: bool = False, **extra: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "error",
        "code": code,
        "message": message,
        "retryable": retryable,
    }
    frame.update(extra)
    if ref is not None:
        frame["ref"] = ref
    return frame


def _field(obj: dict[str, Any], name: str, ref: Any, *, required: bool = True) -> Any:
    if name not in obj or obj[name] is None:
        if required:
            raise ProtocolError("bad_field", f"missing field '{name}'", ref)
        return None
    return obj[name]


def _string(
    obj: dict[str, Any], name: str, ref: Any, max_len: int, *, required: bool = True
) -> str | None:
    value = _field(obj, name, ref, required=required)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_field", f"field '{name}' must be a string", ref)
    if not value:
        raise ProtocolError("bad_field", f"field '{name}' must not be empty", ref)
    if len(value) > max_len:
        raise ProtocolError(
            "too_long" if name == "text" else "bad_field",
            f"field '{name}' is too long ({len(value)} > {max_len} characters)",
            ref,
        )
    if "\x00" in value:
        # Postgres cannot store U+0000: refused here, before it reaches a commit.
        raise ProtocolError("bad_field", f"field '{name}' must not contain U+0000", ref)
    return value


def _int(
    obj: dict[str, Any], name: str, ref: Any, *, minimum: int, maximum: int = 2**62
) -> int | None:
    value = _field(obj, name, ref, required=False)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_field", f"field '{name}' must be an integer", ref)
    if not minimum <= value <= maximum:
        raise ProtocolError(
            "bad_field", f"field '{name}' must be between {minimum} and {maximum}", ref
        )
    return value


_CONV_RULE = "a conversation id has 1-128 letters, digits and . _ : @ -"


def conv_error(conv: str) -> str | None:
    """Why ``conv`` is not a conversation id, or None."""
    return None if _CONV.match(conv) else _CONV_RULE


def _conv(obj: dict[str, Any], ref: Any) -> str:
    conv = _string(obj, "conv", ref, 128)
    assert conv is not None
    if not _CONV.match(conv):
        raise ProtocolError("bad_field", f"field 'conv': {_CONV_RULE}", ref)
    return conv


def _stream_offsets(obj: dict[str, Any], ref: Any) -> dict[str, int]:
    value = _field(obj, "streams", ref, required=False)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(
            "bad_field", "field 'streams' must be an object of stream id -> offset", ref
        )
    if len(value) > _MAX_STREAM_OFFSETS:
        raise ProtocolError(
            "bad_field", f"field 'streams' may name at most {_MAX_STREAM_OFFSETS} streams", ref
        )
    for key, offset in value.items():
        if not key or len(key) > _IDENT_MAX or "\x00" in key:
            raise ProtocolError(
                "bad_field",
                "a stream id in 'streams' must be 1-128 characters without U+0000",
                ref,
            )
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**31:
            raise ProtocolError(
                "bad_field", f"offset of stream {key[:64]!r} must be a non-negative integer", ref
            )
    return value


def parse(data: str | bytes, limits: Limits) -> Request:
    """Parse and validate one client frame."""
    if isinstance(data, bytes):
        raise ProtocolError("bad_frame", "binary frames are not supported: send JSON text frames")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", f"a frame must be a JSON object, got {type(obj).__name__}")
    ref = obj.get("ref")
    if ref is not None and not (
        (isinstance(ref, str) and len(ref) <= _IDENT_MAX)
        or (isinstance(ref, int) and not isinstance(ref, bool))
    ):
        raise ProtocolError(
            "bad_field", "field 'ref' must be a string (at most 128 characters) or an integer"
        )
    op = obj.get("op")
    if op is None:
        raise ProtocolError("bad_field", "missing field 'op'", ref)
    if not isinstance(op, str):
        raise ProtocolError("bad_field", "field 'op' must be a string", ref)
    if op not in OPS:
        raise ProtocolError(
            "unknown_op", f"unknown op {op[:64]!r}; expected one of: {', '.join(OPS)}", ref
        )
    fields: dict[str, Any] = {}
    if op == "hello":
        fields["user"] = _string(obj, "user", ref, _USER_MAX, required=False)
        fields["token"] = _string(obj, "token", ref, _TOKEN_MAX, required=False)
        if fields["user"] is None and fields["token"] is None:
            raise ProtocolError("bad_field", "hello needs 'user' or 'token'", ref)
    elif op == "refresh":
        fields["token"] = _string(obj, "token", ref, _TOKEN_MAX)
    elif op == "subscribe":
        fields["conv"] = _conv(obj, ref)
        fields["after"] = _int(obj, "after", ref, minimum=0)
        fields["streams"] = _stream_offsets(obj, ref)
    elif op in ("unsubscribe", "typing"):
        fields["conv"] = _conv(obj, ref)
    elif op == "send":
        fields["conv"] = _conv(obj, ref)
        fields["id"] = _string(obj, "id", ref, _IDENT_MAX)
        if fields["id"].startswith(RESERVED_ID_PREFIX):
            raise ProtocolError(
                "bad_field",
                f"field 'id' must not start with {RESERVED_ID_PREFIX!r} (reserved for replies)",
                ref,
            )
        fields["text"] = _string(obj, "text", ref, limits.max_text_chars)
        reply = _field(obj, "reply", ref, required=False)
        if reply is not None and not isinstance(reply, bool):
            raise ProtocolError("bad_field", "field 'reply' must be true or false", ref)
        fields["reply"] = bool(reply)
    elif op == "stop":
        fields["conv"] = _conv(obj, ref)
        fields["stream"] = _string(obj, "stream", ref, _IDENT_MAX)
    elif op == "history":
        fields["conv"] = _conv(obj, ref)
        fields["before"] = _int(obj, "before", ref, minimum=1)
        limit = _int(obj, "limit", ref, minimum=1, maximum=limits.history_max)
        fields["limit"] = limit if limit is not None else min(50, limits.history_max)
    return Request(op, ref, fields)
