"""The process's one Redis pub/sub connection, on the asyncio side.

:class:`AioSubscriber` is only ever touched by asyncio-side code, one call at
a time (the transport's ``receive``). It shares no mutable state with Trio:
each call receives the set of conversations wanted *now* and returns what it
read together with the set it is subscribed to afterwards.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from chatd.records import BusMessage

log = logging.getLogger("chatd.redis")

CONTROL_CHANNEL = "chatd:control"
_PREFIX = "chatd:conv:"


def channel(conv: str) -> str:
    """The Redis channel carrying a conversation's events."""
    return _PREFIX + conv


def conv_of(chan: str) -> str | None:
    return chan[len(_PREFIX) :] if chan.startswith(_PREFIX) else None


_CHUNK = 500


def _chunks(convs: frozenset[str]) -> list[list[str]]:
    items = list(convs)
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


class AioSubscriber:
    """Subscriptions and reads of one pub/sub connection (asyncio side only)."""

    def __init__(self, client: aioredis.Redis, wake_channel: str) -> None:
        self._client = client
        self._pubsub = client.pubsub()
        self._subscribed: set[str] = set()
        self._broken = False
        #: A channel only this process listens on: a publish to it ends a
        #: blocking read, so the caller comes back with a new wanted set.
        self.wake_channel = wake_channel

    async def receive(
        self,
        full: frozenset[str] | None,
        add: frozenset[str],
        drop: frozenset[str],
        wait: float,
        limit: int,
    ) -> list[BusMessage]:
        """Converge the subscriptions, then read.

        ``full``: every channel wanted (after a failure, or the first time);
        otherwise ``add`` and ``drop`` are the changes since the last call
        that returned (the caller sends the full set again after any
        failure, so deltas never apply to a connection that lost them):
        a storm of joins costs each call its changes, not the whole set.
        Waits at most ``wait`` seconds for the first message; returns early on
        a wake-up. ``subscribe`` confirmations are returned too: each means the
        channel is live (again), so the caller re-reads what it may have missed.
        """
        if self._broken:
            await self._replace()
        try:
            if full is not None:
                add, drop = full - self._subscribed, self._subscribed - full
            if len(drop) > max(_CHUNK, 2 * (len(self._subscribed) - len(drop))):
                # Most channels are going (the storm's clients left): a new
                # connection subscribed to the few that stay is far cheaper
                # than reading a confirmation for every channel dropped. The
                # ones that stay are confirmed anew, and each resyncs.
                keep = (self._subscribed - drop) | add
                await self._replace()
                add, drop = frozenset(keep), frozenset()
            await self._sync(add, drop)
            return await self._read(wait, limit)
        except BaseException:
            # Failed or cancelled mid-call: the connection's state is unknown.
            # Start over with a fresh one next time; every channel is then
            # re-subscribed and each confirmation triggers a resync.
            self._broken = True
            raise

    async def aclose(self) -> None:
        await self._pubsub.aclose()

    async def _replace(self) -> None:
        old, self._pubsub = self._pubsub, self._client.pubsub()
        self._subscribed = set()
        self._broken = False
        try:
            await old.aclose()
        except Exception as exc:  # the old connection is already dead; closing is best-effort
            log.debug("closing a failed pub/sub connection: %s", exc)

    async def _sync(self, add: frozenset[str], drop: frozenset[str]) -> None:
        ps = self._pubsub
        if ps.connection is None:
            await ps.subscribe(CONTROL_CHANNEL, self.wake_channel)
        # In commands of at most _CHUNK channels: packing tens of thousands of
        # channels into one command (a storm of joins, or of leaves) would hold
        # the event loop, and every client with it, for as long.
        for part in _chunks(add):
            await ps.subscribe(*(channel(c) for c in part))
            self._subscribed.update(part)
        for part in _chunks(drop):
            await ps.unsubscribe(*(channel(c) for c in part))
            self._subscribed.difference_update(part)

    async def _read(self, wait: float, limit: int) -> list[BusMessage]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        out: list[BusMessage] = []
        seen = 0
        while True:
            timeout = 0.0 if out else max(0.0, deadline - loop.time())
            msg = await self._pubsub.get_message(timeout=timeout)
            if msg is not None:
                # Every message read counts, confirmations of unsubscribes
                # included: after a storm of leaves they arrive by the
                # thousand, and reading them all in one go would hold the loop.
                seen += 1
                kind = msg["type"]
                chan = msg["channel"]
                conv = conv_of(chan)
                if conv is not None and kind in ("message", "subscribe"):
                    out.append(BusMessage(kind, conv, msg["data"] if kind == "message" else ""))
                elif chan == CONTROL_CHANNEL and kind == "message":
                    out.append(BusMessage("control", "", msg["data"]))
                elif chan == self.wake_channel and kind == "message":
                    return out  # the wanted set changed: come back with the new one
                if seen >= limit:
                    return out
                continue
            if out or loop.time() >= deadline:
                return out
