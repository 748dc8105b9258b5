"""chatd configuration: a frozen object built from ``config.toml``, a section per component.

The checks it must pass are in :mod:`chatd.config_checks`.

Nothing here reads the environment or the filesystem at import time; the CLI
calls :func:`load_config` with an explicit path and environment mapping.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from chatd.config_checks import ConfigError, coerce, validate

__all__ = ["ConfigError", "as_dict", "config_from_dict", "load_config"]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    #: chatd processes serving the port together (one core each); a dead one
    #: is restarted, SIGTERM drains them all. 1: a single process.
    workers: int = 1
    #: Python's garbage collector thresholds for ``chatd serve`` (Python's own
    #: default: 700, 10, 10). A server holds many long-lived objects; with the
    #: default, full collections during a storm of joins stall every client
    #: for 100-300 ms (docs/benchmarks.md). What is alive at startup is frozen.
    gc_thresholds: tuple[int, ...] = (10000, 50, 1000)
    #: A WebSocket frame larger than this closes the connection with 1009.
    max_frame_bytes: int = 65536
    #: Longest accepted message text, in characters.
    max_text_chars: int = 16000
    #: Bounded per-connection send queue; a client that falls further behind
    #: is disconnected with close code 4008 and resumes by cursor.
    send_queue_frames: int = 1000
    send_queue_bytes: int = 4 * 1024 * 1024
    max_subscriptions: int = 100
    #: Sends a single connection may have waiting for their commit.
    max_inflight_sends: int = 64
    #: A connection that has not said hello within this many seconds is closed.
    hello_timeout: float = 10.0
    #: The one deadline of a shutdown: answering every send in flight, ending
    #: every reply, closing every client with 1001 and then the pools.
    shutdown_grace: float = 5.0
    #: Browser origins allowed to connect (``Origin`` header), e.g.
    #: "https://chat.example.com"; the server's own origin always is, clients
    #: that send no Origin (not browsers) always are. "*" allows every origin.
    allowed_origins: tuple[str, ...] = ()
    #: TLS (wss:// and https://): a PEM certificate chain and its key; both or neither.
    tls_cert: str = ""
    tls_key: str = ""
    #: On SIGTERM, /readyz answers 503 for this long while clients are still
    #: served, so a load balancer stops sending new ones before the drain
    #: (``shutdown_grace``) begins. 0: drain at once.
    drain_delay: float = 0.0
    #: How asyncpg and redis-py (asyncio libraries) are reached from Trio:
    #: "trio-asyncio" (their loop runs inside Trio's) or "thread" (their loop
    #: runs on a thread of its own; needs no trio-asyncio, the way to Python
    #: 3.14). docs/operations.md, "The asyncio bridge", has the measurements.
    asyncio_bridge: str = "trio-asyncio"


@dataclass(frozen=True)
class PostgresConfig:
    #: Empty means: start an embedded PostgreSQL under ``embedded.data_dir``.
    dsn: str = ""
    pool_min: int = 2
    pool_max: int = 10
    connect_timeout: float = 5.0
    #: Deadline for every Postgres call made through the gateway.
    command_timeout: float = 5.0
    #: Pool connections reads (snapshots, catch-up, history, memberships) may
    #: hold at once; the others are kept for commits, the relay and leases.
    reads_in_flight: int = 6


@dataclass(frozen=True)
class RedisConfig:
    #: Empty means: start an embedded Redis under ``embedded.data_dir``.
    url: str = ""
    connect_timeout: float = 2.0
    #: Deadline for every Redis call made through the gateway.
    command_timeout: float = 2.0


@dataclass(frozen=True)
class StoreConfig:
    #: Extra time the committer waits to gather a batch once a send arrives.
    #: 0 still batches naturally: sends arriving during a commit form the next batch.
    group_commit_window_ms: float = 0.0
    group_commit_max: int = 256
    #: Messages in a snapshot when ``subscribe`` has no ``after``.
    snapshot_messages: int = 50
    #: Most missed messages a reconnect recovers; beyond it ``recovered`` is false.
    max_catchup: int = 1000
    history_max: int = 500
    #: Joins are served in batches: the conversations whose snapshots one batch
    #: loads together (one round trip each to Redis and Postgres), and the
    #: batches loading at once; later joins wait their turn (no deadline runs
    #: while they wait).
    join_batch: int = 256
    join_loads: int = 2
    #: Largest snapshot or history page, in bytes of messages (about). A
    #: catch-up beyond it is sent in pages the client asks for one by one
    #: (docs/protocol.md), so no client pins more than this in one frame.
    page_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class RelayConfig:
    batch: int = 500
    #: Polling fallback: LISTEN/NOTIFY is a wake-up, not a guarantee.
    poll_interval: float = 1.0
    #: The committing process publishes its own rows at once; a relay's poll
    #: takes only rows older than this (their publisher died or failed).
    claim_after: float = 2.0
    #: Commits waiting to be published by this process; beyond it the rows are
    #: left to the relay.
    publish_queue: int = 1024
    #: VACUUM the outbox after this many rows left it (0: leave it to autovacuum).
    vacuum_every: int = 20000


@dataclass(frozen=True)
class AuthConfig:
    """Who a client is, and what it may do."""

    #: "anonymous" (development: a client names itself and may do anything
    #: but operator ops) or "jwt" (a signed token says who, and its grants what).
    mode: str = "anonymous"
    #: Signing algorithms accepted, pinned: HS256/384/512 with ``secret``,
    #: RS*/ES*/PS*/EdDSA with ``public_key_file`` or ``jwks_url``; never mixed.
    algorithms: tuple[str, ...] = ("HS256",)
    #: The HMAC secret (at least 32 bytes); prefer the CHATD_AUTH_SECRET environment variable.
    secret: str = ""
    public_key_file: str = ""
    #: A JWKS document to take keys from (by ``kid``), fetched with a deadline and cached.
    jwks_url: str = ""
    jwks_refresh: float = 300.0
    jwks_timeout: float = 5.0
    #: When set, tokens must carry exactly this ``iss`` / this ``aud``.
    issuer: str = ""
    audience: str = ""
    #: Clock skew tolerated on ``exp`` and ``nbf``, in seconds.
    leeway: float = 30.0
    #: The claim holding the token's grants: {"convs": {"id" or "prefix*": "r"|"w"|"rw"},
    #: "operator": true}.
    grants_claim: str = "chatd"
    #: Anonymous mode on a non-loopback address is refused unless this is true.
    allow_remote_anonymous: bool = False
    #: Anonymous users allowed the operator ops (``status``); jwt mode: the token says.
    anonymous_operators: tuple[str, ...] = ()
    #: Conversation memberships (``chatd grant``) are re-read this often: a revoked
    #: member loses a live subscription within this bound.
    membership_ttl: float = 5.0


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may spend; each refusal is counted in ``status``."""

    #: Sends per second per connection, sustained (0: no limit), and the burst above it.
    send_rate: float = 20.0
    send_burst: int = 100
    #: Reads per second per connection (0: no limit), and the burst (room for a
    #: reconnecting client resubscribing to all its conversations). A subscribe
    #: costs one; a history page one per 50 messages it asks for.
    read_rate: float = 10.0
    read_burst: int = 120
    #: History pages read from Postgres at once in this process; the rest wait
    #: their turn, so commits always find a pool connection.
    history_in_flight: int = 4
    #: Frames of any kind per second per connection, and the burst. Past them the
    #: server stops reading that connection until the budget refills (no answer:
    #: TCP holds the client back), so no client takes more than its share of CPU.
    frame_rate: float = 100.0
    frame_burst: int = 400
    #: Replies generating at once for one connection / one user (in this process).
    replies_per_connection: int = 2
    replies_per_user: int = 4
    #: Connections to this process in all, and from one address (refused at the handshake).
    max_connections: int = 10000
    connections_per_address: int = 256
    #: The server pings every client this often; no pong within ``ping_timeout``:
    #: the peer is dead and its session ends (0: no keepalive).
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: A batch of frames not written within this: the client is too slow (4008).
    write_timeout: float = 10.0
    #: Refusals logged per minute at most (the rest are counted).
    logged_refusals_per_minute: int = 30


@dataclass(frozen=True)
class RetryConfig:
    """How every component waits out an outage of Postgres or Redis."""

    backoff_min: float = 0.05
    backoff_max: float = 2.0


@dataclass(frozen=True)
class EmbeddedConfig:
    #: Where embedded servers keep their data: relative to the config file;
    #: empty: ~/.local/share/chatd, or /var/lib/chatd as root (chatd/locations.py).
    data_dir: str = ""
    #: Directory holding initdb/pg_ctl/postgres; empty searches PATH and Debian's locations.
    pg_bin_dir: str = ""
    redis_server: str = ""
    #: User PostgreSQL runs as when chatd runs as root (it refuses root);
    #: empty picks ``postgres`` if it exists, else ``nobody``.
    pg_user: str = ""
    start_timeout: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    #: "fake" (deterministic text, no model needed) or "openai" (any
    #: OpenAI-compatible /v1/chat/completions endpoint with stream: true).
    backend: str = "fake"
    fake_tokens: int = 40
    #: Tokens per second; 0 emits as fast as possible.
    fake_token_rate: float = 20.0
    #: Fail after this many tokens (0: never).
    fake_fail_after: int = 0
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    #: Prefer the CHATD_MODEL_API_KEY environment variable to keep it out of files.
    api_key: str = ""
    system_prompt: str = ""
    #: Recent messages of the conversation sent as context.
    context_messages: int = 20
    connect_timeout: float = 5.0
    #: Longest wait for the next chunk of a streamed reply.
    idle_timeout: float = 30.0


@dataclass(frozen=True)
class StreamsConfig:
    #: Replies generating at once in this process; beyond it a reply is refused.
    max_streams: int = 200
    #: A reply generating longer than this fails with stream.error.
    max_duration: float = 300.0
    #: A reply is cut here and committed with status "stopped".
    max_reply_chars: int = 32000
    #: Seconds an in-flight partial lives in Redis without an update.
    partial_ttl: int = 600
    #: How long the final commit of a reply is retried while Postgres is down.
    commit_timeout: float = 10.0
    #: The user id assistant messages are stored under.
    assistant_user: str = "assistant"
    #: The lane waits this long after a token before shipping a batch, so
    #: tokens of many replies share a crossing and a delta may carry several
    #: tokens. 0 ships as soon as the previous batch is done.
    lane_interval_ms: float = 0.0
    #: "transient" (tokens only in Redis; Postgres gets the finished reply) or
    #: "checkpoint" (the partial text is also appended to Postgres every
    #: ``checkpoint_interval_ms``: a reply survives its process and Redis together).
    persistence: str = "transient"
    checkpoint_interval_ms: float = 200.0
    #: A process renews a lease on its replies; past it they are taken over and
    #: committed "interrupted" by another (or a restarted) process, checked every
    #: ``takeover_interval``: a dead owner's replies end within lease + interval.
    lease: float = 5.0
    takeover_interval: float = 1.0


@dataclass(frozen=True)
class HttpConfig:
    """Plain HTTP on the public port (beside WebSocket upgrades), and the operator endpoints."""

    #: Where /metrics, /status and /chaos are served: "" on the public port,
    #: or "HOST:PORT" (e.g. "127.0.0.1:8766") on a listener of their own;
    #: with [server].workers = N, worker i listens on PORT + i.
    operator_listen: str = ""
    #: Bearer token for /status and /chaos (and /metrics with metrics_auth);
    #: 16+ characters; prefer CHATD_OPERATOR_TOKEN. Empty: they answer 403.
    operator_token: str = ""
    #: /metrics asks for the operator token too.
    metrics_auth: bool = False
    #: Plain HTTP connections open at once (WebSocket clients count in [limits]).
    max_connections: int = 256
    #: A request's head must arrive within this, and then its body (408); an idle
    #: keep-alive connection is closed after keep_alive. Neither limits how long
    #: a response (a long-poll, an SSE stream) lasts.
    header_timeout: float = 10.0
    keep_alive: float = 5.0
    max_body_bytes: int = 65536
    #: Serve the chat page at / (and its files under /web/): a client like any
    #: other (it needs a hello), for trying chatd and for the break-switch demo.
    web: bool = True
    #: HTTP requests per second per client address, and in a burst; past them
    #: 429 with Retry-After (0: no limit). Behind a proxy every request comes
    #: from the proxy's address: raise them (or 0, and limit at the proxy).
    requests_per_second: float = 20.0
    request_burst: int = 40
    #: Postgres and Redis are probed this often for /readyz, each probe bounded
    #: by probe_timeout: an outage turns /readyz 503 within their sum.
    readiness_interval: float = 1.0
    probe_timeout: float = 1.0


@dataclass(frozen=True)
class DurableConfig:
    """Durable Streams (the HTTP protocol of seed 004) at ``/v1/stream/``."""

    #: Serve Durable Streams; false: /v1/stream/ answers 404.
    enabled: bool = True
    #: A long-poll read with nothing to return answers 204 after this many seconds.
    long_poll_timeout: float = 20.0
    #: An SSE response is ended after this long (the client reconnects from its
    #: offset): lets proxies and CDNs collapse readers, as the protocol advises.
    sse_max_seconds: float = 60.0
    #: Largest append (or initial PUT body); past it 413.
    max_append_bytes: int = 1048576
    #: Largest catch-up response body; the rest comes on the next read.
    read_chunk_bytes: int = 1048576
    #: Browser origins allowed by CORS ("*": every origin). Access is by bearer
    #: token, never by cookie, so a page of another origin gains nothing it
    #: could not do with the token itself.
    cors_origins: tuple[str, ...] = ("*",)
    #: Expired streams are deleted this often (they answer 404 from the moment
    #: they expire).
    expiry_sweep_interval: float = 30.0
    #: An agent streaming a reply in (POST /v1/conversations/<conv>/replies) that
    #: appends nothing for this long has its reply committed "interrupted".
    agent_idle_timeout: float = 30.0
    #: A reply's stream is kept this long after its last read or write (0: for ever).
    reply_stream_ttl: int = 86400


@dataclass(frozen=True)
class ChaosConfig:
    #: The break switch (`chatd chaos`, POST /chaos/...); off unless enabled.
    enabled: bool = False


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    #: "text" (one line per event) or "json" (one JSON object per line).
    format: str = "text"
    #: The same message (by its template) is logged at most this often a
    #: minute per logger; the next line says how many were left out. 0: no limit.
    repeats_per_minute: int = 20


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    durable: DurableConfig = field(default_factory=DurableConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def with_dsns(self, *, postgres: str | None = None, redis: str | None = None) -> Config:
        """Return a copy with the given DSNs filled in (used for embedded servers)."""
        pg = replace(self.postgres, dsn=postgres) if postgres is not None else self.postgres
        rd = replace(self.redis, url=redis) if redis is not None else self.redis
        return replace(self, postgres=pg, redis=rd)


#: Environment variables that may override a DSN (operators keep secrets out of files).
ENV_OVERRIDES = {
    "CHATD_POSTGRES_DSN": ("postgres", "dsn"),
    "CHATD_REDIS_URL": ("redis", "url"),
    "CHATD_MODEL_API_KEY": ("model", "api_key"),
    "CHATD_OPERATOR_TOKEN": ("http", "operator_token"),
    "CHATD_AUTH_SECRET": ("auth", "secret"),
}


#: Keys that moved: an old config file gets told where.
_MOVED = {
    ("relay", "backoff_min"): "[retry].backoff_min",
    ("relay", "backoff_max"): "[retry].backoff_max",
    ("server", "allow_anonymous"): '[auth].mode ("anonymous" or "jwt")',
    ("chaos", "host"): '[http].operator_listen ("" serves it on the public port)',
    ("chaos", "port"): '[http].operator_listen ("" serves it on the public port)',
    ("chaos", "admin_token"): "[http].operator_token (env CHATD_OPERATOR_TOKEN)",
}


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from parsed TOML, rejecting unknown keys by name."""
    sections: dict[str, Any] = {}
    known = {f.name: f for f in fields(Config)}
    for section, values in data.items():
        if section not in known:
            raise ConfigError(f"unknown config section [{section}]")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] must be a table")
        cls = known[section].default_factory  # type: ignore[misc]
        defaults = cls()
        allowed = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in allowed:
                moved = _MOVED.get((section, key))
                hint = f" (it moved to {moved})" if moved else ""
                raise ConfigError(f"unknown config key [{section}].{key}{hint}")
            kwargs[key] = coerce(section, key, value, getattr(defaults, key))
        sections[section] = cls(**kwargs)
    config = Config(**sections)
    validate(config)
    return config


def load_config(path: str | Path | None, env: Mapping[str, str]) -> Config:
    """Read ``path`` (TOML; ``None`` means all defaults) and apply env overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            data.setdefault(section, {})[key] = env[var]
    return config_from_dict(data)


# What is printed of a config (secrets masked) lives beside it; re-exported here.
from chatd.config_show import as_dict  # noqa: E402
