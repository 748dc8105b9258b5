"""A feed's reply frames: deltas deduplicated by offset per subscriber, and gaps filled.

Messages are deduplicated by seq; deltas are deduplicated the same way by
their offset into the reply (code points). Each subscriber holds, per reply,
the offset it has text up to. A delta starting beyond it is a gap (the
transport lost deltas): the rest is sent from the partial the transport
holds. At ``stream.end`` a subscriber still behind gets the rest from the
committed message in the log, before the end frame. A reply's end is
delivered once per subscriber even if it arrives twice (the local copy a
shutting-down process hands over directly, and the transport's).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from chatd.errors import Unavailable
from chatd.protocol import encode
from chatd.records import InFlight, Snapshot

if TYPE_CHECKING:
    from chatd.engine.feed import Feed, Join, StreamFrame, Sub

log = logging.getLogger("chatd.feed")

#: Ends remembered per feed, to deliver each once.
_ENDED_MEMORY = 256


class ReplyFrames:
    def __init__(self, feed: Feed) -> None:
        self._feed = feed
        self._ended: OrderedDict[str, None] = OrderedDict()

    def on_join(
        self, join: Join, snap: Snapshot, inflight: list[InFlight]
    ) -> tuple[list[dict[str, Any]], dict[str, int | None]]:
        """The snapshot's in-flight replies for a joining client, and its offsets."""
        streams: list[dict[str, Any]] = []
        # What the client says it holds counts even for replies the transport did
        # not report (it was unreachable, or restarted empty): their next deltas
        # are then filled from the client's offset, never from 0 again.
        have: dict[str, int | None] = {
            stream: None if stream in snap.committed_streams else offset
            for stream, offset in join.streams.items()
        }
        for f in inflight:
            if f.stream in snap.committed_streams or f.stream in self._ended:
                # Over: late deltas are ignored; the committed message is in the snapshot.
                have[f.stream] = None
                continue
            offset = join.streams.get(f.stream, 0)
            streams.append(
                {"stream": f.stream, **f.meta, "offset": offset, "text": f.text[offset:]}
            )
            have[f.stream] = max(offset, len(f.text))
        return streams, have

    async def on_frame(self, ev: StreamFrame) -> None:
        feed = self._feed
        if ev.stream in self._ended:
            # Over: a late frame (the transport's copy of an end delivered
            # locally first, or deltas behind it) changes nothing.
            return
        if ev.kind == "delta":
            await self._on_delta(ev)
        elif ev.kind == "stream.start":
            for sub in list(feed.subs.values()):
                if ev.stream not in sub.streams:
                    sub.streams[ev.stream] = 0
                    if not sub.client.deliver(ev.raw):
                        feed.drop(sub)
        else:  # stream.end / stream.error
            self._ended[ev.stream] = None
            if len(self._ended) > _ENDED_MEMORY:
                self._ended.popitem(last=False)
            if ev.kind == "stream.end":
                await self._fill_end(ev)
            for sub in list(feed.subs.values()):
                sub.streams.pop(ev.stream, None)
                if not sub.client.deliver(ev.raw):
                    feed.drop(sub)

    async def _on_delta(self, ev: StreamFrame) -> None:
        feed = self._feed
        end = ev.offset + len(ev.text)
        gapped: list[Sub] = []
        for sub in list(feed.subs.values()):
            have = sub.streams.get(ev.stream, 0)
            if have is None or end <= have:
                continue
            if ev.offset > have:
                gapped.append(sub)
                continue
            text = (
                ev.raw
                if ev.offset == have
                else self._delta(ev.stream, have, ev.text[have - ev.offset :])
            )
            if sub.client.deliver(text):
                sub.streams[ev.stream] = end
                feed.counters.deltas_delivered += 1
            else:
                feed.drop(sub)
        if gapped:
            await self._fill_from_partial(ev.stream, gapped)

    async def _fill_end(self, ev: StreamFrame) -> None:
        """Before ``stream.end``, send each lagging client the rest of the reply.

        Deltas lost on the way (Redis blipped near the end of the reply) leave
        nothing in the transport to fill from: the partial goes when the reply
        ends. The committed message in the log is the same text.
        """
        feed = self._feed
        if ev.seq is None or ev.length is None:
            return
        behind = [
            sub
            for sub in feed.subs.values()
            if (have := sub.streams.get(ev.stream)) is not None and have < ev.length
        ]
        if not behind:
            return
        try:
            page = await feed.log.after(feed.conv, ev.seq - 1, 1)
        except Unavailable as exc:
            # The message event (resync) will replace the bubble.
            log.info("could not fill the end of reply %s: %s", ev.stream, exc)
            return
        if not page or page[0]["seq"] != ev.seq or page[0]["id"] != ev.stream:
            return
        body = page[0]["text"]
        feed.counters.stream_fills += 1
        for sub in behind:
            have = sub.streams.get(ev.stream)
            if sub.join.left or have is None or have >= len(body):
                continue
            if sub.client.deliver(self._delta(ev.stream, have, body[have:])):
                sub.streams[ev.stream] = len(body)
            else:
                feed.drop(sub)

    async def _fill_from_partial(self, stream: str, subs: list[Sub]) -> None:
        """Deltas were missed (the transport blipped): send the rest from the partial."""
        feed = self._feed
        feed.counters.stream_fills += 1
        try:
            partial = await feed.transport.read_partial(feed.conv, stream)
        except Unavailable:
            partial = None
        for sub in subs:
            have = sub.streams.get(stream, 0)
            if sub.join.left or have is None:
                continue  # left while the partial was being read
            if partial is None or len(partial) < have:
                # Nothing to fill from now: a later delta tries again, and
                # stream.end fills the rest from the log.
                continue
            if len(partial) > have:
                if not sub.client.deliver(self._delta(stream, have, partial[have:])):
                    feed.drop(sub)
                    continue
            sub.streams[stream] = len(partial)

    # -- replies that ended unseen (for the feed's resync) --------------------

    def followed(self) -> frozenset[str]:
        """Replies some subscriber follows live and has seen no end of."""
        return frozenset(
            stream
            for sub in self._feed.subs.values()
            for stream, have in sub.streams.items()
            if have is not None and stream not in self._ended
        )

    async def running(self, streams: frozenset[str]) -> frozenset[str]:
        """Which of ``streams`` the log still has in flight (registered, not ended)."""
        if not streams:
            return frozenset()
        feed = self._feed
        (held,) = await feed.log.inflight([feed.conv])
        return frozenset(f.stream for f in held) & streams

    def end_vanished(self, gone: frozenset[str], committed: frozenset[str]) -> None:
        """End replies that left the log while this feed was not listening.

        A committed one is over for its followers: the ``message`` event of the
        resync replaces the bubble. One that was never committed ended without
        a message (the model failed, the commit gave up): its followers get the
        ``stream.error`` they would have had, with code ``ended``.
        """
        feed = self._feed
        for stream in gone:
            self._ended[stream] = None
            if len(self._ended) > _ENDED_MEMORY:
                self._ended.popitem(last=False)
            frame = None
            if stream not in committed:
                frame = encode(
                    {
                        "type": "stream.error",
                        "conv": feed.conv,
                        "stream": stream,
                        "code": "ended",
                        "message": "the reply ended while this connection was not "
                        "receiving; nothing was stored",
                        "retryable": True,
                    }
                )
                feed.counters.vanished_replies += 1
            for sub in list(feed.subs.values()):
                if sub.streams.pop(stream, None) is None or frame is None:
                    continue
                if not sub.client.deliver(frame):
                    feed.drop(sub)

    def _delta(self, stream: str, offset: int, text: str) -> str:
        return encode(
            {
                "type": "delta",
                "conv": self._feed.conv,
                "stream": stream,
                "offset": offset,
                "text": text,
            }
        )
