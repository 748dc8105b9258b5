"""Trio's floor for a simulated run: the raw limit the simulator's pace is read against.

A simulated run is CPU-bound, and these machines are shared: the same code
explored 87-91 programs a second one evening and 43-52 the next on a machine
of the same kind. So, as every chatd benchmark reports its raw limit measured
in the same sitting, ``python -m sim run`` reports Trio's floor beside the
pace: a Trio run of the same shape as the runs just explored (as many tasks
spawned, as many task steps, under the same ``MockClock`` and seeded
scheduler) in which each step is a bare checkpoint and every task ends
cancelled, as an engine's do. It is what a run would cost if the engine, the
memory twins and the harness cost nothing: the simulator can be no faster.

The shape is counted on a sample of the same stream of programs, with an
instrument (:func:`shape`), so the floor follows what the programs do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from sim.runner import seeded_scheduling, simulate
from sim.session import exploring, stream


@dataclass(frozen=True)
class Shape:
    """What one run does on average, as Trio counts it."""

    tasks: float
    steps: float

    def __str__(self) -> str:
        return f"{self.tasks:.0f} tasks, {self.steps:.0f} steps"


@dataclass(frozen=True)
class Floor:
    shape: Shape
    #: Floor runs a second on this machine, now (wall clock, as the pace).
    per_second: float

    def against(self, pace: float) -> str:
        return (
            f"Trio's floor for runs of this shape ({self.shape}): {self.per_second:.0f}/s; "
            f"the simulator runs at {pace / self.per_second:.2f} of it"
        )


class StepCounter(trio.abc.Instrument):
    """Counts the tasks a Trio run spawns and the steps they take."""

    def __init__(self) -> None:
        self.tasks = 0
        self.steps = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.tasks += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


def sample(examples: int, *, seed: int = 0) -> list[tuple[list[Any], int]]:
    """The first ``examples`` (program, scheduler seed) pairs of ``explore``'s stream."""
    drawn: list[tuple[list[Any], int]] = []

    @stream(examples, seed=seed, shrink=False)
    def _draw(program: list[Any], seed: int) -> None:
        drawn.append((program, seed))

    with exploring():
        _draw()
    return drawn


def shape(runs: list[tuple[list[Any], int]]) -> Shape:
    """The mean tasks and task steps of ``runs``, each simulated once."""
    counter = StepCounter()
    with exploring():
        for program, seed in runs:
            simulate(program, seed, instruments=[counter])
    n = max(1, len(runs))
    return Shape(counter.tasks / n, counter.steps / n)


def floor_run(s: Shape, *, instruments: tuple[trio.abc.Instrument, ...] = ()) -> None:
    """One Trio run of shape ``s`` doing nothing but stepping."""
    seeded_scheduling(0)
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(_floor, round(s.tasks), round(s.steps), clock=clock, instruments=instruments)


def measure(s: Shape, *, seconds: float = 5.0) -> Floor:
    """Floor runs of shape ``s`` for about ``seconds``; their pace.

    Seconds, not one: a second's pace moves by a third from one second to the
    next on these machines (measured: 245-439/s back to back in one process),
    and the simulator's is an average over a minute or more.
    """
    runs = 0
    with exploring():
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds or runs < 3:
            floor_run(s)
            runs += 1
    return Floor(s, runs / elapsed)


# Trio's own tasks in every run (init and the run_sync_soon task): they are in
# the counted shape, so the floor spawns that many fewer.
_TRIO_TASKS = 2


async def _floor(tasks: int, steps: int) -> None:
    # The main task and each worker take two steps of their own (the start,
    # and the step that ends it cancelled); the rest are spread as checkpoints.
    workers = max(0, tasks - _TRIO_TASKS - 1)
    spare = max(0, steps - 2 * (workers + 1) - _TRIO_TASKS)
    each, extra = divmod(spare, max(1, workers))
    parked = trio.Event()
    async with trio.open_nursery() as nursery:
        for i in range(workers):
            nursery.start_soon(_worker, each + (i < extra), parked)
        await trio.sleep(1.0)  # the mock clock jumps once every worker is parked
        nursery.cancel_scope.cancel()


async def _worker(checkpoints: int, parked: trio.Event) -> None:
    for _ in range(checkpoints):
        await trio.lowlevel.checkpoint()
    await parked.wait()
