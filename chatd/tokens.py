"""Token authentication: JSON Web Tokens verified with PyJWT, algorithms pinned.

PyJWT is the verifier: widely used, maintained, and it refuses ``alg: none``
and any algorithm not in the list it is given. chatd adds its own guards in
front: the token's ``alg`` must be one of ``[auth].algorithms`` (never taken
from the token), HMAC and public-key algorithms are never mixed (config
validation), ``exp`` and ``sub`` are required, ``iss`` and ``aud`` too when
configured. The user is ``sub``, under the same name rules as anonymous
names; the grants come from ``[auth].grants_claim``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt
import trio

from chatd.config import AuthConfig
from chatd.identity import Grants, Identity, IdentityError, check_user
from chatd.ports import KeySource


class TokenError(Exception):
    """A token that cannot be accepted; ``code`` is the client error code."""

    def __init__(self, message: str, code: str = "unauthorized") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class TokenVerifier:
    cfg: AuthConfig
    keys: KeySource
    #: Names no token's ``sub`` may take (the assistant's).
    reserved: tuple[str, ...]

    async def verify(self, token: str) -> Identity:
        """The identity a token proves; raises TokenError naming what is wrong."""
        cfg = self.cfg
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in cfg.algorithms:
            raise TokenError(
                f"token algorithm {alg!r} is not accepted here (accepted: "
                f"{', '.join(cfg.algorithms)})"
            )
        kid = header.get("kid")
        key = await self.keys.key(kid if isinstance(kid, str) else None, alg)
        required = (
            ["exp", "sub"] + (["iss"] if cfg.issuer else []) + (["aud"] if cfg.audience else [])
        )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(cfg.algorithms),
                audience=cfg.audience or None,
                issuer=cfg.issuer or None,
                leeway=cfg.leeway,
                options={"require": required, "verify_aud": bool(cfg.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired", "token_expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise TokenError("the token is not for this audience (aud)") from None
        except jwt.InvalidIssuerError:
            raise TokenError("the token is not from the expected issuer (iss)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise TokenError("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"the token is not valid: {exc}") from None
        try:
            user = check_user(claims["sub"], self.reserved)
            grants = Grants.from_claim(claims.get(cfg.grants_claim))
        except IdentityError as exc:
            raise TokenError(f"the token is not acceptable: {exc}") from None
        # exp is wall-clock; the session counts down on Trio's clock.
        left = float(claims["exp"]) + cfg.leeway - time.time()
        return Identity(user, grants, trio.current_time() + left, "token")


def mint(
    cfg: AuthConfig,
    user: str,
    *,
    convs: dict[str, str] | None = None,
    operator: bool = False,
    ttl: float = 3600.0,
    streams: dict[str, str] | None = None,
) -> str:
    """An HMAC-signed token for ``user`` (``chatd token``; tests). Production tokens
    come from the application's backend, which holds the secret or private key."""
    hmac = [a for a in cfg.algorithms if a.startswith("HS")]
    if not hmac or not cfg.secret:
        raise TokenError("minting needs an HS* algorithm and [auth].secret (CHATD_AUTH_SECRET)")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl)}
    if cfg.issuer:
        claims["iss"] = cfg.issuer
    if cfg.audience:
        claims["aud"] = cfg.audience
    grants: dict[str, object] = {"convs": dict(convs or {})}
    if streams:
        grants["streams"] = dict(streams)
    if operator:
        grants["operator"] = True
    claims[cfg.grants_claim] = grants
    return jwt.encode(claims, cfg.secret, algorithm=hmac[0])
