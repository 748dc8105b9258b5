"""The chat page at ``/`` ([http].web): static files shipped in ``chatd/web/static``,
read once at start, served with headers that keep the page to its own origin.

The page speaks to chatd like any client (the JavaScript client over the
WebSocket on the same port); the operator panel calls /chaos with the token
the operator types in, so it works only where the operator routes share the
public port.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
}

#: The page runs only its own scripts and styles, talks only to its own origin
#: (and its WebSocket), and may not be framed by another site.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]

Handler = Callable[[bytes], Awaitable[tuple[int, bytes, bytes]]]


def web_routes() -> dict[tuple[str, str], Handler]:
    """``GET /`` and ``GET /web/<file>`` for every file of the page."""
    static = resources.files("chatd.web") / "static"
    routes: dict[tuple[str, str], Handler] = {}
    for entry in static.iterdir():
        ctype = _TYPES.get("." + entry.name.rsplit(".", 1)[-1])
        if ctype is None:
            continue
        handler = _serve(ctype, entry.read_bytes())
        routes[("GET", f"/web/{entry.name}")] = handler
        if entry.name == "index.html":
            routes[("GET", "/")] = handler
    return routes


def _serve(ctype: bytes, data: bytes) -> Handler:
    async def handler(_body: bytes) -> tuple[int, bytes, bytes]:
        return 200, ctype, data

    return handler
