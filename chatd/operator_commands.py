"""``chatd status`` and ``chatd chaos``: a running server's operator endpoints from the shell.

They call ``GET /status`` and ``/chaos`` (chatd/http/app.py) with the operator
token from ``CHATD_OPERATOR_TOKEN`` or ``[http].operator_token``, at
``--url``, else ``[http].operator_listen``, else the server's own port.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from chatd.config import Config


def _load(args: argparse.Namespace) -> Config:
    from chatd.cli import load_for

    return load_for(args)


def _admin_request(
    args: argparse.Namespace, method: str, path: str, body: dict | None = None
) -> int:
    """Call a running server's operator endpoint; print its JSON answer."""
    import json

    import httpx

    config = _load(args)
    url = args.url or _operator_url(config)
    token = config.http.operator_token
    if not token:
        print(
            "chatd: no operator token: set CHATD_OPERATOR_TOKEN (or [http].operator_token) to "
            "the server's token",
            file=sys.stderr,
        )
        return 2
    try:
        resp = httpx.request(
            method,
            url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=5.0,
        )
    except httpx.HTTPError as exc:
        print(
            f"chatd: cannot reach chatd's operator endpoints at {url}: {exc} "
            "(is the server running? is --url or [http].operator_listen right?)",
            file=sys.stderr,
        )
        return 1
    try:
        data = resp.json()
    except ValueError:
        data = {"error": resp.text}
    if resp.status_code != 200:
        print(f"chatd: {resp.status_code}: {data.get('error', data)}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2))
    return 0


def _operator_url(config: Config) -> str:
    from chatd.config_checks import operator_address

    if config.http.operator_listen:
        host, port = operator_address(config.http.operator_listen)
    else:
        host, port = config.server.host, config.server.port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if config.server.tls_cert and not config.http.operator_listen else "http"
    return f"{scheme}://{host}:{port}"


def _cmd_status(args: argparse.Namespace) -> int:
    return _admin_request(args, "GET", "/status")


def _cmd_chaos(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _admin_request(args, "GET", "/chaos")
    if args.action == "heal":
        return _admin_request(args, "POST", "/chaos/heal", {"component": args.component})
    body = {
        "component": args.component,
        "seconds": args.seconds,
        "latency_ms": args.latency,
        "fraction": args.fraction,
    }
    return _admin_request(args, "POST", "/chaos/break", body)


def add_parsers(sub: Any) -> None:
    url_help = (
        "the server's operator endpoints (default: [http].operator_listen, else [server].host:port)"
    )
    p = sub.add_parser(
        "status",
        help="health, outbox lag and counters of a running server (needs the operator token)",
    )
    p.add_argument("--url", "--admin", dest="url", help=url_help)
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser(
        "chaos",
        help="break Postgres or Redis on a running server (needs [chaos].enabled)",
        description="Open a chaos gate on a running chatd: while it is open every call to the "
        "component fails as in an outage (or is delayed, or a fraction fails). The operator "
        "token comes from CHATD_OPERATOR_TOKEN or [http].operator_token.",
    )
    p.add_argument("--url", "--admin", dest="url", help=url_help)
    chaos_sub = p.add_subparsers(dest="action", required=True)
    b = chaos_sub.add_parser("break", help="break a component for some seconds")
    b.add_argument("component", choices=["postgres", "redis"])
    b.add_argument("--for", dest="seconds", type=float, required=True, metavar="SECONDS")
    b.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay every call by MS instead of failing it",
    )
    b.add_argument(
        "--fraction",
        type=float,
        default=None,
        metavar="F",
        help="fail only this fraction (0-1) of calls",
    )
    h = chaos_sub.add_parser("heal", help="close the gate of one component, or all")
    h.add_argument("component", nargs="?", choices=["postgres", "redis"])
    chaos_sub.add_parser("status", help="show the gates")
    p.set_defaults(func=_cmd_chaos)
