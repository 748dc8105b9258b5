"""The gate: who may connect, and who a client is.

* **Connections**: at most ``[limits].max_connections`` to this process and
  ``[limits].connections_per_address`` from one address; beyond, the
  handshake is refused (HTTP 503) before a session exists.
* **Origins**: a browser's ``Origin`` must be the server's own or in
  ``[server].allowed_origins``; otherwise any page open in a browser on the
  user's machine could read and write their conversations (cross-site
  WebSocket hijacking). Clients that send no Origin are not browsers.
* **Identity**: ``hello`` (and ``refresh``) resolve to an
  :class:`~chatd.identity.Identity`: in ``jwt`` mode from a verified token,
  in ``anonymous`` mode from the name the client gives. Either way, names
  are checked (:func:`~chatd.identity.check_user`): no reserved name (the
  assistant's), no control, format or bidi characters.
"""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

from chatd.config import AuthConfig, LimitsConfig, ServerConfig
from chatd.identity import Grants, Identity, IdentityError, check_user
from chatd.protocol import ProtocolError, Request
from chatd.tokens import TokenError, TokenVerifier


class Gate:
    def __init__(
        self,
        server: ServerConfig,
        auth: AuthConfig,
        limits: LimitsConfig,
        verifier: TokenVerifier | None,
        reserved: tuple[str, ...],
    ) -> None:
        self._server = server
        self._auth = auth
        self._limits = limits
        self._verifier = verifier
        self._reserved = reserved
        self._by_address: Counter[str] = Counter()
        self.connections = 0
        #: Handshakes refused, by reason.
        self.refused: Counter[str] = Counter()

    # -- connections ------------------------------------------------------

    def admit(self, address: str, origin: str | None, host: str | None) -> str | None:
        """Count a new connection in; or the reason it is refused (nothing counted)."""
        if origin is not None and not self.origin_allowed(origin, host):
            self.refused["origin"] += 1
            return f"origin {origin!r} is not allowed ([server].allowed_origins)"
        if self.connections >= self._limits.max_connections:
            self.refused["max_connections"] += 1
            return "this server is at its connection limit; try another or retry later"
        if self._by_address[address] >= self._limits.connections_per_address:
            self.refused["connections_per_address"] += 1
            return "too many connections from this address"
        self.connections += 1
        self._by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self.connections -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        allowed = self._server.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # The server's own pages (same origin) may always connect.
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()

    # -- identity ---------------------------------------------------------

    async def identify(self, req: Request) -> Identity:
        """Who a ``hello`` or ``refresh`` proves the client to be; ProtocolError if nobody."""
        token = req.get("token")
        if self._auth.mode == "jwt":
            if token is None:
                raise ProtocolError(
                    "unauthorized", "this server needs a token: hello with 'token'", req.ref
                )
            assert self._verifier is not None
            try:
                return await self._verifier.verify(token)
            except TokenError as exc:
                raise ProtocolError(exc.code, exc.message, req.ref) from None
        if token is not None:
            raise ProtocolError(
                "unauthorized",
                "this server runs in anonymous mode (development): hello with 'user', no token",
                req.ref,
            )
        try:
            user = check_user(req["user"], self._reserved)
        except IdentityError as exc:
            raise ProtocolError("bad_field", f"field 'user': {exc}", req.ref) from None
        operator = user in self._auth.anonymous_operators
        return Identity(user, Grants(everything=True, operator=operator))
