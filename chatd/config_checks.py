"""The checks a configuration must pass before chatd starts; each error names its key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatd.config import Config


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


_HMAC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
LOOPBACK = ("127.0.0.1", "::1", "localhost")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _validate_auth(config: Config) -> None:
    a = config.auth
    if a.mode not in ("anonymous", "jwt"):
        raise ConfigError('[auth].mode must be "anonymous" or "jwt"')
    if a.mode == "anonymous":
        if config.server.host not in LOOPBACK and not a.allow_remote_anonymous:
            raise ConfigError(
                f"[auth].mode is anonymous (any client may claim any name) but [server].host "
                f'is {config.server.host!r}, not loopback: use [auth].mode = "jwt", or set '
                "[auth].allow_remote_anonymous = true for a development network"
            )
        return
    algs = set(a.algorithms)
    if not algs or not algs <= set(_HMAC + _ASYMMETRIC):
        raise ConfigError(
            f"[auth].algorithms must name algorithms among {', '.join(_HMAC + _ASYMMETRIC)}"
        )
    if algs & set(_HMAC) and algs & set(_ASYMMETRIC):
        raise ConfigError(
            "[auth].algorithms must not mix HMAC (HS*) and public-key algorithms: a token "
            "signed with the public key as an HMAC secret would verify"
        )
    if algs & set(_HMAC):
        # RFC 7518 3.2: a key at least as long as the hash.
        need = max(int(alg[2:]) // 8 for alg in algs)
        if len(a.secret.encode()) < need:
            raise ConfigError(
                f"[auth].secret must be at least {need} bytes for {', '.join(sorted(algs))}; "
                "prefer the CHATD_AUTH_SECRET environment variable"
            )
    elif bool(a.public_key_file) == bool(a.jwks_url):
        raise ConfigError(
            f"[auth] needs exactly one of public_key_file or jwks_url for {', '.join(sorted(algs))}"
        )


def validate(config: Config) -> None:
    _validate_auth(config)
    checks = [
        (config.server.port <= 65535, "[server].port must be 0..65535"),
        (config.server.max_frame_bytes >= 1024, "[server].max_frame_bytes must be at least 1024"),
        (config.server.max_text_chars >= 1, "[server].max_text_chars must be at least 1"),
        (config.server.send_queue_frames >= 8, "[server].send_queue_frames must be at least 8"),
        (config.server.max_inflight_sends >= 1, "[server].max_inflight_sends must be at least 1"),
        (config.postgres.pool_max >= 2, "[postgres].pool_max must be at least 2"),
        (config.store.join_batch >= 1, "[store].join_batch must be at least 1"),
        (1 <= config.server.workers <= 64, "[server].workers must be between 1 and 64"),
        (
            config.server.asyncio_bridge in ("thread", "trio-asyncio"),
            '[server].asyncio_bridge must be "thread" or "trio-asyncio"',
        ),
        (
            len(config.server.gc_thresholds) == 3
            and all(t >= 1 for t in config.server.gc_thresholds),
            "[server].gc_thresholds must be three positive integers (young, middle, old)",
        ),
        (
            config.server.workers == 1 or not config.chaos.enabled,
            "[chaos].enabled needs [server].workers = 1 (the break switch is per process)",
        ),
        (config.store.join_loads >= 1, "[store].join_loads must be at least 1"),
        (config.store.page_bytes >= 1024, "[store].page_bytes must be at least 1024"),
        (
            1 <= config.postgres.reads_in_flight < config.postgres.pool_max,
            "[postgres].reads_in_flight must be at least 1 and below [postgres].pool_max",
        ),
        (
            config.postgres.pool_min <= config.postgres.pool_max,
            "[postgres].pool_min must not exceed [postgres].pool_max",
        ),
        (config.postgres.command_timeout > 0, "[postgres].command_timeout must be positive"),
        (config.redis.command_timeout > 0, "[redis].command_timeout must be positive"),
        (config.store.group_commit_max >= 1, "[store].group_commit_max must be at least 1"),
        (config.relay.batch >= 1, "[relay].batch must be at least 1"),
        (config.relay.poll_interval > 0, "[relay].poll_interval must be positive"),
        (config.relay.claim_after > 0, "[relay].claim_after must be positive"),
        (config.relay.publish_queue >= 1, "[relay].publish_queue must be at least 1"),
        (config.retry.backoff_min > 0, "[retry].backoff_min must be positive"),
        (
            config.retry.backoff_max >= config.retry.backoff_min,
            "[retry].backoff_max must not be less than [retry].backoff_min",
        ),
        (config.server.shutdown_grace >= 1, "[server].shutdown_grace must be at least 1 second"),
        (
            bool(config.server.tls_cert) == bool(config.server.tls_key),
            "[server].tls_cert and [server].tls_key go together",
        ),
        (config.auth.membership_ttl > 0, "[auth].membership_ttl must be positive"),
        (config.auth.jwks_timeout > 0, "[auth].jwks_timeout must be positive"),
        (config.limits.send_burst >= 1, "[limits].send_burst must be at least 1"),
        (config.limits.read_burst >= 1, "[limits].read_burst must be at least 1"),
        (config.limits.frame_burst >= 1, "[limits].frame_burst must be at least 1"),
        (config.limits.history_in_flight >= 1, "[limits].history_in_flight must be at least 1"),
        (
            config.limits.replies_per_connection >= 1,
            "[limits].replies_per_connection must be at least 1",
        ),
        (config.limits.replies_per_user >= 1, "[limits].replies_per_user must be at least 1"),
        (config.limits.max_connections >= 1, "[limits].max_connections must be at least 1"),
        (
            config.limits.connections_per_address >= 1,
            "[limits].connections_per_address must be at least 1",
        ),
        (config.limits.write_timeout > 0, "[limits].write_timeout must be positive"),
        (
            config.limits.ping_interval == 0 or config.limits.ping_timeout > 0,
            "[limits].ping_timeout must be positive when [limits].ping_interval is set",
        ),
        (
            config.model.backend in ("fake", "openai"),
            '[model].backend must be "fake" or "openai"',
        ),
        (
            config.model.backend != "openai" or bool(config.model.model),
            "[model].model must name the model when [model].backend is openai",
        ),
        (config.model.context_messages >= 1, "[model].context_messages must be at least 1"),
        (config.streams.max_streams >= 1, "[streams].max_streams must be at least 1"),
        (config.streams.partial_ttl >= 1, "[streams].partial_ttl must be at least 1"),
        (config.streams.max_duration > 0, "[streams].max_duration must be positive"),
        (
            config.streams.persistence in ("transient", "checkpoint"),
            '[streams].persistence must be "transient" or "checkpoint"',
        ),
        (
            config.streams.checkpoint_interval_ms > 0,
            "[streams].checkpoint_interval_ms must be positive",
        ),
        (config.streams.lease >= 0.5, "[streams].lease must be at least 0.5 seconds"),
        (config.streams.takeover_interval > 0, "[streams].takeover_interval must be positive"),
        (bool(config.streams.assistant_user), "[streams].assistant_user must not be empty"),
        (
            not config.http.operator_token or len(config.http.operator_token) >= 16,
            "[http].operator_token must be at least 16 characters",
        ),
        (
            not config.chaos.enabled or bool(config.http.operator_token),
            "[chaos].enabled needs [http].operator_token (at least 16 characters; prefer the "
            "CHATD_OPERATOR_TOKEN environment variable)",
        ),
        (
            not config.http.metrics_auth or bool(config.http.operator_token),
            "[http].metrics_auth needs [http].operator_token",
        ),
        (
            not config.http.operator_listen or _host_port(config.http.operator_listen) is not None,
            '[http].operator_listen must be "" or "HOST:PORT" (port 0..65535), e.g. '
            '"127.0.0.1:8766"',
        ),
        (config.http.max_connections >= 1, "[http].max_connections must be at least 1"),
        (config.http.header_timeout > 0, "[http].header_timeout must be positive"),
        (config.http.keep_alive > 0, "[http].keep_alive must be positive"),
        (config.http.max_body_bytes >= 1024, "[http].max_body_bytes must be at least 1024"),
        (config.http.request_burst >= 1, "[http].request_burst must be at least 1"),
        (config.http.readiness_interval > 0, "[http].readiness_interval must be positive"),
        (config.http.probe_timeout > 0, "[http].probe_timeout must be positive"),
        (config.durable.long_poll_timeout > 0, "[durable].long_poll_timeout must be positive"),
        (config.durable.sse_max_seconds > 0, "[durable].sse_max_seconds must be positive"),
        (
            config.durable.max_append_bytes >= 1024,
            "[durable].max_append_bytes must be at least 1024",
        ),
        (
            config.durable.read_chunk_bytes >= 1024,
            "[durable].read_chunk_bytes must be at least 1024",
        ),
        (config.durable.agent_idle_timeout > 0, "[durable].agent_idle_timeout must be positive"),
        (
            config.durable.expiry_sweep_interval > 0,
            "[durable].expiry_sweep_interval must be positive",
        ),
        (config.log.level in _LOG_LEVELS, f"[log].level must be one of {', '.join(_LOG_LEVELS)}"),
        (config.log.format in ("text", "json"), '[log].format must be "text" or "json"'),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)


def operator_address(text: str, worker: int = 0) -> tuple[str, int]:
    """``[http].operator_listen`` as (host, port); worker ``i`` listens on PORT + i."""
    parsed = _host_port(text)
    assert parsed is not None, "validated at load"
    host, port = parsed
    return host, port + worker if port else 0


def coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """A TOML value as the type of its key's default, or ConfigError naming the key."""
    name = f"[{section}].{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        # A list of integers when the default holds integers, else of strings.
        if default and isinstance(default[0], int):
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                raise ConfigError(f"{name} must be a list of integers, got {value!r}")
            return tuple(value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}")
        return tuple(value)
    raise AssertionError(f"unsupported config type for {name}")  # pragma: no cover
