"""The server: one ownership tree for everything ``chatd serve`` runs.

:func:`serve` opens, as async context managers and in this order, the
asyncio bridge, the Postgres log, the Redis transport and the model; then
the engine (:func:`chatd.engine.engine.open_engine`); then the readiness
probe and the listeners: the public port (WebSocket sessions and plain HTTP,
:mod:`chatd.http.listener`) and, when configured, the operator's own. It
reports ``started(server)`` last.

**Stopping.** :meth:`Server.shutdown` (the CLI calls it on SIGTERM/SIGINT)
is the orderly way. /readyz turns 503 first and stays so while clients are
still served for ``[server].drain_delay``, so a load balancer stops sending
new clients; then new WebSocket upgrades are refused (503) and the drain
begins, bounded by ``[server].shutdown_grace``: the engine drains (every send
in flight answered, every reply ended, every client closed with 1001), the
sessions get the rest of the deadline to finish, then the listeners, the
services and the pools stop. Cancelling ``serve()`` also stops everything
within the same deadline: sends in flight are then answered ``unavailable``
unless their commit finishes in time. Nothing ``serve()`` started outlives it.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from trio_websocket import WebSocketRequest

from chatd.adapters.bridge import open_bridge
from chatd.adapters.keys import open_keys
from chatd.adapters.postgres import PostgresLog, open_postgres_log
from chatd.adapters.postgres_durable import PostgresStreams
from chatd.adapters.redis_transport import RedisTransport, open_redis_transport
from chatd.adapters.websocket import WsAcceptor, WsConnection, handshake_headers
from chatd.chaos import Chaos
from chatd.config import Config, ConfigError, ServerConfig
from chatd.config_checks import operator_address
from chatd.durable.agents import AgentReplies
from chatd.durable.http import DurableHTTP
from chatd.embedded import EmbeddedServices
from chatd.embedded.supervisor import EmbeddedWatch
from chatd.engine.engine import Engine, open_engine
from chatd.http.app import ChatdApp
from chatd.http.listener import HttpFace, serve_operator, serve_public
from chatd.http.metrics import registry_for
from chatd.http.readiness import Readiness
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
    readiness: Readiness
    http: HttpFace
    #: The public port (WebSocket and HTTP), once listening.
    port: int = 0
    #: The operator listener's port, when ``[http].operator_listen`` is set.
    operator_port: int | None = None
    #: False once the drain begins: new WebSocket clients are refused.
    accepting: bool = True
    #: The embedded servers' supervision, when ``chatd serve`` started them.
    embedded: EmbeddedWatch | None = None
    #: Durable Streams over HTTP, when [durable] is enabled.
    durable: DurableHTTP | None = None
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
    def url(self) -> str:
        scheme = "wss" if self.config.server.tls_cert else "ws"
        return f"{scheme}://{self.config.server.host}:{self.port}/"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.config.server.tls_cert else "http"
        return f"{scheme}://{self.config.server.host}:{self.port}"

    @property
    def operator_url(self) -> str:
        """Where /metrics, /status and /chaos are served."""
        if self.operator_port is None:
            return self.http_url
        host, _ = operator_address(self.config.http.operator_listen)
        return f"http://{host}:{self.operator_port}"

    def shutdown(self) -> None:
        """Begin the orderly shutdown; ``serve()`` returns when it is done."""
        self._stop.set()


async def serve(
    config: Config,
    *,
    chaos: Chaos | None = None,
    listener: trio.SocketListener | None = None,
    worker: int = 0,
    embedded: EmbeddedServices | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run chatd until :meth:`Server.shutdown` or cancellation. ``config`` must carry both DSNs.

    ``listener``: accept on this (a worker's inherited socket) instead of
    opening ``[server].host``/``port``; ``worker``: this worker's index (its
    operator listener is on ``[http].operator_listen``'s port + index);
    ``embedded``: the servers the CLI started, restarted here if they die."""
    if not config.postgres.dsn or not config.redis.url:
        raise ValueError(
            "serve() needs [postgres].dsn and [redis].url (the CLI starts embedded servers)"
        )
    chaos = chaos or Chaos()
    shutdown = ShutdownClock(config.server.shutdown_grace)
    ssl_context = _tls(config.server)
    # Listening first: a port in use fails at once, before any server is touched.
    public = await _public_listeners(config.server, listener, ssl_context)
    try:
        await _serve(config, chaos, shutdown, public, ssl_context, worker, embedded, task_status)
    finally:
        for li in public:  # the accept loops close them; these are for a failed start
            await trio.aclose_forcefully(li)


async def _serve(
    config: Config,
    chaos: Chaos,
    shutdown: ShutdownClock,
    public: list[Any],
    ssl_context: ssl.SSLContext | None,
    worker: int,
    embedded: EmbeddedServices | None,
    task_status: trio.TaskStatus[Server],
) -> None:
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
            kind=config.server.asyncio_bridge,
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
            verifier=(verifier := _verifier(config, keys)),
            streams=PostgresStreams(bridge, pglog.pool, pglog.reads),
        ) as engine,
        trio.open_nursery() as handlers,
    ):
        server = Server(
            config,
            engine,
            Readiness(engine, config.http),
            HttpFace(config.http, config.limits.write_timeout),
        )
        server.durable = _durable_http(config, engine, verifier)
        registry = registry_for(server)
        try:
            async with trio.open_nursery() as accept:
                if embedded is not None:
                    server.embedded = EmbeddedWatch(embedded)
                    await accept.start(server.embedded.run)
                await accept.start(server.readiness.run)
                server.port = (
                    public[0].transport_listener.socket.getsockname()[1]
                    if ssl_context
                    else public[0].socket.getsockname()[1]
                )
                await accept.start(
                    partial(
                        serve_public,
                        public,
                        handlers,
                        server.http,
                        ChatdApp(
                            server,
                            registry,
                            operator=not config.http.operator_listen,
                            durable=server.durable,
                        ),
                        WsAcceptor(
                            partial(_session, server),
                            handler_nursery=handlers,
                            max_message_size=config.server.max_frame_bytes,
                            connect_timeout=_CONNECT_TIMEOUT,
                            disconnect_timeout=_DISCONNECT_TIMEOUT,
                        ),
                    )
                )
                if config.http.operator_listen:
                    host, port = operator_address(config.http.operator_listen, worker)
                    ops = await trio.open_tcp_listeners(port, host=host)
                    server.operator_port = ops[0].socket.getsockname()[1]
                    operator_app = ChatdApp(server, registry, operator=True)
                    await accept.start(serve_operator, ops, handlers, server.http, operator_app)
                log.info(
                    "chatd listening on %s (operator endpoints on %s)",
                    server.url,
                    server.operator_url,
                )
                task_status.started(server)
                await server._stop.wait()
                await _drain(server, shutdown)
                accept.cancel_scope.cancel()
        finally:
            server.readiness.draining = True
            shutdown.begin()
        # What the sessions do not finish by the deadline is cut (hypercorn's graceful_timeout).
        handlers.cancel_scope.deadline = shutdown.deadline_of("close")


async def _drain(server: Server, shutdown: ShutdownClock) -> None:
    """Readiness fails first; after ``drain_delay`` new clients are refused and the engine drains."""
    server.readiness.draining = True
    delay = server.config.server.drain_delay
    if delay:
        log.info("shutting down: /readyz answers 503; draining in %gs", delay)
        await trio.sleep(delay)
    server.accepting = False
    shutdown.begin()
    if server.durable is not None:
        server.durable.drain()
    log.info("shutting down: draining %d connection(s)", len(server.engine.sessions))
    await server.engine.drain()
    await server.http.close_idle()


async def _public_listeners(
    cfg: ServerConfig, inherited: trio.SocketListener | None, ssl_context: ssl.SSLContext | None
) -> list[Any]:
    listeners: list[Any] = [inherited] if inherited else await _open_tcp(cfg)
    if ssl_context is not None:
        listeners = [trio.SSLListener(li, ssl_context, https_compatible=True) for li in listeners]
    return listeners


async def _open_tcp(cfg: ServerConfig) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(cfg.port, host=cfg.host)
    except OSError as exc:
        raise ConfigError(
            f"[server].host/port: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
        ) from None


async def _session(server: Server, request: WebSocketRequest) -> None:
    """One WebSocket client, from its accepted handshake to its session's end."""
    gate = server.engine.gate
    address, origin, host = handshake_headers(request)
    if not server.accepting:
        await request.reject(503, body=b"the server is shutting down: reconnect to another")
        return
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


def _durable_http(
    config: Config, engine: Engine, verifier: TokenVerifier | None
) -> DurableHTTP | None:
    if engine.streams is None or engine.conversations is None:
        return None
    conversations = engine.conversations
    return DurableHTTP(
        engine.streams,
        anonymous=config.auth.mode == "anonymous",
        verify=verifier.verify if verifier is not None else None,
        write_timeout=config.limits.write_timeout,
        body_timeout=config.http.header_timeout,
        conversations=conversations,
        conv_rights=engine.access.rights,
        agents=AgentReplies(
            engine.streams, engine.replies.start, conversations.last_seq, config.durable
        ),
    )


def _verifier(config: Config, keys: KeySource) -> TokenVerifier | None:
    if config.auth.mode != "jwt":
        return None
    return TokenVerifier(config.auth, keys, (config.streams.assistant_user,))
