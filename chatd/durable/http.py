"""Durable Streams over HTTP: ``/v1/stream/<path>`` (PROTOCOL.md v1 of durable-streams).

``PUT`` creates (or forks), ``POST`` appends (idempotent producers, closing),
``GET`` reads (catch-up, ``live=long-poll``, ``live=sse``), ``HEAD``,
``DELETE``, ``OPTIONS`` (CORS). Access: anonymous mode lets everyone in
(development); with ``[auth].mode = "jwt"`` every request needs
``Authorization: Bearer <token>`` whose grants claim names the streams
(``"streams": {"agents/*": "rw"}``): ``r`` to read, ``w`` to write. The
protocol's rules live in :mod:`chatd.durable.model`; this module parses
requests, shapes answers and runs the live reads.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
import trio

from chatd.durable.agents import PREFIX as AGENT_PREFIX
from chatd.durable.agents import AgentReplies, reply_conv
from chatd.durable.answers import (
    WRITE_TIMEOUT,
    answer,
    answer_error,
    header_map,
    meta,
    url,
)
from chatd.durable.conversations import PREFIX as CONVERSATIONS
from chatd.durable.conversations import Conversations, conversation_id
from chatd.durable.model import (
    Append,
    Create,
    DSError,
    is_true,
    parse_expires,
    parse_int_header,
    parse_offset,
    parse_ttl,
)
from chatd.durable.reads import Reader
from chatd.durable.service import Streams
from chatd.engine.replies import ShuttingDown
from chatd.errors import StoreError, Unavailable
from chatd.identity import Identity
from chatd.protocol import ProtocolError
from chatd.tokens import TokenError

log = logging.getLogger("chatd.durable")

PREFIX = "/v1/stream/"
Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
_REPLIES = "/replies"
Verify = Callable[[str], Awaitable[Identity]]
ConvRights = Callable[[Identity, str], Awaitable[str]]
Chunk = tuple[int, int, bytes]

_EXPOSED = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, "
    "Stream-Expires-At, ETag, Location, Producer-Epoch, Producer-Seq, Producer-Expected-Seq, "
    "Producer-Received-Seq, Stream-SSE-Data-Encoding, Content-Type"
)
_ALLOWED_HEADERS = (
    "Authorization, Content-Type, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Closed, "
    "Stream-Seq, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, Producer-Id, "
    "Producer-Epoch, Producer-Seq"
)
_SECURITY = [
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"cross-origin"),
]
_CATCHUP_CACHE = b"private, max-age=60, stale-while-revalidate=300"


class DurableHTTP:
    """The ASGI side of Durable Streams for one listener."""

    def __init__(
        self,
        streams: Streams,
        *,
        anonymous: bool,
        verify: Verify | None,
        write_timeout: float,
        body_timeout: float = 10.0,
        conversations: Conversations | None = None,
        conv_rights: ConvRights | None = None,
        agents: AgentReplies | None = None,
    ) -> None:
        self._streams = streams
        self._cfg = streams.cfg
        self._anonymous = anonymous
        self._verify = verify
        self._conv_rights = conv_rights
        self._agents = agents
        #: A request body must arrive within this ([http].header_timeout).
        self._body_timeout = body_timeout
        timeout = write_timeout or WRITE_TIMEOUT
        self._draining = trio.Event()
        self._reader = Reader(streams, streams.cfg, timeout, self._draining)
        self._conversations = (
            Reader(conversations, streams.cfg, timeout, self._draining)
            if conversations is not None
            else None
        )
        self.requests = 0

    def drain(self) -> None:
        """The server is stopping: live reads answer at once (clients resume by offset)."""
        self._draining.set()

    def handles(self, path: str) -> bool:
        return path.startswith(PREFIX) or (
            self._conversations is not None and path.startswith(CONVERSATIONS)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests += 1
        method = scope["method"]
        headers = header_map(scope)
        cors = self._cors(headers)
        try:
            if method == "OPTIONS":
                await answer(send, 204, self._preflight(cors))
                return
            if self._agents is not None and scope["path"].endswith(_REPLIES):
                conv = conversation_id(scope["path"][: -len(_REPLIES)])
                if method != "POST":
                    raise DSError(405, "POST here starts a reply an agent streams in")
                user = await self._authorize_conversation(conv, headers, "w")
                await self._start_reply(conv, user, await self._body(receive), send, cors, scope)
                return
            if self._conversations is not None and scope["path"].startswith(CONVERSATIONS):
                conv = conversation_id(scope["path"])
                if method not in ("GET", "HEAD"):
                    raise DSError(405, "a conversation's stream is read-only: send over WebSocket")
                await self._authorize_conversation(conv, headers, "r")
                await self._conversations.get(
                    conv, headers, scope, receive, send, cors, head=method == "HEAD"
                )
                return
            path = _stream_path(scope["path"])
            await self._authorize(method, path, headers)
            if method == "PUT":
                await self._put(path, headers, await self._body(receive), send, cors, scope)
            elif method == "POST":
                await self._post(path, headers, await self._body(receive), send, cors)
            elif method in ("GET", "HEAD"):
                await self._reader.get(
                    path, headers, scope, receive, send, cors, head=method == "HEAD"
                )
            elif method == "DELETE":
                await self._streams.delete(path)
                await answer(send, 204, cors)
            else:
                raise DSError(405, f"{method} is not a Durable Streams method")
        except DSError as exc:
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            await answer_error(send, exc.status, exc.message, cors + extra, method == "HEAD")
        except trio.TooSlowError:
            # A client that stopped reading: its connection is cut, nobody else waits.
            log.info("durable streams: a client stopped reading; its response was cut")
        except StoreError as exc:
            log.error("durable streams: storage refused a request: %s", exc)
            await answer_error(send, 500, "storage refused the request", cors, method == "HEAD")
        except Unavailable as exc:
            await answer_error(
                send,
                503,
                f"storage unavailable, retry: {exc}",
                [*cors, (b"retry-after", b"1")],
                method == "HEAD",
            )

    # -- access -------------------------------------------------------------------

    def _cors(self, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
        origins = self._cfg.cors_origins
        origin = headers.get("origin")
        out = list(_SECURITY)
        if "*" in origins:
            out.append((b"access-control-allow-origin", b"*"))
        elif origin and origin in origins:
            out += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        else:
            return out
        out.append((b"access-control-expose-headers", _EXPOSED.encode()))
        return out

    def _preflight(self, cors: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [
            *cors,
            (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
            (b"access-control-allow-headers", _ALLOWED_HEADERS.encode()),
            (b"access-control-max-age", b"86400"),
        ]

    async def _identity(self, headers: dict[str, str]) -> Identity:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or self._verify is None:
            raise DSError(401, "Authorization: Bearer <token> is required")
        try:
            return await self._verify(auth[len("Bearer ") :].strip())
        except TokenError as exc:
            raise DSError(401, f"token refused: {exc}") from None

    async def _authorize_conversation(self, conv: str, headers: dict[str, str], need: str) -> str:
        """Access to a conversation, as on the WebSocket (grants, then memberships);
        the user's name ("agent" in anonymous mode)."""
        if self._anonymous:
            return "agent"
        identity = await self._identity(headers)
        if self._conv_rights is None or need not in await self._conv_rights(identity, conv):
            word = "read" if need == "r" else "write"
            raise DSError(403, f"no {word} access to conversation {conv!r}")
        return identity.user

    async def _authorize(self, method: str, path: str, headers: dict[str, str]) -> None:
        conv = reply_conv(path)
        if conv is not None or path.startswith(AGENT_PREFIX):
            # A reply's stream: made by POST .../replies, written as its conversation.
            if method in ("PUT", "DELETE") or conv is None:
                raise DSError(
                    403, "replies/ streams are made by POST /v1/conversations/<conv>/replies"
                )
            await self._authorize_conversation(
                conv, headers, "r" if method in ("GET", "HEAD") else "w"
            )
            return
        if self._anonymous:
            return
        identity = await self._identity(headers)
        need = "r" if method in ("GET", "HEAD") else "w"
        if need not in identity.grants.stream_rights(path):
            raise DSError(403, f"no {'read' if need == 'r' else 'write'} access to stream {path}")
        source = headers.get("stream-forked-from")
        if method == "PUT" and source is not None:
            if "r" not in identity.grants.stream_rights(_source_path(source)):
                raise DSError(403, f"no read access to the fork's source {source}")

    async def _body(self, receive: Receive) -> bytes:
        with trio.move_on_after(self._body_timeout):
            return await self._read_body(receive)
        raise DSError(408, f"the body did not arrive within {self._body_timeout:g}s")

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size, limit = [], 0, self._cfg.max_append_bytes
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise DSError(400, "the client left before its body arrived")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise DSError(413, f"the body is larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    # -- writes -------------------------------------------------------------------

    async def _start_reply(
        self,
        conv: str,
        user: str,
        body: bytes,
        send: Send,
        cors: list[tuple[bytes, bytes]],
        scope: Scope,
    ) -> None:
        assert self._agents is not None
        reply_to = None
        if body.strip():
            try:
                asked = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise DSError(400, 'the body must be JSON: {"reply_to": <seq>}') from None
            reply_to = asked.get("reply_to") if isinstance(asked, dict) else None
            if reply_to is not None and (
                isinstance(reply_to, bool) or not isinstance(reply_to, int) or reply_to < 0
            ):
                raise DSError(400, "'reply_to' must be a message seq (an integer >= 0)")
        try:
            reply_id, path = await self._agents.start(conv, user, reply_to)
        except ProtocolError as exc:
            status = 429 if exc.code in ("too_many_streams", "too_many_replies") else 400
            raise DSError(status, exc.message) from None
        except ShuttingDown as exc:
            raise DSError(503, str(exc)) from None
        stream_url = url(scope, PREFIX + path)
        out = [*cors, (b"location", stream_url.encode()), (b"content-type", b"application/json")]
        body = orjson.dumps({"conv": conv, "stream": reply_id, "url": stream_url, "path": path})
        await answer(send, 201, out, body)

    async def _put(
        self,
        path: str,
        headers: dict[str, str],
        body: bytes,
        send: Send,
        cors: list[tuple[bytes, bytes]],
        scope: Scope,
    ) -> None:
        sub = headers.get("stream-fork-sub-offset")
        source = headers.get("stream-forked-from")
        req = Create(
            content_type=headers.get("content-type"),
            ttl=parse_ttl(headers.get("stream-ttl")),
            expires_at=parse_expires(headers.get("stream-expires-at")),
            closed=is_true(headers.get("stream-closed")),
            body=body,
            fork_of=_source_path(source) if source is not None else None,
            fork_offset=headers.get("stream-fork-offset"),
            fork_sub=parse_int_header("Stream-Fork-Sub-Offset", sub) if sub is not None else None,
        )
        if req.fork_offset is not None:
            parse_offset(req.fork_offset)  # malformed: 400 before anything is touched
        created, row = await self._streams.create(path, req)
        out = [*cors, *meta(row)]
        if created:
            out.append((b"location", url(scope, PREFIX + path).encode()))
        await answer(send, 201 if created else 200, out)

    async def _post(
        self,
        path: str,
        headers: dict[str, str],
        body: bytes,
        send: Send,
        cors: list[tuple[bytes, bytes]],
    ) -> None:
        ids = [headers.get(h) for h in ("producer-id", "producer-epoch", "producer-seq")]
        producer = None
        if any(v is not None for v in ids):
            pid, epoch, seq = ids
            if pid is None or epoch is None or seq is None:
                raise DSError(400, "Producer-Id, Producer-Epoch and Producer-Seq go together")
            if not pid:
                raise DSError(400, "Producer-Id must not be empty")
            producer = (
                pid,
                parse_int_header("Producer-Epoch", epoch),
                parse_int_header("Producer-Seq", seq),
            )
        req = Append(
            content_type=headers.get("content-type"),
            body=body,
            close=is_true(headers.get("stream-closed")),
            producer=producer,
            stream_seq=headers.get("stream-seq"),
        )
        plan = await self._streams.append(path, req)
        out = [*cors, *((k.lower().encode(), v.encode()) for k, v in plan.headers.items())]
        await answer(send, plan.status, out)


# -- answers --------------------------------------------------------------------


def _stream_path(raw: str) -> str:
    path = raw[len(PREFIX) :] if raw.startswith(PREFIX) else ""
    if not path or len(path) > 1024:
        raise DSError(404, "a stream's URL is /v1/stream/<path> (at most 1024 characters)")
    if path.split("/", 1)[0] == "__ds" or any(p in ("", ".", "..") for p in path.split("/")):
        raise DSError(404, f"no stream at {path!r} (reserved or malformed path)")
    return path


def _source_path(value: str) -> str:
    """``Stream-Forked-From``: the source's URL path (or its stream path)."""
    value = unquote(value.strip())
    if value.startswith(PREFIX):
        return value[len(PREFIX) :]
    return value.lstrip("/")
