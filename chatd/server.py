"""The server: one ownership tree for everything chatd runs.

:func:`serve` opens the asyncio bridge, the Postgres pool and the Redis client
as async context managers, then one root nursery; it starts the committer,
the relay, the hub and the WebSocket listener and reports ``started(server)``
last. Cancelling it stops everything, in reverse order, within bounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import WebSocketRequest, WebSocketServer, serve_websocket

from chatd.admin import serve_admin
from chatd.bus import Bus, open_bus
from chatd.chaos import Chaos
from chatd.config import Config
from chatd.errors import Unavailable
from chatd.gateway import Gateway, open_gateway
from chatd.hub import Hub
from chatd.model import open_model
from chatd.protocol import ProtocolError, Request
from chatd.relay import Relay
from chatd.session import Session
from chatd.store import Store, open_store
from chatd.streams import Streams

log = logging.getLogger("chatd.server")


@dataclass
class Server:
    """A running chatd: what ``serve`` hands to ``task_status.started``."""

    config: Config
    gateway: Gateway
    chaos: Chaos
    store: Store
    bus: Bus
    hub: Hub
    relay: Relay
    streams: Streams
    sessions: set[Session] = field(default_factory=set)
    listener: WebSocketServer | None = None
    #: Port of the admin interface, when ``[chaos].enabled``.
    admin_port: int | None = None
    slow_disconnects: int = 0

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    @property
    def url(self) -> str:
        return f"ws://{self.config.server.host}:{self.port}/"

    def authenticate(self, req: Request) -> str:
        """Resolve a hello to a user name. Token auth plugs in here."""
        if req.get("token") is not None:
            raise ProtocolError(
                "unauthorized", "token authentication is not configured on this server", req.ref
            )
        if not self.config.server.allow_anonymous:
            raise ProtocolError(
                "unauthorized", "anonymous hello is disabled; send a token", req.ref
            )
        return req["user"]

    async def status(self) -> dict[str, Any]:
        """Health of both components and the outbox lag, for operators."""
        out: dict[str, Any] = {
            "postgres": "ok",
            "redis": "ok",
            "connections": len(self.sessions),
            "feeds": len(self.hub.feeds),
            "pubsub_live": self.hub.bus_healthy,
            "committed": self.store.committed,
            "published": self.relay.fresh_published,
            "relayed": self.relay.published,
            "gap_fills": self.hub.gap_fills,
            "stream_fills": self.hub.stream_fills,
            "slow_disconnects": self.slow_disconnects,
            **self.streams.status(),
            "chaos": self.chaos.status(),
        }
        try:
            out.update(await self.store.stats())
            out["postgres"] = "ok"
        except Unavailable as exc:
            out["postgres"] = f"unavailable: {exc.message}"
        try:
            await self.bus.ping()
            out["redis"] = "ok"
        except Unavailable as exc:
            out["redis"] = f"unavailable: {exc.message}"
        return out

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        session = Session(self, ws)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)


async def serve(
    config: Config,
    *,
    chaos: Chaos | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run chatd until cancelled. ``config`` must carry both DSNs."""
    if not config.postgres.dsn or not config.redis.url:
        raise ValueError(
            "serve() needs [postgres].dsn and [redis].url (the CLI starts embedded servers)"
        )
    chaos = chaos or Chaos()
    async with (
        open_gateway(
            chaos,
            postgres_timeout=config.postgres.command_timeout,
            redis_timeout=config.redis.command_timeout,
        ) as gateway,
        open_store(gateway, config) as store,
        open_bus(gateway, config) as bus,
        open_model(config) as model,
        trio.open_nursery() as nursery,
    ):
        hub = Hub(store, bus)
        relay = Relay(gateway, store, bus, config)
        store.on_committed = relay.offer
        streams = Streams(config, store, bus, model)
        hub.on_control = streams.handle_control
        server = Server(config, gateway, chaos, store, bus, hub, relay, streams)
        await nursery.start(store.run_committer)
        await nursery.start(relay.run)
        await nursery.start(hub.run)
        await nursery.start(streams.run)
        if config.chaos.enabled:
            server.admin_port = await nursery.start(serve_admin, server)
        try:
            async with trio.open_nursery() as handlers:
                server.listener = await handlers.start(_listen, server, handlers)
                log.info("chatd listening on %s", server.url)
                task_status.started(server)
                await trio.sleep_forever()
        finally:
            nursery.cancel_scope.cancel()


async def _listen(
    server: Server,
    handlers: trio.Nursery,
    *,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    cfg = server.config.server
    await serve_websocket(
        server._handle,
        cfg.host,
        cfg.port,
        ssl_context=None,
        handler_nursery=handlers,
        max_message_size=cfg.max_frame_bytes,
        connect_timeout=10.0,
        disconnect_timeout=2.0,
        task_status=task_status,
    )
