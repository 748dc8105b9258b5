"""chatd's ASGI app: health, readiness, metrics and the operator API.

Routes (JSON unless noted; errors are ``{"error": "..."}`` with the status):

* ``GET /healthz`` — 200 while the process and its event loop answer
* ``GET /readyz`` — 200 when Postgres and Redis answer, migrations are
  current and the server is not draining; else 503 with the reasons
* ``GET /metrics`` — Prometheus text format (token with ``[http].metrics_auth``)
* ``GET /status`` — the server's health, outbox lag and counters (token)
* ``GET /chaos`` — the break switch's gates (token)
* ``POST /chaos/break`` — ``{"component": "redis", "seconds": 5, "latency_ms": 0,
  "fraction": null}`` (token, ``[chaos].enabled``)
* ``POST /chaos/heal`` — ``{"component": "redis"}`` or ``{}`` for all (token, ``[chaos].enabled``)

The operator routes are served on the public port unless
``[http].operator_listen`` gives them a listener of their own; then the
public port serves only health and readiness. The token is compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import trio
from prometheus_client import CollectorRegistry

from chatd.chaos import COMPONENTS
from chatd.durable.http import DurableHTTP
from chatd.http.metrics import CONTENT_TYPE, exposition
from chatd.http.web import SECURITY_HEADERS, web_routes
from chatd.limits import TokenBucket

if TYPE_CHECKING:
    from chatd.server import Server

log = logging.getLogger("chatd.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_JSON = b"application/json"
#: Client addresses with a request budget kept at once.
_MAX_ADDRESSES = 10_000


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ChatdApp:
    """One ASGI app; ``operator`` says whether this listener serves the operator routes."""

    def __init__(
        self,
        server: Server,
        registry: CollectorRegistry,
        *,
        operator: bool,
        durable: DurableHTTP | None = None,
    ) -> None:
        self._server = server
        self._durable = durable
        self._registry = registry
        self._cfg = server.config.http
        routes: dict[tuple[str, str], Callable[[bytes], Awaitable[tuple[int, bytes, bytes]]]]
        routes = {("GET", "/healthz"): self._healthz, ("GET", "/readyz"): self._readyz}
        if self._cfg.web:
            routes |= web_routes()
        if operator:
            routes |= {
                ("GET", "/metrics"): self._metrics,
                ("GET", "/status"): self._status,
                ("GET", "/chaos"): self._chaos_status,
                ("POST", "/chaos/break"): self._chaos_break,
                ("POST", "/chaos/heal"): self._chaos_heal,
            }
        self._routes = routes
        self._paths = {path for _, path in routes}
        #: Request budgets per client address.
        self._buckets: dict[str, TokenBucket] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # never sent: chatd drives connections itself
            return
        if scope["type"] != "http":
            # A WebSocket upgrade reaches hypercorn only when it was malformed.
            await send({"type": "websocket.close", "code": 1002})
            return
        method = scope["method"]
        head = method == "HEAD"
        extra: list[tuple[bytes, bytes]] = []
        wait = self._spend(scope)
        if not wait and self._durable is not None and self._durable.handles(scope["path"]):
            await self._durable(scope, receive, send)
            return
        try:
            if wait:
                extra.append((b"retry-after", str(math.ceil(wait)).encode()))
                raise HTTPError(429, "too many requests from this address: retry later")
            handler = self._route("GET" if head else method, scope["path"])
            self._authorize(scope)
            body = await self._body(receive)
            status, ctype, data = await handler(body)
        except HTTPError as exc:
            status, ctype, data = exc.status, _JSON, orjson.dumps({"error": exc.message})
        headers = [
            (b"content-type", ctype),
            (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"),
            *SECURITY_HEADERS,
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else data})

    def _route(
        self, method: str, path: str
    ) -> Callable[[bytes], Awaitable[tuple[int, bytes, bytes]]]:
        handler = self._routes.get((method, path))
        if handler is not None:
            return handler
        if path in self._paths:
            raise HTTPError(405, f"{method} is not allowed on {path}")
        raise HTTPError(404, f"no such endpoint {path}; try {', '.join(sorted(self._paths))}")

    def _spend(self, scope: Scope) -> float:
        """Charge one request to its address's budget: 0, or the seconds to wait."""
        cfg = self._cfg
        if cfg.requests_per_second <= 0:
            return 0.0
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= _MAX_ADDRESSES:
                self._buckets.clear()  # a flood of addresses: start every budget afresh
            bucket = self._buckets[address] = TokenBucket(
                cfg.requests_per_second, cfg.request_burst
            )
        return bucket.take()

    def _authorize(self, scope: Scope) -> None:
        path = scope["path"]
        if path in ("/healthz", "/readyz") or (path == "/metrics" and not self._cfg.metrics_auth):
            return
        if path == "/" or path.startswith("/web/"):
            return  # the page: what it shows needs a hello like any client
        token = self._cfg.operator_token
        if not token:
            raise HTTPError(403, "the operator API is off: set [http].operator_token")
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
        if not hmac.compare_digest(given, b"Bearer " + token.encode()):
            self._server.engine.refusals.refuse("unauthorized", "operator", f"{path}: bad token")
            raise HTTPError(401, "missing or wrong operator token (Authorization: Bearer ...)")

    async def _body(self, receive: Receive) -> bytes:
        with trio.move_on_after(self._cfg.header_timeout):
            return await self._read_body(receive)
        raise HTTPError(408, f"the body did not arrive within {self._cfg.header_timeout:g}s")

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b""  # the client left
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._cfg.max_body_bytes:
                raise HTTPError(413, f"the body is larger than {self._cfg.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    # -- routes ---------------------------------------------------------------

    async def _healthz(self, _body: bytes) -> tuple[int, bytes, bytes]:
        lag = self._server.readiness.loop_lag
        return 200, _JSON, orjson.dumps({"status": "ok", "loop_lag_ms": round(lag * 1000, 1)})

    async def _readyz(self, _body: bytes) -> tuple[int, bytes, bytes]:
        reasons = self._server.readiness.reasons()
        if reasons:
            return 503, _JSON, orjson.dumps({"ready": False, "reasons": reasons})
        return 200, _JSON, orjson.dumps({"ready": True})

    async def _metrics(self, _body: bytes) -> tuple[int, bytes, bytes]:
        return 200, CONTENT_TYPE.encode(), exposition(self._registry)

    async def _status(self, _body: bytes) -> tuple[int, bytes, bytes]:
        status = await self._server.engine.status()
        status["ready"] = self._server.readiness.reasons() or True
        watch = self._server.embedded
        if watch is not None:
            status["embedded"] = {
                name: {"up": name not in watch.down, "restarts": watch.restarts[name]}
                for name in watch.servers
            }
        return 200, _JSON, orjson.dumps(status)

    async def _chaos_status(self, _body: bytes) -> tuple[int, bytes, bytes]:
        return 200, _JSON, orjson.dumps(self._server.chaos.status())

    def _switch_on(self) -> None:
        if not self._server.config.chaos.enabled:
            raise HTTPError(403, "the break switch is off: set [chaos].enabled = true")

    async def _chaos_heal(self, body: bytes) -> tuple[int, bytes, bytes]:
        self._switch_on()
        component = _component(_json_object(body))
        self._server.chaos.heal(component)
        log.warning("chaos: healed %s", component or "all components")
        return await self._chaos_status(b"")

    async def _chaos_break(self, body: bytes) -> tuple[int, bytes, bytes]:
        self._switch_on()
        obj = _json_object(body)
        component = _component(obj)
        if component is None:
            raise HTTPError(400, f"'component' is required: one of {', '.join(COMPONENTS)}")
        seconds = _number(obj, "seconds", None)
        if seconds is None or seconds <= 0:
            raise HTTPError(400, "'seconds' must be a positive number")
        latency_ms = _number(obj, "latency_ms", 0.0) or 0.0
        fraction = _number(obj, "fraction", None)
        try:
            self._server.chaos.break_for(
                component, seconds, latency=latency_ms / 1000.0, fraction=fraction
            )
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        log.warning(
            "chaos: %s broken for %gs (latency %gms, fraction %s)",
            component,
            seconds,
            latency_ms,
            "default" if fraction is None else fraction,
        )
        return await self._chaos_status(b"")


def _json_object(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return obj


def _component(obj: dict[str, Any]) -> str | None:
    component = obj.get("component")
    if component is not None and component not in COMPONENTS:
        raise HTTPError(400, f"'component' must be one of {', '.join(COMPONENTS)}")
    return component


def _number(obj: dict[str, Any], key: str, default: float | None) -> float | None:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise HTTPError(400, f"'{key}' must be a number")
    return float(value)
