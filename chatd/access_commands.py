"""``chatd token``, ``chatd grant``, ``chatd revoke``, ``chatd members``: access from the shell.

``token`` mints an HMAC token with ``[auth].secret`` (CHATD_AUTH_SECRET), for
development and tests; a real deployment's backend mints its users' tokens
(docs/security.md). The membership commands write the ``conversation_members``
table of the configured Postgres, or of the embedded one, running or not.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import trio

from chatd.config import Config
from chatd.protocol import conv_error


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("token", help="mint a token for a user (HMAC, [auth].secret)")
    p.add_argument("user")
    p.add_argument(
        "--conv",
        action="append",
        default=[],
        metavar="ID=RIGHTS",
        help="a grant, e.g. --conv c1=rw --conv 'team-*=r' (repeatable)",
    )
    p.add_argument(
        "--stream",
        action="append",
        default=[],
        metavar="PATH=RIGHTS",
        help="a Durable Streams grant, e.g. --stream 'agents/*=rw' (repeatable)",
    )
    p.add_argument("--operator", action="store_true", help="may use the operator ops (status)")
    p.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS")
    p.set_defaults(func=_cmd_token)
    for name, help_ in (
        ("grant", "let a user read and/or write a conversation (a membership row)"),
        ("revoke", "remove a user's membership of a conversation"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("conv")
        p.add_argument("user")
        if name == "grant":
            p.add_argument(
                "--read", action="store_true", help="read only (default: read and write)"
            )
            p.add_argument("--write", action="store_true", help="write only")
        p.set_defaults(func=_cmd_membership)
    p = sub.add_parser("members", help="list a conversation's memberships")
    p.add_argument("conv")
    p.set_defaults(func=_cmd_membership)


def _load(args: argparse.Namespace) -> Config:
    from chatd.cli import load_for

    return load_for(args)


def _cmd_token(args: argparse.Namespace) -> int:
    from chatd.identity import IdentityError, check_user
    from chatd.tokens import TokenError, mint

    config = _load(args)
    grants: dict[str, dict[str, str]] = {"conv": {}, "stream": {}}
    for flag, items in (("conv", args.conv), ("stream", args.stream)):
        for item in items:
            name, sep, rights = item.rpartition("=")
            if not sep or not name or not rights or not set(rights) <= {"r", "w"}:
                print(
                    f"chatd: --{flag} {item!r}: expected NAME=RIGHTS with RIGHTS r, w or rw",
                    file=sys.stderr,
                )
                return 2
            grants[flag][name] = rights
    try:
        check_user(args.user, (config.streams.assistant_user,))
        token = mint(
            config.auth,
            args.user,
            convs=grants["conv"],
            streams=grants["stream"],
            operator=args.operator,
            ttl=args.ttl,
        )
    except (IdentityError, TokenError) as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _cmd_membership(args: argparse.Namespace) -> int:
    from chatd.embedded import EmbeddedServices
    from chatd.identity import IdentityError, check_user

    config = _load(args)
    problem = conv_error(args.conv)
    if problem is None and args.command != "members":
        try:
            check_user(args.user, (config.streams.assistant_user,))
        except IdentityError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"chatd: {problem}", file=sys.stderr)
        return 2
    rights = ""
    if args.command == "grant":
        rights = (
            "r" if args.read and not args.write else "w" if args.write and not args.read else "rw"
        )
    # Postgres only: never start an embedded Redis for this.
    config = replace(config, redis=replace(config.redis, url=config.redis.url or "redis://unused"))
    with EmbeddedServices(config, reuse_running=True) as resolved:
        members = trio.run(
            _apply, resolved, args.command, args.conv, getattr(args, "user", ""), rights
        )
    print(json.dumps({"conv": args.conv, "members": members}, indent=2))
    return 0


async def _apply(config: Config, command: str, conv: str, user: str, rights: str) -> dict[str, str]:
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
        open_postgres_log(bridge, config.postgres) as log,
    ):
        if command != "members":
            await log.set_membership(conv, user, rights)
        return await log.members(conv)
