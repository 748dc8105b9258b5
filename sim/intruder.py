"""The intruder: a client trying what its grants do not allow, and what it sees.

Invariant 10 of docs/invariants.md, no access without a grant. The intruder
(user ``x``) holds a token granting one conversation of the run, read only.
The program may make it a member of another for a while (``Member``: a
membership row, read only; it subscribes; the row is deleted when the time
is up), and make it try any op on any conversation (``Intrude``). Checked:

* it never has a write right, so every ``send``, ``stop`` and ``typing`` is
  refused (``forbidden``, or ``unavailable`` while the log is unreachable),
  and nothing it sent is ever stored;
* a read (``subscribe``, ``history``) of a conversation it was never granted
  nor a member of is refused, and no frame of such a conversation ever
  reaches it; a read of its granted conversation is never ``forbidden``, nor
  one of a conversation it has been a member of long enough for every cache
  to have seen the row;
* once a membership is revoked (and the log is reachable), its live
  subscription ends (``unsubscribed``) within ``[auth].membership_ttl`` and a
  read of the log; no event of that conversation reaches it after that end,
  and a read is refused once every cache has expired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from chatd.ports import ConnectionGone
from sim.config import MEMBERSHIP_TTL, sim_config
from tests.client import Client

if TYPE_CHECKING:
    from sim.world import SimWorld

USER = "x"
READ_OPS = ("subscribe", "history")
WRITE_OPS = ("send", "stop", "typing")
#: A membership change is seen by every cache of the process within this
#: (entries live ``membership_ttl``, stamped after a read that may take up to
#: the command timeout).
SETTLE = MEMBERSHIP_TTL + sim_config(peer=False).postgres.command_timeout + 0.1
#: Events that carry a conversation's content.
_CONTENT = ("snapshot", "message", "history", "stream.start", "delta", "stream.end", "typing")


@dataclass
class Intruder:
    client: Client
    #: The conversation its token lets it read.
    granted: str
    #: (time, frame) for every frame it received, in order.
    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    #: conv -> [[admitted at, revoked at or None], ...]
    memberships: dict[str, list[list[float | None]]] = field(default_factory=dict)
    gone: bool = False
    _refs: int = 0
    _waiting: dict[str, trio.Event] = field(default_factory=dict)
    _answers: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def read(self) -> None:
        """Read every frame (so the server never finds it slow), answer requests."""
        try:
            while True:
                frame = json.loads(await self.client.ws.get_message())
                self.frames.append((trio.current_time(), frame))
                ref = frame.get("ref")
                if ref in self._waiting:
                    self._answers[ref] = frame
                    self._waiting.pop(ref).set()
        except ConnectionGone:
            self.gone = True
            for event in self._waiting.values():
                event.set()

    async def request(self, frame: dict[str, Any], timeout: float = 10.0) -> dict[str, Any] | None:
        """The answer to ``frame``, or None if the connection is gone."""
        self._refs += 1
        ref = f"x{self._refs}"
        done = self._waiting[ref] = trio.Event()
        try:
            await self.client.send({**frame, "ref": ref})
        except ConnectionGone:
            return None
        with trio.fail_after(timeout):
            await done.wait()
        return self._answers.pop(ref, None)

    async def _typing(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """Typing is answered only when refused; ops are handled in order, so a
        ping after it is answered after that refusal, if there is one."""
        self._refs += 1
        ref = f"x{self._refs}"
        self._waiting[ref] = trio.Event()
        try:
            await self.client.send({**frame, "ref": ref})
        except ConnectionGone:
            return None
        pong = await self.request({"op": "ping"})
        if pong is None:
            return None
        self._waiting.pop(ref, None)
        return self._answers.pop(ref, {"type": "accepted"})

    # -- what it may do ------------------------------------------------------

    def member_since(self, conv: str) -> float | None:
        """When its current membership of ``conv`` began (None: not a member)."""
        spans = self.memberships.get(conv)
        if spans and spans[-1][1] is None:
            return spans[-1][0]
        return None

    def never_readable(self, conv: str) -> bool:
        return conv != self.granted and conv not in self.memberships

    def surely_readable(self, conv: str, now: float) -> bool:
        since = self.member_since(conv)
        return conv == self.granted or (since is not None and now - since > SETTLE)

    def surely_unreadable(self, conv: str, now: float) -> bool:
        if self.never_readable(conv):
            return True
        if conv == self.granted or self.member_since(conv) is not None:
            return False
        revoked = self.memberships[conv][-1][1]
        assert revoked is not None
        return now - revoked > SETTLE

    async def attempt(self, conv: str, op: str) -> None:
        """Try ``op`` on ``conv``; assert the answer its rights call for."""
        now = trio.current_time()
        frame: dict[str, Any] = {"op": op, "conv": conv}
        if op == "send":
            frame |= {"id": f"x-{now:.6f}", "text": "intrusion", "reply": True}
        elif op == "stop":
            frame["stream"] = "~none"
        elif op == "history":
            frame["limit"] = 50
        elif op == "subscribe":
            frame["after"] = 0
        if op == "typing":
            answer = await self._typing(frame)
        else:
            answer = await self.request(frame)
        if answer is None:
            return  # the connection is gone (a harness fault, not the server's answer)
        refused = answer.get("type") == "error"
        code = answer.get("code")
        what = f"intruder {op} on {conv!r} at {now:.3f}s"
        if op in WRITE_OPS or self.surely_unreadable(conv, now):
            assert refused, f"{what}: no right, yet answered {answer}"
            assert code == "forbidden" or (code == "unavailable" and answer.get("retryable")), (
                f"{what}: refused with {answer}, not forbidden"
            )
        elif self.surely_readable(conv, now):
            assert code != "forbidden", f"{what}: it may read it, yet {answer}"

    async def probe(self, world: SimWorld) -> None:
        """At the end: no revoked subscription is left, no read is let through."""
        for conv in world.convs():
            if conv == self.granted:
                continue
            answer = await self.request({"op": "unsubscribe", "conv": conv})
            if answer is None:
                return
            if self.member_since(conv) is None:
                assert answer.get("code") == "not_subscribed", (
                    f"intruder still subscribed to {conv!r}, not a member "
                    f"(revoked at {self._revoked_at(conv)}): {answer}"
                )
                answer = await self.request({"op": "history", "conv": conv, "limit": 50})
                assert answer is None or answer.get("code") == "forbidden", (
                    f"intruder read {conv!r}, not a member: {answer}"
                )

    def _revoked_at(self, conv: str) -> float | None:
        spans = self.memberships.get(conv)
        return spans[-1][1] if spans else None

    def check_frames(self) -> None:
        """Nothing of a conversation it could not read reached it; nothing after
        a revoked subscription's end, until it subscribed again."""
        ended: set[str] = set()
        for at, frame in self.frames:
            conv = frame.get("conv")
            kind = frame.get("type")
            if conv is None or kind not in (*_CONTENT, "unsubscribed"):
                continue
            assert not self.never_readable(conv), (
                f"intruder received {kind} of {conv!r} at {at:.3f}s: never granted: {frame}"
            )
            if kind == "unsubscribed":
                ended.add(conv)
            elif kind == "snapshot":
                ended.discard(conv)
            elif kind != "history":
                assert conv not in ended, (
                    f"intruder received {kind} of {conv!r} at {at:.3f}s after its "
                    f"subscription was revoked: {frame}"
                )


def check_nothing_stored(world: SimWorld) -> None:
    assert world.db is not None
    for conv, stored in world.db.convs.items():
        for m in stored.messages:
            assert m["user"] != USER, f"the intruder's send was stored in {conv!r}: {m}"


async def settle(intruder: Intruder) -> None:
    """Wait until every membership change has reached every cache and sweep."""
    changes = [
        t
        for spans in intruder.memberships.values()
        for span in spans
        for t in span
        if t is not None
    ]
    if changes:
        await trio.sleep_until(max(trio.current_time(), max(changes) + SETTLE) + MEMBERSHIP_TTL)
