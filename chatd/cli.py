"""The ``chatd`` command line: serve, migrate, config, bench."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from chatd.config import Config, ConfigError, as_dict, load_config
from chatd.errors import ChatdError

log = logging.getLogger("chatd")


def _load(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and Path("config.toml").is_file():
        path = "config.toml"
    return load_config(path, os.environ)


def _setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _serve_until_signal(config: Config) -> None:
    from chatd.server import serve

    # The receiver stays open through teardown, so a second signal cannot kill
    # chatd halfway through shutdown (and orphan embedded servers).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            print(f"chatd serving on {server.url}", flush=True)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _cmd_serve(args: argparse.Namespace) -> int:
    from chatd.embedded import EmbeddedServices

    config = _load(args)
    if args.port is not None:
        from dataclasses import replace

        config = replace(config, server=replace(config.server, port=args.port))
    _setup_logging(config)
    # SIGTERM while embedded servers start unwinds through their cleanup.
    signal.signal(signal.SIGTERM, _raise_exit)
    with EmbeddedServices(config) as resolved:
        try:
            trio.run(_serve_until_signal, resolved)
        finally:
            # Let the embedded servers stop cleanly whatever arrives now.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


async def _migrate(config: Config) -> list[str]:
    from chatd import schema
    from chatd.chaos import Chaos
    from chatd.gateway import open_gateway
    from chatd.store import open_store

    async with (
        open_gateway(
            Chaos(),
            postgres_timeout=config.postgres.command_timeout,
            redis_timeout=config.redis.command_timeout,
        ) as gw,
        open_store(gw, config, migrate=False) as store,
    ):
        return await gw.postgres(schema.apply, store.pool, deadline=120.0)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from chatd.embedded import EmbeddedServices

    config = _load(args)
    _setup_logging(config)
    # Migrations need only Postgres: never start an embedded Redis for them.
    config = replace(config, redis=replace(config.redis, url=config.redis.url or "redis://unused"))
    with EmbeddedServices(config) as resolved:
        applied = trio.run(_migrate, resolved)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import json

    config = _load(args)
    print(json.dumps(as_dict(config), indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from chatd import bench

    config = _load(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return bench.main(config, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd",
        description="Real-time chat state engine: durable conversations over WebSocket "
        "(Postgres is the truth, Redis the transport).",
    )
    parser.add_argument("--config", "-c", help="config file (default: ./config.toml if present)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "serve", help="run the server (starts embedded PostgreSQL/Redis when no DSN is set)"
    )
    p.add_argument("--port", type=int, help="override [server].port")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("migrate", help="apply pending schema migrations and exit")
    p.set_defaults(func=_cmd_migrate)
    p = sub.add_parser("config", help="print the effective configuration")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("bench", help="benchmarks with printed tables (see 'chatd bench -h')")
    from chatd import bench

    bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"chatd: configuration error: {exc}", file=sys.stderr)
        return 2
    except ChatdError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
