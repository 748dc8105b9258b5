"""Where tokens are verified against (:class:`~chatd.ports.KeySource`).

* a shared HMAC secret, or a PEM public key read at start;
* a JWKS document fetched over HTTP (httpx, which runs natively under Trio),
  with a deadline, cached, refreshed every ``[auth].jwks_refresh`` seconds,
  and fetched again (at most every few seconds) when a token names a key id
  it does not hold yet: a key rotation is picked up without a restart. A
  failed refresh keeps the keys already known.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import trio
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from chatd.config import AuthConfig, ConfigError
from chatd.ports import KeySource
from chatd.tokens import TokenError

log = logging.getLogger("chatd.keys")

#: A token naming an unknown key id fetches the JWKS again, at most this often.
_MISS_REFETCH = 5.0


class StaticKey:
    def __init__(self, key: Any) -> None:
        self._key = key

    async def key(self, kid: str | None, alg: str) -> Any:
        return self._key


class JwksKeys:
    def __init__(self, cfg: AuthConfig, client: httpx.AsyncClient) -> None:
        self._cfg = cfg
        self._client = client
        self._keys: dict[str | None, jwt.PyJWK] = {}
        #: The ``alg`` each key declares, if it does.
        self._algs: dict[str | None, str] = {}
        self._fetched_at = -float("inf")
        self._lock = trio.Lock()
        self.fetches = 0

    async def key(self, kid: str | None, alg: str) -> Any:
        now = trio.current_time()
        stale = now - self._fetched_at > self._cfg.jwks_refresh
        missing = kid not in self._keys and now - self._fetched_at > min(
            _MISS_REFETCH, self._cfg.jwks_refresh
        )
        if stale or missing:
            await self.refresh()
        jwk = self._keys.get(kid)
        if jwk is None and kid is None and len(self._keys) == 1:
            (jwk,) = self._keys.values()
        if jwk is None:
            raise TokenError(f"the token's key id {kid!r} is not among the signing keys")
        declared = self._algs.get(jwk.key_id)
        if declared and declared != alg:
            raise TokenError(f"key {jwk.key_id!r} is for {declared}; the token says {alg}")
        return jwk.key

    async def refresh(self) -> None:
        """Fetch the JWKS now (one fetch at a time); keep the old keys if it fails."""
        async with self._lock:
            if trio.current_time() - self._fetched_at < 0.5:
                return  # another task just did
            try:
                with trio.fail_after(self._cfg.jwks_timeout):
                    resp = await self._client.get(self._cfg.jwks_url)
                resp.raise_for_status()
                data = resp.json()
                jwks = jwt.PyJWKSet.from_dict(data)
            except (trio.TooSlowError, httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
                self._fetched_at = trio.current_time()  # do not hammer it
                log.warning("cannot fetch the JWKS from %s: %r", self._cfg.jwks_url, exc)
                if not self._keys:
                    raise TokenError("the signing keys cannot be fetched right now") from None
                return
            self._keys = {k.key_id: k for k in jwks.keys}
            self._algs = {
                k.get("kid"): k["alg"]
                for k in data.get("keys", [])
                if isinstance(k.get("alg"), str)
            }
            self._fetched_at = trio.current_time()
            self.fetches += 1


@asynccontextmanager
async def open_keys(cfg: AuthConfig) -> AsyncIterator[KeySource]:
    """The key source ``[auth]`` describes, for the lifetime of the server."""
    if any(a.startswith("HS") for a in cfg.algorithms):
        yield StaticKey(cfg.secret)
        return
    if cfg.public_key_file:
        path = trio.Path(cfg.public_key_file)
        try:
            pem = await path.read_bytes()
            key = load_pem_public_key(pem)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[auth].public_key_file {path}: {exc}") from None
        yield StaticKey(key)
        return
    async with httpx.AsyncClient(timeout=cfg.jwks_timeout, follow_redirects=False) as client:
        keys = JwksKeys(cfg, client)
        try:
            await keys.refresh()
        except TokenError:
            log.warning("no signing keys yet: tokens are refused until %s answers", cfg.jwks_url)
        yield keys
