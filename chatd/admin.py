"""The admin interface: a small HTTP/JSON endpoint for operators and ``chatd chaos``.

Off unless ``[chaos].enabled``; listens on ``[chaos].host:port`` (loopback by
default) and requires ``Authorization: Bearer <[chaos].admin_token>`` on every
request. Routes:

* ``GET /status`` — the server's health, outbox lag and counters
* ``GET /chaos`` — the chaos gates
* ``POST /chaos/break`` — ``{"component": "redis", "seconds": 5, "latency_ms": 0, "fraction": null}``
* ``POST /chaos/heal`` — ``{"component": "redis"}`` or ``{}`` for all
"""

from __future__ import annotations

import hmac
import logging
import math
from typing import TYPE_CHECKING, Any

import orjson
import trio

from chatd.chaos import COMPONENTS

if TYPE_CHECKING:
    from chatd.server import Server

log = logging.getLogger("chatd.admin")

_MAX_REQUEST = 64 * 1024
_READ_TIMEOUT = 5.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def serve_admin(
    server: Server, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen for admin requests until cancelled; reports the bound port."""
    cfg = server.config.chaos
    listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
    port = listeners[0].socket.getsockname()[1]
    log.warning("chaos admin interface enabled on %s:%d", cfg.host, port)
    task_status.started(port)
    await trio.serve_listeners(lambda stream: _handle(server, stream), listeners)


async def _handle(server: Server, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.fail_after(_READ_TIMEOUT):
                method, path, headers, body = await _read_request(stream)
            _authorize(server.config.chaos.admin_token, headers)
            result = await _route(server, method, path, body)
            status, payload = 200, result
        except _HTTPError as exc:
            status, payload = exc.status, {"error": exc.message}
        except trio.TooSlowError:
            status, payload = 400, {"error": "request not received in time"}
        except trio.BrokenResourceError:
            return
        data = orjson.dumps(payload)
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            with trio.move_on_after(_READ_TIMEOUT):
                await stream.send_all(head + data)
        except trio.BrokenResourceError:
            pass


async def _read_request(stream: trio.SocketStream) -> tuple[str, str, dict[str, str], bytes]:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = await stream.receive_some(8192)
        if not chunk:
            raise _HTTPError(400, "incomplete request")
        raw += chunk
        if len(raw) > _MAX_REQUEST:
            raise _HTTPError(413, "request too large")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, path, _version = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _HTTPError(400, "malformed HTTP request") from None
    if length > _MAX_REQUEST:
        raise _HTTPError(413, "request too large")
    while len(body) < length:
        chunk = await stream.receive_some(8192)
        if not chunk:
            raise _HTTPError(400, "incomplete request body")
        body += chunk
    return method, path, headers, body[:length]


def _authorize(token: str, headers: dict[str, str]) -> None:
    given = headers.get("authorization", "")
    expected = f"Bearer {token}"
    if not token or not hmac.compare_digest(given.encode(), expected.encode()):
        raise _HTTPError(401, "missing or wrong admin token (Authorization: Bearer ...)")


def _json_body(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _HTTPError(400, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _HTTPError(400, "the body must be a JSON object")
    return obj


def _number(obj: dict[str, Any], key: str, default: float | None) -> float | None:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _HTTPError(400, f"'{key}' must be a number")
    return float(value)


async def _route(server: Server, method: str, path: str, body: bytes) -> dict[str, Any]:
    chaos = server.chaos
    routes = {
        ("GET", "/status"),
        ("GET", "/chaos"),
        ("POST", "/chaos/break"),
        ("POST", "/chaos/heal"),
    }
    if (method, path) not in routes:
        if path in {p for _, p in routes}:
            raise _HTTPError(405, f"{method} is not allowed on {path}")
        raise _HTTPError(
            404, f"no such endpoint {path}; try /status, /chaos, /chaos/break, /chaos/heal"
        )
    if path == "/status":
        return await server.engine.status()
    if path == "/chaos":
        return chaos.status()
    obj = _json_body(body)
    component = obj.get("component")
    if component is not None and component not in COMPONENTS:
        raise _HTTPError(400, f"'component' must be one of {', '.join(COMPONENTS)}")
    if path == "/chaos/heal":
        chaos.heal(component)
        log.warning("chaos: healed %s", component or "all components")
        return chaos.status()
    if component is None:
        raise _HTTPError(400, f"'component' is required: one of {', '.join(COMPONENTS)}")
    seconds = _number(obj, "seconds", None)
    if seconds is None or seconds <= 0:
        raise _HTTPError(400, "'seconds' must be a positive number")
    latency_ms = _number(obj, "latency_ms", 0.0) or 0.0
    fraction = _number(obj, "fraction", None)
    try:
        chaos.break_for(component, seconds, latency=latency_ms / 1000.0, fraction=fraction)
    except ValueError as exc:
        raise _HTTPError(400, str(exc)) from None
    log.warning(
        "chaos: %s broken for %gs (latency %gms, fraction %s)",
        component,
        seconds,
        latency_ms,
        "default" if fraction is None else fraction,
    )
    return chaos.status()
