"""The :class:`~chatd.ports.Transport` on Redis (redis-py, through the bridge).

One client for publishing and the token lane (a Lua script per reply per
batch, pipelined), and one pub/sub connection per process
(:class:`~chatd.adapters.redis_pubsub.AioSubscriber`), multiplexed to every
local subscriber. The pump blocks on its read; a newly wanted conversation
wakes it through a channel of this process's own (the waker task, owned by
:func:`open_redis_transport`'s nursery).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
import trio
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from chatd.adapters.bridge import Bridge
from chatd.adapters.redis_pubsub import CONTROL_CHANNEL, AioSubscriber, channel
from chatd.config import RedisConfig
from chatd.errors import BusUnavailable
from chatd.records import BusMessage, InFlight, LaneOp, join_events
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.redis")

_WAKE_PREFIX = "chatd:wake:"
_RECEIVE_LIMIT = 1000


def _streams_key(conv: str) -> str:
    # Hash: stream id -> stream metadata (JSON), for every in-flight reply.
    return f"chatd:streams:{conv}"


def _partial_prefix(conv: str) -> str:
    return f"chatd:partial:{conv}:"


def _seized_key(conv: str, stream: str) -> str:
    # Set when another process takes a reply over: its owner may publish no more.
    return f"chatd:seized:{conv}:{stream}"


# The streaming lane, one atomic call per reply per batch: extend the partial
# (append only if Redis holds exactly what we think, else report -1 so the
# caller rewrites it whole: Redis may have restarted empty), refresh the TTLs,
# and publish the frames. Appending and publishing atomically means a reader
# that subscribed first and then reads the partial misses nothing. A reply
# another process seized (took over) takes no more text from its old owner:
# -2, nothing done; only its end still goes through.
_LANE_SCRIPT = """
local ttl = tonumber(ARGV[6])
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
if ARGV[2] == 'a' then
  if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[3]) then return -1 end
  if ARGV[4] ~= '' then redis.call('APPEND', KEYS[1], ARGV[4]) end
else
  redis.call('SET', KEYS[1], ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
else
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
for i = 8, #ARGV do redis.call('PUBLISH', ARGV[7], ARGV[i]) end
return redis.call('STRLEN', KEYS[1])
"""

# Take a reply over: from now on its old owner's lane ops are refused; returns
# the partial as it is at that moment (so it is everything anyone was sent).
_SEIZE_SCRIPT = """
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[1]))
return redis.call('GET', KEYS[1])
"""

# Every in-flight reply of a conversation with its partial text, atomically.
_READ_STREAMS_SCRIPT = """
local meta = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #meta, 2 do
  out[#out + 1] = meta[i]
  out[#out + 1] = meta[i + 1]
  out[#out + 1] = redis.call('GET', ARGV[1] .. meta[i]) or ''
end
return out
"""


class _Lua:
    """A Lua script run by its SHA1 (EVALSHA): its text goes to Redis only when
    Redis lacks it (restarted, or SCRIPT FLUSH), not with every call."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def run_many(self, client: aioredis.Redis, calls: Sequence[Sequence[Any]]) -> list[Any]:
        """One pipelined EVALSHA per call (``numkeys, *keys, *args``); the calls
        Redis refused for want of the script (it never ran them) are run again
        once it is loaded. The first other error is raised, as EVAL's would be."""
        results = await self._pipelined(client, calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await client.script_load(self.text)
            again = await self._pipelined(client, [calls[i] for i in missing])
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    async def _pipelined(self, client: aioredis.Redis, calls: Sequence[Sequence[Any]]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(self.sha, *call)
            return list(await pipe.execute(raise_on_error=False))


_LANE = _Lua(_LANE_SCRIPT)
_READ_STREAMS = _Lua(_READ_STREAMS_SCRIPT)


async def _aio_client(cfg: RedisConfig) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        cfg.url,
        socket_timeout=cfg.command_timeout,
        socket_connect_timeout=cfg.connect_timeout,
        # One quick retry recovers a stale connection after a Redis restart;
        # anything longer is the deadline's and the caller's backoff.
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        decode_responses=True,
    )


async def _aio_close(client: aioredis.Redis, subscriber: AioSubscriber) -> None:
    try:
        await subscriber.aclose()
    finally:
        await client.aclose()


async def _aio_publish(client: aioredis.Redis, chan: str, data: str) -> None:
    await client.publish(chan, data)


async def _aio_publish_events(client: aioredis.Redis, events: Sequence[tuple[str, str]]) -> None:
    by_conv: dict[str, list[str]] = {}
    for conv, payload in events:
        by_conv.setdefault(conv, []).append(payload)
    async with client.pipeline(transaction=False) as pipe:
        for conv, payloads in by_conv.items():
            pipe.publish(channel(conv), join_events(payloads))
        await pipe.execute()


async def _aio_ping(client: aioredis.Redis) -> bool:
    return bool(await client.ping())


def _lane_args(op: LaneOp, ttl: int, rewrite: bool) -> list[Any]:
    return [
        op.stream,
        "s" if rewrite else "a",
        op.expect_bytes,
        op.whole() if rewrite else op.text,
        op.meta,
        ttl,
        channel(op.conv),
        *op.frames,
    ]


async def _aio_lane(client: aioredis.Redis, ops: Sequence[LaneOp], ttl: int) -> list[int]:
    keys = [
        (
            _partial_prefix(op.conv) + op.stream,
            _streams_key(op.conv),
            _seized_key(op.conv, op.stream),
        )
        for op in ops
    ]
    calls = [
        (3, *k, *_lane_args(op, ttl, op.expect_bytes < 0)) for op, k in zip(ops, keys, strict=True)
    ]
    results = [int(r) for r in await _LANE.run_many(client, calls)]
    stale = [i for i, r in enumerate(results) if r == -1]
    if stale:
        again = [(3, *keys[i], *_lane_args(ops[i], ttl, True)) for i in stale]
        for i, r in zip(stale, await _LANE.run_many(client, again), strict=True):
            results[i] = int(r)
    return results


async def _aio_read_streams(client: aioredis.Redis, convs: Sequence[str]) -> list[list[InFlight]]:
    # One pipelined round trip; the script reads each conversation atomically.
    replies = await _READ_STREAMS.run_many(
        client, [(1, _streams_key(conv), _partial_prefix(conv)) for conv in convs]
    )
    out = []
    for flat in replies:
        found = []
        for i in range(0, len(flat), 3):
            try:
                meta = orjson.loads(flat[i + 1])
            except orjson.JSONDecodeError:
                continue
            found.append(InFlight(flat[i], meta, flat[i + 2]))
        out.append(found)
    return out


async def _aio_read_partial(client: aioredis.Redis, conv: str, stream: str) -> str | None:
    return await client.get(_partial_prefix(conv) + stream)


async def _aio_seize_partial(
    client: aioredis.Redis, conv: str, stream: str, ttl: int
) -> str | None:
    keys = (_partial_prefix(conv) + stream, _seized_key(conv, stream))
    return await client.eval(_SEIZE_SCRIPT, 2, *keys, ttl)


async def _aio_stream_exists(client: aioredis.Redis, conv: str, stream: str) -> bool:
    return bool(await client.hexists(_streams_key(conv), stream))


class RedisTransport:
    """The Trio side: every call crosses through the bridge."""

    def __init__(self, bridge: Bridge, client: aioredis.Redis, cfg: RedisConfig) -> None:
        self.bridge = bridge
        self.client = client
        self._cfg = cfg
        self._subscriber = AioSubscriber(client, _WAKE_PREFIX + uuid.uuid4().hex)
        #: Conversations local subscribers want; ``receive`` converges Redis to it.
        self._wanted: set[str] = set()
        #: Changes to ``_wanted`` not yet sent to the subscriber.
        self._add: set[str] = set()
        self._drop: set[str] = set()
        #: The subscriber must get the whole set (first call, or after a failure).
        self._need_full = True
        #: What the pub/sub connection was subscribed to after the last ``receive``.
        self.subscribed: set[str] = set()
        self._wake_needed = trio.Event()

    async def publish_events(self, events: Sequence[tuple[str, str]]) -> None:
        await self.bridge.redis(_aio_publish_events, self.client, events)

    async def publish(self, conv: str, data: str) -> None:
        await self.bridge.redis(_aio_publish, self.client, channel(conv), data)

    async def publish_control(self, data: str) -> None:
        await self.bridge.redis(_aio_publish, self.client, CONTROL_CHANNEL, data)

    async def lane(self, ops: Sequence[LaneOp], ttl: int) -> list[int]:
        return await self.bridge.redis(_aio_lane, self.client, ops, ttl)

    async def read_streams(self, convs: Sequence[str]) -> list[list[InFlight]]:
        return await self.bridge.redis(_aio_read_streams, self.client, convs)

    async def read_partial(self, conv: str, stream: str) -> str | None:
        return await self.bridge.redis(_aio_read_partial, self.client, conv, stream)

    async def seize_partial(self, conv: str, stream: str, ttl: int) -> str | None:
        return await self.bridge.redis(_aio_seize_partial, self.client, conv, stream, ttl)

    async def stream_exists(self, conv: str, stream: str) -> bool:
        return await self.bridge.redis(_aio_stream_exists, self.client, conv, stream)

    async def ping(self) -> bool:
        return await self.bridge.redis(_aio_ping, self.client)

    def want(self, conv: str) -> None:
        if conv not in self._wanted:
            self._wanted.add(conv)
            self._add.add(conv)
            self._drop.discard(conv)
            self._wake_needed.set()

    def unwant(self, conv: str) -> None:
        if conv in self._wanted:
            self._wanted.discard(conv)
            self._drop.add(conv)
            self._add.discard(conv)

    async def receive(self, wait: float) -> list[BusMessage]:
        full = frozenset(self._wanted) if self._need_full else None
        add, drop = frozenset(self._add), frozenset(self._drop)
        self._add, self._drop = set(), set()
        try:
            messages = await self.bridge.redis(
                self._subscriber.receive,
                full,
                add,
                drop,
                wait,
                _RECEIVE_LIMIT,
                deadline=wait + self._cfg.command_timeout,
            )
        except BaseException:
            # The subscriber starts over on a new connection: it needs everything.
            self._need_full = True
            raise
        if full is not None:
            self.subscribed = set(full)
            self._need_full = False
        else:
            self.subscribed |= add
            self.subscribed -= drop
        return messages

    async def _wake_receiver(self) -> None:
        """Wake a blocked ``receive`` whenever a subscription is wanted.

        Many joins in a row cost one publish. If the publish fails, the
        receiver still applies the change when its current wait ends.
        """
        while True:
            await self._wake_needed.wait()
            self._wake_needed = trio.Event()
            if not self._add and not self._need_full:
                continue
            try:
                await self.bridge.redis(
                    _aio_publish, self.client, self._subscriber.wake_channel, ""
                )
            except BusUnavailable as exc:
                log.debug("could not wake the pub/sub receiver: %s", exc)


@asynccontextmanager
async def open_redis_transport(
    bridge: Bridge, cfg: RedisConfig, *, shutdown: ShutdownClock | None = None
) -> AsyncIterator[RedisTransport]:
    """Create the Redis client and its waker for the lifetime of the server.

    Redis being down at start is not fatal: it holds no truth, and chatd keeps
    accepting durable writes while the relay waits for it. Closing takes at
    most 2 s, and ends by the shutdown's final deadline.
    """
    client = await bridge.redis(_aio_client, cfg)
    transport = RedisTransport(bridge, client, cfg)
    try:
        await transport.ping()
    except BusUnavailable as exc:
        log.warning(
            "Redis is not reachable at start (%s); continuing, live fan-out waits for it", exc
        )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport._wake_receiver)
            yield transport
            nursery.cancel_scope.cancel()
    finally:
        with (shutdown or ShutdownClock(2.0)).shield(2.0, "final"):
            try:
                await bridge.redis(_aio_close, client, transport._subscriber, deadline=2.0)
            except BusUnavailable as exc:
                log.warning("Redis client did not close cleanly: %s", exc)
