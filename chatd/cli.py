"""The ``chatd`` command line: serve, migrate, config, status, chaos, bench."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from chatd.config import Config, ConfigError, as_dict, load_config
from chatd.errors import ChatdError

log = logging.getLogger("chatd")


def config_path(args: argparse.Namespace) -> str | None:
    """The config file a command reads (:func:`chatd.locations.config_file`)."""
    from chatd.locations import config_file

    path = config_file(args.config, os.environ, Path.cwd())
    return str(path) if path else None


def load_for(args: argparse.Namespace) -> Config:
    """The config a command runs with: its file found, its data directory resolved."""
    from chatd.locations import with_data_dir

    path = config_path(args)
    config = load_config(path, os.environ)
    return with_data_dir(config, Path(path) if path else None, os.environ)


_load = load_for


def _setup_logging(config: Config) -> None:
    from chatd.logs import setup_logging

    setup_logging(config.log)


async def _serve_until_signal(config: Config, worker: bool = False, embedded: Any = None) -> None:
    from chatd.server import serve
    from chatd.workers import inherited_listener

    listener = inherited_listener() if worker else None
    index = int(os.environ.get("CHATD_WORKER", "0")) if worker else 0

    # The receiver stays open through the shutdown: the first signal starts the
    # orderly shutdown, a second one cancels it (still bounded by the same
    # deadline), and none can kill chatd halfway and orphan embedded servers.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(
                    config,
                    listener=listener,
                    worker=index,
                    embedded=embedded,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # done: stop watching for signals

            server = await nursery.start(run)
            _tune_gc(config)
            print(f"chatd serving on {server.url}", flush=True)
            if worker:
                nursery.start_soon(_drain_if_orphaned, server)
            async for signum in signals:
                name = signal.Signals(signum).name
                if not server._stop.is_set():
                    log.info("received %s, shutting down (again to stop at once)", name)
                    server.shutdown()
                else:
                    log.warning("received %s again, stopping now", name)
                    nursery.cancel_scope.cancel()


def _tune_gc(config: Config) -> None:
    """Once serving: freeze what startup made (never garbage) and collect less often.

    The process is ``chatd serve``'s own, so the collector is its to set.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*config.server.gc_thresholds)


async def _drain_if_orphaned(server: Any) -> None:
    """A worker whose supervisor died (killed, it could not say) drains and exits."""
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 - no event exists for a parent dying
        await trio.sleep(1.0)
    log.warning("the supervisor is gone: shutting down this worker")
    server.shutdown()


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _cmd_serve(args: argparse.Namespace) -> int:
    from chatd.embedded import EmbeddedServices

    config = _load(args)
    if args.port is not None:
        from dataclasses import replace

        config = replace(config, server=replace(config.server, port=args.port))
    if args.workers is not None:
        from dataclasses import replace

        config = replace(config, server=replace(config.server, workers=args.workers))
    _setup_logging(config)
    if args.worker:
        # One of a supervisor's workers: its servers are resolved, its socket inherited.
        trio.run(_serve_until_signal, config, True)
        return 0
    # SIGTERM while embedded servers start unwinds through their cleanup.
    signal.signal(signal.SIGTERM, _raise_exit)
    services = EmbeddedServices(config)
    with services as resolved:
        try:
            if resolved.server.workers > 1:
                from chatd.workers import supervise

                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                trio.run(
                    partial(supervise, resolved, config_path=config_path(args), embedded=services)
                )
            else:
                trio.run(_serve_until_signal, resolved, False, services)
        finally:
            # Let the embedded servers stop cleanly whatever arrives now.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


async def _migrate(config: Config) -> list[str]:
    from chatd.adapters import schema
    from chatd.adapters.bridge import open_bridge
    from chatd.adapters.postgres import open_postgres_log
    from chatd.chaos import Chaos

    async with (
        open_bridge(
            Chaos(),
            postgres_timeout=config.postgres.command_timeout,
            redis_timeout=config.redis.command_timeout,
            kind=config.server.asyncio_bridge,
        ) as bridge,
        open_postgres_log(bridge, config.postgres, migrate=False) as pglog,
    ):
        return await bridge.postgres(schema.apply, pglog.pool, deadline=120.0)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from chatd.embedded import EmbeddedServices

    config = _load(args)
    _setup_logging(config)
    # Migrations need only Postgres: never start an embedded Redis for them.
    config = replace(config, redis=replace(config.redis, url=config.redis.url or "redis://unused"))
    services = EmbeddedServices(config)
    with services as resolved:
        applied = trio.run(_migrate, resolved)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


_INIT = """\
# chatd configuration, written by `chatd init`. Every key is optional; the
# reference with every key at its default is config.toml in chatd's
# repository, and `chatd config` prints what chatd runs with. Keep secrets
# in the environment: CHATD_AUTH_SECRET, CHATD_OPERATOR_TOKEN,
# CHATD_POSTGRES_DSN, CHATD_REDIS_URL.

[server]
host = "127.0.0.1"            # "0.0.0.0" for other machines (needs [auth].mode = "jwt")
port = 8765

[auth]
mode = "anonymous"            # development; "jwt" for real users (docs/security.md)

[embedded]
data_dir = "var"              # the embedded servers' data, next to this file

[http]
# operator_listen = "127.0.0.1:8766"   # /metrics, /status, /chaos on a port of their own

[log]
level = "info"
"""


def _cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists():
        print(f"chatd: {path} exists; not overwriting it (remove it first)", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_INIT)
    print(f"wrote {path}; chatd reads it when started from {path.parent.resolve()}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import json

    config = _load(args)
    path = config_path(args)
    print(f"# config file: {path or 'none (all defaults)'}", file=sys.stderr)
    print(json.dumps(as_dict(config), indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from chatd import bench

    config = _load(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return bench.main(config, args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chatd")
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd",
        description="Real-time chat state engine: durable conversations over WebSocket "
        "(Postgres is the truth, Redis the transport).",
    )
    parser.add_argument(
        "--config",
        "-c",
        help="config file (default: $CHATD_CONFIG, ./chatd.toml, ~/.config/chatd/chatd.toml "
        "or, as root, /etc/chatd/chatd.toml; none: all defaults)",
    )
    parser.add_argument("--version", action="version", version=f"chatd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "serve", help="run the server (starts embedded PostgreSQL/Redis when no DSN is set)"
    )
    p.add_argument("--port", type=_port, help="override [server].port (0..65535)")
    p.add_argument(
        "--workers", type=_workers, help="override [server].workers (processes on the port)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("migrate", help="apply pending schema migrations and exit")
    p.set_defaults(func=_cmd_migrate)
    p = sub.add_parser("init", help="write a starting config file (./chatd.toml)")
    p.add_argument("path", nargs="?", default="chatd.toml")
    p.set_defaults(func=_cmd_init)
    p = sub.add_parser("config", help="print the effective configuration")
    p.set_defaults(func=_cmd_config)
    from chatd import operator_commands

    operator_commands.add_parsers(sub)
    from chatd import access_commands

    access_commands.add_parsers(sub)
    p = sub.add_parser("bench", help="benchmarks with printed tables (see 'chatd bench -h')")
    from chatd import bench

    bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `chatd status | head`: the reader left; nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # What a user can get wrong at start is one line naming the fix, also
        # when it surfaced inside Trio's nurseries (an exception group).
        known = _known_errors(exc)
        if known is None:
            raise
        for error in known:
            if isinstance(error, ConfigError):
                print(f"chatd: configuration error: {error}", file=sys.stderr)
            else:
                print(f"chatd: {error}", file=sys.stderr)
        return 2 if all(isinstance(e, ConfigError) for e in known) else 1


def _known_errors(exc: BaseException) -> list[BaseException] | None:
    """The leaves of ``exc`` if every one is a chatd error with a message for users."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for sub in exc.exceptions:
            found = _known_errors(sub)
            if found is None:
                return None
            leaves.extend(found)
        return leaves
    return [exc] if isinstance(exc, ConfigError | ChatdError) else None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0..65535; 0: any free port)")
    return port


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{n} workers: use 1 to 64")
    return n


if __name__ == "__main__":
    sys.exit(main())
