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
from dataclasses import dataclass, field

import trio
from trio_websocket import WebSocketRequest, WebSocketServer, serve_websocket

from chatd.adapters.bridge import open_bridge
from chatd.adapters.postgres import PostgresLog, open_postgres_log
from chatd.adapters.redis_transport import RedisTransport, open_redis_transport
from chatd.adapters.websocket import WsConnection
from chatd.admin import serve_admin
from chatd.chaos import Chaos
from chatd.config import Config
from chatd.engine.engine import Engine, open_engine
from chatd.model import open_model
from chatd.shutdown import ShutdownClock

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
        return f"ws://{self.config.server.host}:{self.port}/"

    def shutdown(self) -> None:
        """Begin the orderly shutdown; ``serve()`` returns when it is done."""
        self._stop.set()


async def serve(
    config: Config,
    *,
    chaos: Chaos | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run chatd until :meth:`Server.shutdown` or cancellation. ``config`` must carry both DSNs."""
    if not config.postgres.dsn or not config.redis.url:
        raise ValueError(
            "serve() needs [postgres].dsn and [redis].url (the CLI starts embedded servers)"
        )
    chaos = chaos or Chaos()
    shutdown = ShutdownClock(config.server.shutdown_grace)
    async with (
        open_bridge(
            chaos,
            postgres_timeout=config.postgres.command_timeout,
            redis_timeout=config.redis.command_timeout,
        ) as bridge,
        open_postgres_log(bridge, config.postgres, shutdown=shutdown) as pglog,
        open_redis_transport(bridge, config.redis, shutdown=shutdown) as transport,
        open_model(config.model) as model,
        open_engine(
            config, log=pglog, transport=transport, model=model, chaos=chaos, shutdown=shutdown
        ) as engine,
        trio.open_nursery() as handlers,
    ):
        server = Server(config, engine)
        try:
            async with trio.open_nursery() as accept:
                server.listener = await accept.start(_listen, server, handlers)
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


async def _listen(
    server: Server,
    handlers: trio.Nursery,
    *,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    cfg = server.config.server

    async def handle(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await server.engine.run_session(WsConnection(ws))

    await serve_websocket(
        handle,
        cfg.host,
        cfg.port,
        ssl_context=None,
        handler_nursery=handlers,
        max_message_size=cfg.max_frame_bytes,
        connect_timeout=_CONNECT_TIMEOUT,
        disconnect_timeout=_DISCONNECT_TIMEOUT,
        task_status=task_status,
    )
