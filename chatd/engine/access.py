"""Access: whether a client may read or write a conversation, checked on every op.

A user's rights on a conversation are its token's grants
(:class:`~chatd.identity.Grants`, no I/O) together with its membership row in
the log (``conversation_members``), which this service caches for
``[auth].membership_ttl`` seconds. Subscriptions that only a membership
allows are watched: every ``membership_ttl`` seconds the service re-reads,
in one round trip, the rows every watched subscription relies on, and hands
each one whose read right is gone back to its session (``revoke``, into the
session's inbox), which ends it. So a revoked member loses a live
subscription within ``membership_ttl`` (plus one round trip).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from chatd.config import AuthConfig
from chatd.errors import Unavailable
from chatd.identity import Identity, merge_rights
from chatd.ports import Log
from chatd.protocol import ProtocolError

log = logging.getLogger("chatd.access")

_WORDS = {"r": "read", "w": "write"}


class Watcher(Protocol):
    """A session, as the membership sweep sees it."""

    identity: Identity | None

    def revoke(self, conv: str) -> None:
        """Its read right on ``conv`` is gone: end the subscription (never blocks)."""
        ...


class Access:
    """Owned by :func:`open_access`."""

    def __init__(self, log: Log, cfg: AuthConfig) -> None:
        self._log = log
        self._cfg = cfg
        #: (conv, user) -> (rights from membership, when read)
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self._watched: dict[Watcher, set[str]] = {}
        self.revocations = 0

    async def rights(self, identity: Identity, conv: str) -> str:
        """The rights ``identity`` has on ``conv``: ``""``, ``"r"``, ``"w"`` or ``"rw"``."""
        token = identity.grants.rights(conv)
        if token == "rw":
            return token
        return merge_rights(token, await self._membership(conv, identity.user))

    async def require(self, identity: Identity, conv: str, need: str, ref: Any) -> str:
        """Raise ``forbidden`` unless ``identity`` has the right ``need`` on ``conv``."""
        rights = await self.rights(identity, conv)
        if need not in rights:
            raise ProtocolError(
                "forbidden",
                f"no {_WORDS[need]} access to conversation {conv!r} for {identity.user!r}",
                ref,
                conv=conv,
            )
        return rights

    def watch(self, watcher: Watcher, conv: str) -> None:
        """``watcher`` reads ``conv`` by membership only: revoke it when that goes."""
        self._watched.setdefault(watcher, set()).add(conv)

    def unwatch(self, watcher: Watcher, conv: str | None = None) -> None:
        convs = self._watched.get(watcher)
        if convs is None:
            return
        if conv is None:
            convs.clear()
        else:
            convs.discard(conv)
        if not convs:
            del self._watched[watcher]

    async def _membership(self, conv: str, user: str) -> str:
        hit = self._cache.get((conv, user))
        if hit is not None and trio.current_time() - hit[1] < self._cfg.membership_ttl:
            return hit[0]
        rows = await self._log.memberships([(conv, user)])
        rights = rows.get((conv, user), "")
        self._cache[(conv, user)] = (rights, trio.current_time())
        return rights

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(self._cfg.membership_ttl)
            now = trio.current_time()
            # Stale entries go (they are read again on the next use).
            for key in [
                k for k, (_, at) in self._cache.items() if now - at >= self._cfg.membership_ttl
            ]:
                del self._cache[key]
            watched = [
                (w, conv) for w, convs in self._watched.items() for conv in convs if w.identity
            ]
            if not watched:
                continue
            pairs = list({(conv, w.identity.user) for w, conv in watched if w.identity})
            try:
                rows = await self._log.memberships(pairs)
            except Unavailable as exc:
                # Never revoke on a failed read: try again next round.
                log.debug("membership re-check postponed: %s", exc)
                continue
            now = trio.current_time()
            for pair in pairs:
                self._cache[pair] = (rows.get(pair, ""), now)
            for w, conv in watched:
                identity = w.identity
                assert identity is not None
                rights = merge_rights(
                    identity.grants.rights(conv), rows.get((conv, identity.user), "")
                )
                if "r" not in rights:
                    self.revocations += 1
                    self.unwatch(w, conv)
                    w.revoke(conv)


@asynccontextmanager
async def open_access(log: Log, cfg: AuthConfig) -> AsyncIterator[Access]:
    """Decide access, and re-check watched memberships, for the duration of the block."""
    access = Access(log, cfg)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(access._sweep, name="membership sweep")
        yield access
        nursery.cancel_scope.cancel()
