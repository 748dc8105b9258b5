"""Adapters: the implementations of :mod:`chatd.ports`, and the only code that
touches asyncio, asyncpg, redis or trio-asyncio (``tests/test_architecture.py``
and ruff's banned-import rule enforce it).

* :mod:`.bridge` — the one crossing from Trio into asyncio: one asyncio loop
  (trio-asyncio) for the process; each call runs a whole batch of work.
* :mod:`.postgres` (+ :mod:`.schema`, ``migrations/``) — the :class:`~chatd.ports.Log`.
* :mod:`.redis_transport` (+ :mod:`.redis_pubsub`) — the :class:`~chatd.ports.Transport`.
* :mod:`.websocket` — a client :class:`~chatd.ports.Connection` on trio-websocket.
* :mod:`.memory_log`, :mod:`.memory_transport`, :mod:`.memory_connection` — the
  in-memory twins, pure Trio, for fast tests on a mock clock; the contract
  tests hold both implementations of each port to the same behaviour.

Every call into Postgres or Redis goes through :meth:`chatd.chaos.Chaos.call`:
the break switch's gates and a deadline, for real and memory adapters alike.
"""
