"""One simulated run: a program, a seed, a mock clock; what it covered.

Everything runs in one Trio run under ``MockClock(autojump_threshold=0)``:
time moves only when every task waits, so a run that waits seconds takes
milliseconds, and with Trio's scheduler seeded (``seeded_scheduling``) the same
program and seed replay the same interleaving.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from chatd import entropy
from chatd.adapters.memory_log import MemoryDatabase
from chatd.adapters.memory_transport import MemoryBroker
from sim.config import LEASE, TAKEOVER, sim_config
from sim.coverage import of_engines
from sim.processes import SimProcess
from sim.system import SimPeer, SimServer
from sim.world import SimWorld


def seeded_scheduling(seed: int) -> None:
    """Make Trio's scheduler deterministic, its choices drawn from ``seed``.

    Trio shuffles each batch of runnable tasks with a private RNG; pytest-trio
    does the same when Hypothesis runs (and Hypothesis then seeds it).
    """
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[attr-defined]
    trio._core._run._r.seed(seed)  # type: ignore[attr-defined]


def simulate(
    program: list[Any],
    seed: int = 0,
    *,
    scheduler: bool = True,
    instruments: Sequence[trio.abc.Instrument] = (),
) -> Counter[str]:
    """Run ``program`` to the end and check every invariant; returns its coverage.

    ``scheduler``: seed Trio's scheduler from ``seed`` (off when Hypothesis
    already drives it). ``instruments``: Trio's, watching the run (sim/floor.py
    counts its tasks and steps).
    """
    if scheduler:
        seeded_scheduling(seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(_simulate, program, seed, clock=clock, instruments=instruments)


async def _simulate(program: list[Any], seed: int) -> Counter[str]:
    # Every random choice of the engines (jitter, ids) and of the memory
    # servers comes from the seed; time from the mock clock.
    entropy.seed_tree(seed)
    rng = random.Random(seed)
    db = MemoryDatabase(seed=rng.randrange(2**32))
    broker = MemoryBroker(seed=rng.randrange(2**32))
    async with trio.open_nursery() as nursery:
        main = SimProcess(sim_config(peer=False), db, broker)
        await nursery.start(main.run)
        peer = SimPeer(nursery, sim_config(peer=True), db, broker)
        world = SimWorld(
            srv=SimServer(main),  # type: ignore[arg-type]
            faults=None,  # type: ignore[arg-type]
            peer=peer,  # type: ignore[arg-type]
            nursery=nursery,
            run_id=f"{seed}",
            bound=LEASE + TAKEOVER + 5.0,
            db=db,
            broker=broker,
        )
        main.on_close = world.on_close
        nursery.start_soon(world.resume_dropped)
        await world.setup(program)
        await world.run(program)
        await world.check()
        engines = [p.engine for p in [main, *peer.generations] if p.engine is not None]
        covered = of_engines(engines)
        covered["paged_catchup"] += world.pages
        nursery.cancel_scope.cancel()
    return covered
