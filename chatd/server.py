"""The server: one ownership tree for everything ``chatd serve`` runs.

:func:`serve` opens, as async context managers and in this order, the
asyncio bridge, the Postgres log, the Redis transport and the model; then
the engine (:func:`chatd.engine.engine.open_engine`); then the WebSocket
listener, whose connections each run a session. It reports
``started(server)`` last.

**Stopping.** :meth:`Server.shutdown` (the CLI calls it on SIGTERM/SIGINT)
is the orderly way, bounded by ``[server].shutdown_grace``: the listener
stops accepting, the engine drains (every send in flight answered, every
reply ended, every client closed with 1001), the sessions get the rest of
the deadline to finish, then the services and the pools stop. Cancelling
``serve()`` also stops everything within the same deadline: sends in flight
are then answered ``unavailable`` unless their commit finishes in time.
Nothing ``serve()`` started outlives it.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import WebSocketRequest, WebSocketServer, serve_websocket

from chatd.adapters.bridge import open_bridge
from chatd.adapters.keys import open_keys
from chatd.adapters.postgres import PostgresLog, open_postgres_log
from chatd.adapters.redis_transport import RedisTransport, open_redis_transport
from chatd.adapters.websocket import WsConnection, handshake_headers
from chatd.admin import serve_admin
from chatd.chaos import Chaos
from chatd.config import Config, ConfigError, ServerConfig
from chatd.engine.engine import Engine, open_engine
from chatd.model import open_model
from chatd.ports import KeySource
from chatd.shutdown import ShutdownClock
from chatd.tokens import TokenVerifier

log = logging.getLogger("chatd.server")

#: Handshake deadlines for WebSocket clients.
_CONNECT_TIMEOUT = 10.0
_DISCONNECT_TIMEOUT = 2.0


@dataclass
class Server:
    """A running chatd: what ``serve`` hands to ``task_status.started``."""

    config: Config
    engine: Engine
    listener: WebSocketServer | None = None
    #: Port of the admin interface, when ``[chaos].enabled``.
    admin_port: int | None = None
    _stop: trio.Event = field(default_factory=trio.Event)

    @property
    def chaos(self) -> Chaos:
        return self.engine.chaos

    @property
    def log(self) -> PostgresLog:
        assert isinstance(self.engine.log, PostgresLog)
        return self.engine.log

    @property
    def transport(self) -> RedisTransport:
        assert isinstance(self.engine.transport, RedisTransport)
        return self.engine.transport

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.server.tls_cert else "ws"
        return f"{scheme}://{self.config.server.host}:{self.port}/"

    def shutdown(self) -> None:
        """Begin the orderly shutdown; ``serve()`` returns when it is done."""
        self._stop.set()


async def serve(
    config: Config,
    *,
    chaos: Chaos | None = None,
    listener: trio.SocketListener | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run chatd until :meth:`Server.shutdown` or cancellation. ``config`` must carry both DSNs.

    ``listener``: accept on this (a worker's inherited socket) instead of
    opening ``[server].host``/``port``."""
    if not config.postgres.dsn or not config.redis.url:
        raise ValueError(
            "serve() needs [postgres].dsn and [redis].url (the CLI starts embedded servers)"
        )
    chaos = chaos or Chaos()
    shutdown = ShutdownClock(config.server.shutdown_grace)
    ssl_context = _tls(config.server)
    if config.auth.mode == "anonymous":
        log.warning(
            "anonymous mode: clients name themselves and may read and write every "
            'conversation (development only; [auth].mode = "jwt" for real users)'
        )
    async with (
        open_bridge(
            chaos,
            postgres_timeout=config.postgres.command_timeout,
            redis_timeout=config.redis.command_timeout,
        ) as bridge,
        open_postgres_log(bridge, config.postgres, shutdown=shutdown) as pglog,
        open_redis_transport(bridge, config.redis, shutdown=shutdown) as transport,
        open_model(config.model) as model,
        open_keys(config.auth) as keys,
        open_engine(
            config,
            log=pglog,
            transport=transport,
            model=model,
            chaos=chaos,
            shutdown=shutdown,
            verifier=_verifier(config, keys),
        ) as engine,
        trio.open_nursery() as handlers,
    ):
        server = Server(config, engine)
        try:
            async with trio.open_nursery() as accept:
                server.listener = await accept.start(
                    _listen, server, handlers, ssl_context, listener
                )
                if config.chaos.enabled:
                    server.admin_port = await accept.start(serve_admin, server)
                log.info("chatd listening on %s", server.url)
                task_status.started(server)
                await server._stop.wait()
                accept.cancel_scope.cancel()
        finally:
            shutdown.begin()
        log.info("shutting down: draining %d connection(s)", len(engine.sessions))
        await engine.drain()
        # What the sessions do not finish by the deadline is cut (hypercorn's graceful_timeout).
        handlers.cancel_scope.deadline = shutdown.deadline_of("close")


def _tls(cfg: ServerConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[server].tls_cert / tls_key: {exc}") from None
    return context


def _verifier(config: Config, keys: KeySource) -> TokenVerifier | None:
    if config.auth.mode != "jwt":
        return None
    return TokenVerifier(config.auth, keys, (config.streams.assistant_user,))


async def _listen(
    server: Server,
    handlers: trio.Nursery,
    ssl_context: ssl.SSLContext | None,
    listener: trio.SocketListener | None,
    *,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    cfg = server.config.server
    gate = server.engine.gate

    async def handle(request: WebSocketRequest) -> None:
        address, origin, host = handshake_headers(request)
        refusal = gate.admit(address, origin, host)
        if refusal is not None:
            server.engine.refusals.refuse("handshake", str(address), refusal)
            await request.reject(403 if "origin" in refusal else 503, body=refusal.encode())
            return
        try:
            ws = await request.accept()
            await server.engine.run_session(WsConnection(ws))
        finally:
            gate.release(address)

    if listener is not None:
        listeners: list[Any] = [listener]
        if ssl_context is not None:
            listeners = [trio.SSLListener(listener, ssl_context, https_compatible=False)]
        ws_server = WebSocketServer(
            handle,
            listeners,
            handler_nursery=handlers,
            max_message_size=cfg.max_frame_bytes,
            connect_timeout=_CONNECT_TIMEOUT,
            disconnect_timeout=_DISCONNECT_TIMEOUT,
        )
        await ws_server.run(task_status=task_status)
        return
    await serve_websocket(
        handle,
        cfg.host,
        cfg.port,
        ssl_context=ssl_context,
        handler_nursery=handlers,
        max_message_size=cfg.max_frame_bytes,
        connect_timeout=_CONNECT_TIMEOUT,
        disconnect_timeout=_DISCONNECT_TIMEOUT,
        task_status=task_status,
    )
