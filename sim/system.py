"""The fuzzer's view of a system, simulated: the chatd under test and its peer.

:class:`fuzz.program.World` drives a real ``serve()`` and a real peer process
(``fuzz/peer.py``). Here the same calls land on :class:`SimProcess` engines:
:class:`SimServer` stands for the chatd under test, :class:`SimPeer` for the
second process, with the same methods as :class:`fuzz.peer.Peer` (a kill is a
crash and a restart; a pause cuts the process off past its lease).
"""

from __future__ import annotations

from typing import Any

import trio

from chatd.adapters.memory_log import MemoryDatabase
from chatd.adapters.memory_transport import MemoryBroker
from chatd.config import Config
from chatd.engine.engine import Engine
from chatd.ports import ConnectionGone
from sim.processes import SimProcess
from tests.client import Client


class SimServer:
    """The chatd under test: what the fuzzer's World reads of a Server."""

    def __init__(self, process: SimProcess) -> None:
        self.process = process
        self.chaos = process.chaos

    @property
    def engine(self) -> Engine:
        assert self.process.engine is not None
        return self.process.engine


class SimPeer:
    """The second process, started on first use and again after each crash."""

    def __init__(
        self, nursery: trio.Nursery, config: Config, db: MemoryDatabase, broker: MemoryBroker
    ) -> None:
        self._nursery = nursery
        self._config = config
        self._db = db
        self._broker = broker
        self._process: SimProcess | None = None
        self._starting = trio.Lock()
        self._paused = 0
        self.kills = 0
        self.pauses = 0
        self.last_fault_end = 0.0
        #: Every process this peer has been (the crashed ones too), for coverage.
        self.generations: list[SimProcess] = []

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def current(self) -> SimProcess | None:
        """The process running now (None before the first use)."""
        return self._process

    async def url_when_up(self) -> str:
        await self._up()
        return "memory:peer"

    async def _up(self) -> SimProcess:
        async with self._starting:  # one process at a time, however many ask
            if self._process is None:
                process = SimProcess(self._config, self._db, self._broker)
                self.generations.append(process)
                self._process = await self._nursery.start(process.run)
            return self._process

    async def kill(self) -> None:
        """Crash the peer, then start a new one on the same log and broker."""
        if self._process is None:
            return
        process, self._process = self._process, None
        await process.crash()
        self.kills += 1
        self.last_fault_end = trio.current_time()
        await self._up()

    async def pause(self, seconds: float) -> None:
        process = self._process
        if process is None:
            return
        self.pauses += 1
        self._paused += 1
        try:
            process.cut_off(seconds)
            await trio.sleep(seconds)
        finally:
            self._paused -= 1
            self.last_fault_end = trio.current_time()

    async def settled(self) -> None:
        with trio.fail_after(60):
            while self._paused:
                await trio.sleep(0.05)

    async def client(self, user: str) -> Client:
        return await (await self._up()).connect(user)

    async def active_replies(self) -> int:
        if self._process is None or self._process.engine is None:
            return 0
        return len(self._process.engine.replies.active)

    async def request(
        self, frame: dict[str, Any], reply: str, user: str = "peer-sender"
    ) -> dict[str, Any]:
        """Send ``frame`` on a new connection, retrying (same frame) across crashes
        and pauses until it is answered."""
        with trio.fail_after(90):
            while True:
                client = None
                try:
                    client = await self.client(user)
                    answer = await client.request(frame, reply, timeout=10)
                except (ConnectionGone, trio.TooSlowError):
                    await trio.sleep(0.1)
                    continue
                finally:
                    if client is not None:
                        await client.close()
                if answer.get("type") == "error" and answer.get("retryable"):
                    await trio.sleep(0.1)
                    continue
                return answer

    async def close(self) -> None:
        if self._process is not None:
            await self._process.crash()

    def log_tail(self, lines: int = 30) -> str:
        return ""
