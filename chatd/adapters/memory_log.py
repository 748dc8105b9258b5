"""The :class:`~chatd.ports.Log` in memory: Postgres's twin for fast tests.

:class:`MemoryDatabase` is the server (shared by every "process" of a test);
:class:`MemoryLog` is one process's handle on it, with its own LISTEN flag. The
semantics are those of migrations 0003/0004, kept honest by the contract
tests in ``tests/test_contract_log.py``, which run against both: per-
conversation gapless seqs, duplicates within and across batches, outbox ids
in (conversation, seq) order, SKIP LOCKED between commits and sweeps, U+0000
and check constraints refused for the whole batch.

Every call goes through the chaos gate and a deadline, and yields once, as a
round trip does. Time is Trio's clock (a mock clock makes runs reproducible).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

from chatd.chaos import Chaos
from chatd.errors import ReplyTaken, StoreError, StoreUnavailable
from chatd.records import (
    Checkpoint,
    Committed,
    InFlight,
    NewMessage,
    Orphan,
    OutboxEvent,
    Registration,
    Snapshot,
    SnapshotAsk,
    event_template,
    message,
)

_ROLES = ("user", "assistant", "system")
_STATUSES = ("complete", "stopped", "interrupted")


@dataclass
class _Conversation:
    head: int = 0
    #: messages[seq - 1] is the message with that seq, as on the wire.
    messages: list[dict[str, Any]] = field(default_factory=list)
    by_client: dict[str, int] = field(default_factory=dict)


@dataclass
class _OutboxRow:
    id: int
    conv: str
    seq: int
    payload: str
    created_at: float


class MemoryDatabase:
    """The shared state: conversations, messages, the outbox, the listeners."""

    def __init__(self, *, seed: int | None = None) -> None:
        self.convs: dict[str, _Conversation] = {}
        #: Share of calls whose answer is lost after the statement ran (the
        #: connection dropped after COMMIT): the caller sees an outage, the
        #: write happened. A fault for simulations; 0 in tests.
        self.answer_loss = 0.0
        self.rng = random.Random(seed)
        self.outbox: dict[int, _OutboxRow] = {}
        self.claimed: set[int] = set()
        self.next_outbox_id = 1
        self.listeners: list[MemoryLog] = []
        #: (conv, user) -> rights
        self.members: dict[tuple[str, str], str] = {}
        #: process -> [lease until (Trio's clock), dead]
        self.processes: dict[str, list[Any]] = {}
        #: stream -> its in-flight row
        self.replies: dict[str, dict[str, Any]] = {}

    def now_ms(self) -> int:
        # Commit timestamps on Trio's clock: reproducible under a mock clock.
        return int(trio.current_time() * 1000)

    def notify(self) -> None:
        for listener in self.listeners:
            listener._notified()


def _check(msgs: Sequence[NewMessage]) -> None:
    """What Postgres refuses for the whole statement (nothing is written)."""
    for m in msgs:
        for name in ("conv", "client_id", "user", "role", "status", "text"):
            if "\x00" in getattr(m, name):
                raise StoreError(
                    "postgres: CharacterNotInRepertoireError (22021): "
                    'invalid byte sequence for encoding "UTF8": 0x00'
                )
        if m.role not in _ROLES or m.status not in _STATUSES:
            raise StoreError(
                'postgres: CheckViolationError (23514): new row for relation "messages" '
                "violates check constraint"
            )


class MemoryLog:
    """One process's connection to a :class:`MemoryDatabase`."""

    def __init__(self, db: MemoryDatabase, chaos: Chaos, *, timeout: float = 5.0) -> None:
        self.db = db
        self._chaos = chaos
        self._timeout = timeout
        self._pending_notify = False
        self._notify_event = trio.Event()
        db.listeners.append(self)

    def close(self) -> None:
        if self in self.db.listeners:
            self.db.listeners.remove(self)

    async def _call(self, fn: Any, *args: Any) -> Any:
        def statement() -> Any:
            result = fn(*args)
            if self.db.answer_loss and self.db.rng.random() < self.db.answer_loss:
                raise StoreUnavailable("postgres: connection lost after the statement ran")
            return result

        return await self._chaos.call_at_once(("postgres",), self._timeout, statement)

    # -- writes -----------------------------------------------------------

    async def commit(
        self,
        msgs: Sequence[NewMessage],
        published: Sequence[int],
        notify: bool,
        finished: Sequence[str] = (),
        owner: str | None = None,
    ) -> tuple[list[Committed], list[OutboxEvent]]:
        return await self._call(
            self._commit, list(msgs), list(published), notify, list(finished), owner
        )

    def _commit(
        self,
        msgs: list[NewMessage],
        published: list[int],
        notify: bool,
        finished: list[str],
        owner: str | None,
    ) -> tuple[list[Committed], list[OutboxEvent]]:
        db = self.db
        _check(msgs)
        if owner is not None and db.processes.get(owner, (0.0, False))[1]:
            raise ReplyTaken(owner)
        for stream in finished:
            db.replies.pop(stream, None)
        for i in published:
            if i not in db.claimed:  # SKIP LOCKED
                db.outbox.pop(i, None)
        if not msgs:
            return [], []
        now = db.now_ms()
        fresh: dict[tuple[str, str], tuple[int, NewMessage, dict[str, Any]]] = {}
        results: list[Committed] = []
        for n, m in enumerate(msgs):
            conv = db.convs.setdefault(m.conv, _Conversation())
            # Stored before, or earlier in this batch: a duplicate of that one.
            prior = conv.by_client.get(m.client_id)
            if prior is not None:
                stored = conv.messages[prior - 1]
                results.append(Committed(m.conv, m.client_id, prior, True, dict(stored)))
                continue
            conv.head += 1
            msg = message(conv.head, m.client_id, m.user, m.role, m.status, m.text, now)
            conv.messages.append(msg)
            conv.by_client[m.client_id] = conv.head
            fresh[(m.conv, m.client_id)] = (n, m, msg)
            results.append(Committed(m.conv, m.client_id, conv.head, False, dict(msg)))
        # Outbox ids follow (conversation, seq), as the SQL's ordered INSERT assigns them.
        by_n: dict[int, OutboxEvent] = {}
        for n, m, msg in sorted(fresh.values(), key=lambda f: (f[1].conv, f[2]["seq"])):
            head, mid = event_template(m)
            payload = f"{head}{msg['seq']}{mid}{now}}}"
            row = _OutboxRow(db.next_outbox_id, m.conv, msg["seq"], payload, trio.current_time())
            db.next_outbox_id += 1
            db.outbox[row.id] = row
            by_n[n] = OutboxEvent(row.id, row.conv, row.payload)
        if notify:
            db.notify()
        return results, [by_n[n] for n in sorted(by_n)]

    # -- reads ------------------------------------------------------------

    async def snapshots(
        self, asks: Sequence[SnapshotAsk], limit: int, max_catchup: int
    ) -> list[list[Snapshot]]:
        return await self._call(
            lambda: [
                self._snapshots(a.conv, list(a.afters), limit, max_catchup, a.streams) for a in asks
            ]
        )

    def _snapshots(
        self,
        conv_id: str,
        afters: list[int | None],
        limit: int,
        max_catchup: int,
        streams: Sequence[str],
    ) -> list[Snapshot]:
        conv = self.db.convs.get(conv_id, _Conversation())
        done = frozenset(s for s in streams if s in conv.by_client)
        out = []
        for after in afters:
            if after is not None and conv.head - after <= max_catchup:
                msgs = conv.messages[after:] if after >= 0 else list(conv.messages)
                out.append(Snapshot([dict(m) for m in msgs], conv.head, True, done))
            else:
                latest = conv.messages[-limit:] if limit > 0 else []
                out.append(Snapshot([dict(m) for m in latest], conv.head, after is None, done))
        return out

    async def after(self, conv: str, after: int, limit: int) -> list[dict[str, Any]]:
        return await self._call(self._after, conv, after, limit)

    def _after(self, conv_id: str, after: int, limit: int) -> list[dict[str, Any]]:
        conv = self.db.convs.get(conv_id)
        if conv is None:
            return []
        return [dict(m) for m in conv.messages[max(after, 0) : max(after, 0) + limit]]

    async def history(self, conv: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        return await self._call(self._history, conv, before, limit)

    def _history(self, conv_id: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        conv = self.db.convs.get(conv_id)
        if conv is None:
            return []
        end = len(conv.messages) if before is None else max(0, min(before - 1, len(conv.messages)))
        return [dict(m) for m in conv.messages[max(0, end - limit) : end]]

    async def find(self, conv: str, client_id: str) -> dict[str, Any] | None:
        return await self._call(self._find, conv, client_id)

    def _find(self, conv_id: str, client_id: str) -> dict[str, Any] | None:
        conv = self.db.convs.get(conv_id)
        seq = None if conv is None else conv.by_client.get(client_id)
        return None if seq is None else dict(conv.messages[seq - 1])

    # -- the outbox ---------------------------------------------------------

    @asynccontextmanager
    async def claim_outbox(self, limit: int, min_age: float) -> AsyncIterator[list[OutboxEvent]]:
        taken: list[int] = []

        def _claim() -> list[int]:
            taken.extend(self._claim(limit, min_age))
            return taken

        try:
            ids = await self._call(_claim)
        except BaseException:
            # The claim's transaction died with its answer: nothing stays locked.
            self.db.claimed.difference_update(taken)
            raise
        try:
            yield [
                OutboxEvent(r.id, r.conv, r.payload) for r in map(self.db.outbox.__getitem__, ids)
            ]
        except BaseException:
            self.db.claimed.difference_update(ids)  # rolled back: the rows stay
            raise
        try:
            await self._call(self._delete_claimed, ids)
        finally:
            self.db.claimed.difference_update(ids)

    def _claim(self, limit: int, min_age: float) -> list[int]:
        cutoff = trio.current_time() - min_age
        ids = [
            r.id
            for r in self.db.outbox.values()
            if r.id not in self.db.claimed and r.created_at <= cutoff
        ]
        ids = sorted(ids)[:limit]
        self.db.claimed.update(ids)
        return ids

    def _delete_claimed(self, ids: list[int]) -> None:
        for i in ids:
            self.db.outbox.pop(i, None)

    async def notify_relays(self) -> None:
        await self._call(self.db.notify)

    async def wait_for_notify(self) -> None:
        while not self._pending_notify:
            await self._notify_event.wait()
        self._pending_notify = False

    def _notified(self) -> None:
        self._pending_notify = True
        self._notify_event.set()
        self._notify_event = trio.Event()

    async def vacuum_outbox(self) -> None:
        await self._call(lambda: None)

    async def stats(self) -> dict[str, Any]:
        return await self._call(self._stats)

    # -- replies in flight ---------------------------------------------------

    async def heartbeat(self, process: str, lease: float) -> bool:
        def _renew() -> bool:
            now = trio.current_time()
            p = self.db.processes.get(process)
            if p is None:
                self.db.processes[process] = [now + lease, False]
                return True
            if p[1] or p[0] <= now:
                return False
            p[0] = now + lease
            return True

        return await self._call(_renew)

    async def register_replies(self, owner: str, replies: Sequence[Registration]) -> None:
        def _insert() -> None:
            for r in replies:
                row = {"conv": r.conv, "owner": owner, "meta": r.meta, "body": "", "length": 0}
                self.db.replies.setdefault(r.stream, row)

        await self._call(_insert)

    async def checkpoint(self, owner: str, pieces: Sequence[Checkpoint]) -> None:
        def _append() -> None:
            for p in pieces:
                row = self.db.replies.get(p.stream)
                if row is not None and row["owner"] == owner and row["length"] == p.old_length:
                    row["body"] += p.text
                    row["length"] += len(p.text)

        await self._call(_append)

    async def take_orphans(self, taker: str) -> list[Orphan]:
        def _take() -> list[Orphan]:
            now = trio.current_time()
            lease, dead = self.db.processes.get(taker, (0.0, True))
            if dead or lease < now:
                return []  # only a live process declares others dead
            for p in self.db.processes.values():
                if p[0] < now:
                    p[1] = True
            dead = {pid for pid, p in self.db.processes.items() if p[1]}
            out = []
            for stream, row in self.db.replies.items():
                if row["owner"] in dead or (row["owner"] == taker and row.get("taken")):
                    row["owner"], row["taken"] = taker, True
                    out.append(Orphan(stream, row["conv"], orjson.loads(row["meta"]), row["body"]))
            return out

        return await self._call(_take)

    async def inflight(self, convs: Sequence[str]) -> list[list[InFlight]]:
        return await self._call(
            lambda: [
                [
                    InFlight(s, orjson.loads(r["meta"]), r["body"])
                    for s, r in self.db.replies.items()
                    if r["conv"] == conv
                ]
                for conv in convs
            ]
        )

    async def drop_reply(self, stream: str, owner: str) -> bool:
        def _drop() -> bool:
            row = self.db.replies.get(stream)
            if row is not None and row["owner"] != owner:
                return False
            self.db.replies.pop(stream, None)
            return True

        return await self._call(_drop)

    async def memberships(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        return await self._call(
            lambda: {p: self.db.members[p] for p in pairs if p in self.db.members}
        )

    async def set_membership(self, conv: str, user: str, rights: str) -> None:
        def _set() -> None:
            if rights:
                self.db.members[(conv, user)] = "".join(r for r in "rw" if r in rights)
            else:
                self.db.members.pop((conv, user), None)

        await self._call(_set)

    async def members(self, conv: str) -> dict[str, str]:
        return await self._call(
            lambda: {u: r for (c, u), r in self.db.members.items() if c == conv}
        )

    def _stats(self) -> dict[str, Any]:
        oldest = min((r.created_at for r in self.db.outbox.values()), default=None)
        age = 0.0 if oldest is None else trio.current_time() - oldest
        # Nothing to migrate in memory.
        return {
            "outbox_rows": len(self.db.outbox),
            "outbox_oldest_s": round(age, 3),
            "migrations_pending": 0,
        }
