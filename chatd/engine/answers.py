"""What a client is told about its send: the frames that answer a commit's outcome.

Pure functions, no I/O: the session's writer sends what they return. A send
is answered with an ``ack`` after its commit (``duplicate`` if it was
committed before), a retryable ``unavailable`` if the log could not commit it
(the outcome may be unknown: retry with the same id), ``internal`` if the log
refused it. A send asking for a reply is acked with the reply's id once the
reply started, or with an error frame beside the ack saying why it did not.
"""

from __future__ import annotations

from typing import Any

from chatd.engine.ops import SendTag
from chatd.errors import Unavailable
from chatd.protocol import ProtocolError, error_frame
from chatd.records import Outcome


def starts_reply(outcome: Outcome) -> bool:
    """It committed (for the first time) and asked for a reply."""
    result = outcome.result
    return outcome.tag.wants_reply and not isinstance(result, Exception) and not result.duplicate


def retries_a_reply(outcome: Outcome) -> bool:
    """A duplicate of a send that asked for a reply (its reply may be owed)."""
    result = outcome.result
    return outcome.tag.wants_reply and not isinstance(result, Exception) and result.duplicate


def ack(outcome: Outcome) -> dict[str, Any]:
    msg, result = outcome.msg, outcome.result
    assert not isinstance(result, Exception)
    frame = {"type": "ack", "conv": msg.conv, "id": msg.client_id, "seq": result.seq}
    if result.duplicate:
        # The original send started its reply (if it asked for one).
        frame["duplicate"] = True
    return frame


def answer(outcome: Outcome) -> list[dict[str, Any]]:
    """The frames answering a send that starts no reply."""
    msg, result = outcome.msg, outcome.result
    if isinstance(result, Unavailable):
        return [
            error_frame(
                "unavailable", result.message, retryable=True, conv=msg.conv, id=msg.client_id
            )
        ]
    if isinstance(result, Exception):
        return [
            error_frame(
                "internal", "the message could not be stored", conv=msg.conv, id=msg.client_id
            )
        ]
    return [ack(outcome)]


def no_reply(outcome: Outcome, why: ProtocolError | Unavailable) -> list[dict[str, Any]]:
    """The frames answering a committed send whose reply could not start."""
    code = why.code if isinstance(why, ProtocolError) else "unavailable"
    return [ack(outcome), error_frame(code, why.message, retryable=True, conv=outcome.msg.conv)]


def ref_of(outcome: Outcome) -> Any:
    tag: SendTag = outcome.tag
    return tag.ref
