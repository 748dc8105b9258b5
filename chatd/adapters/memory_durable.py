"""Durable Streams in memory: the twin of :mod:`chatd.adapters.postgres_durable`.

Every method runs without awaiting in the middle, so under Trio each is atomic,
as the Postgres store's transactions are. The rules are
:mod:`chatd.durable.model`'s; this module only keeps the state.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from chatd.durable.model import (
    Append,
    AppendPlan,
    Create,
    DSError,
    Producer,
    StreamRow,
    check_create,
    check_existing,
    check_source,
    chunk_body,
    fork_chunks,
    fork_position,
    new_stream,
    plan_append,
    window,
)

Chunk = tuple[int, int, bytes]


class MemoryStreams:
    """A :class:`~chatd.ports.StreamStore` in one process's memory."""

    def __init__(self) -> None:
        self._rows: dict[str, StreamRow] = {}
        self._chunks: dict[int, list[Chunk]] = {}
        self._producers: dict[tuple[int, str], Producer] = {}
        self._ids = itertools.count(1)

    def _find(self, path: str, now: float) -> StreamRow | None:
        """The stream at ``path`` (soft-deleted ones included); an expired one is deleted."""
        row = self._rows.get(path)
        if row is not None and not row.deleted and row.expired(now):
            self._delete(row)
            row = self._rows.get(path)
        return row

    def _live(self, path: str, now: float) -> StreamRow:
        row = self._find(path, now)
        if row is None:
            raise DSError(404, f"no stream at {path}")
        if row.deleted:
            raise DSError(410, f"the stream at {path} was deleted")
        return row

    async def create(self, path: str, req: Create, now: float) -> tuple[bool, StreamRow]:
        check_create(req)
        row = self._find(path, now)
        if row is not None:
            check_existing(row, req, path)
            return False, row
        source = None
        chunks: list[Chunk] = []
        if req.fork_of is not None:
            source = check_source(self._find(req.fork_of, now), req.fork_of)
        row = new_stream(next(self._ids), path, req, now, source)
        if source is not None:
            pos = fork_position(source, req)
            chunks = fork_chunks(self._chunks[source.id], pos)
            row = replace(row, tail=pos, fork_pos=pos)
            self._rows[source.path] = replace(source, refs=source.refs + 1)
        body = chunk_body(row, req.body, allow_empty=True)
        chunks += body
        if body:
            row = replace(row, tail=body[-1][1])
        row = replace(row, closed=req.closed)
        self._rows[path] = row
        self._chunks[row.id] = chunks
        return True, row

    async def append_many(
        self, items: list[tuple[str, Append]], now: float
    ) -> list[AppendPlan | DSError]:
        out: list[AppendPlan | DSError] = []
        for path, req in items:
            try:
                out.append(self._append(path, req, now))
            except DSError as exc:
                out.append(exc)
        return out

    def _append(self, path: str, req: Append, now: float) -> AppendPlan:
        row = self._live(path, now)
        producer = self._producers.get((row.id, req.producer[0])) if req.producer else None
        plan = plan_append(row, producer, req, now)
        if plan.changed:
            self._rows[path] = plan.row
            self._chunks[row.id].extend(plan.chunks)
        if plan.producer is not None and req.producer is not None:
            self._producers[(row.id, req.producer[0])] = plan.producer
        return plan

    async def head(self, path: str, now: float) -> StreamRow:
        return self._live(path, now)

    async def read(
        self, path: str, pos: int | None, max_bytes: int, now: float
    ) -> tuple[StreamRow, list[Chunk]]:
        row = self._live(path, now)
        if row.ttl is not None:
            row = self._rows[path] = replace(row, touched=now)
        if pos is None or pos >= row.tail:
            return row, []
        return row, window(self._chunks[row.id], pos, max_bytes)

    async def delete(self, path: str, now: float) -> None:
        row = self._live(path, now)
        if row.refs > 0:
            self._rows[path] = replace(row, deleted=True)
            return
        self._delete(row)

    def _delete(self, row: StreamRow) -> None:
        """Remove ``row``; a soft-deleted source no fork needs any more goes too."""
        if row.refs > 0:
            self._rows[row.path] = replace(row, deleted=True)
            return
        del self._rows[row.path]
        del self._chunks[row.id]
        for key in [k for k in self._producers if k[0] == row.id]:
            del self._producers[key]
        if row.fork_of is None:
            return
        source = self._rows.get(row.fork_of)
        if source is None:
            return
        source = self._rows[source.path] = replace(source, refs=source.refs - 1)
        if source.deleted and source.refs == 0:
            self._delete(source)

    async def sweep(self, now: float) -> int:
        """Delete every expired stream; how many went."""
        gone = [r for r in self._rows.values() if not r.deleted and r.expired(now)]
        for row in gone:
            if row.path in self._rows:
                self._delete(self._rows[row.path])
        return len(gone)
