"""The engine: sessions, the hub and its feeds, the committer, replies and the relay.

It depends only on :mod:`chatd.ports` (a log, a transport, client connections)
and never on a driver: nothing here imports asyncio, asyncpg, redis or
trio-asyncio (``tests/test_architecture.py`` checks it). Each service is an
async context manager that owns its nursery (``open_committer``,
``open_relay``, ``open_hub``, ``open_replies``); :func:`chatd.server.serve`
composes them, and results flow between them through channels the reader
can see there.
"""
