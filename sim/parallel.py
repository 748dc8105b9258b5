"""Many simulated runs on several cores: one explorer process per worker.

A run is single-threaded and CPU-bound (one Trio run under a mock clock), so
more interleavings per second means more processes. Worker ``i`` of ``n``
explores its share of the budget with Hypothesis seeded ``seed * n + i``:
distinct streams of programs, the same ones for the same ``seed`` and ``n``.
Their coverage is summed. The first worker to find a violation shrinks it
(in its own process, as a single explorer does); the others are stopped and
the violation is raised here with the worker's report: the shrunk program and
its seed, which ``python -m sim replay`` runs again alone.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from collections import Counter
from typing import Any

from sim.session import Exploration, explore


class Violation(AssertionError):
    """A worker's run broke an invariant; the message is its report."""

    def __init__(self, report: str, runs: int, seconds: float) -> None:
        super().__init__(report)
        #: Interleavings run (over every worker) and seconds when it was found,
        #: before shrinking.
        self.runs = runs
        self.seconds = seconds


def default_workers() -> int:
    """``SIM_WORKERS`` if set, else every core this process may use, at most 8."""
    if "SIM_WORKERS" in os.environ:
        return max(1, int(os.environ["SIM_WORKERS"]))
    return max(1, min(8, len(os.sched_getaffinity(0))))


def shares(examples: int, workers: int) -> list[int]:
    """``examples`` split over ``workers`` as evenly as it goes."""
    return [examples // workers + (i < examples % workers) for i in range(workers)]


def explore_parallel(
    examples: int, workers: int, *, seed: int = 0, shrink: bool = True
) -> Exploration:
    """Run ``examples`` generated programs over ``workers`` processes.

    Returns the summed exploration; raises :class:`Violation` on the first
    worker's violation (``first_reached`` counts interleavings over every
    worker, as if they had advanced at the same pace).
    """
    if workers <= 1:
        return explore(examples, seed=seed, shrink=shrink)
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, share, seed * workers + i, shrink, results),
            name=f"sim-worker-{i}",
            daemon=True,
        )
        for i, share in enumerate(shares(examples, workers))
    ]
    t0 = time.perf_counter()
    total = Exploration()
    try:
        for p in procs:
            p.start()
        for _ in procs:
            got = _next_result(results, procs)
            if got["error"] is not None:
                runs, seconds = got["first_failure"] or (got["runs"], 0.0)
                raise Violation(
                    f"worker {got['worker']} of {workers}, at its interleaving {runs}:\n"
                    + got["error"],
                    runs * workers,
                    seconds,
                )
            _merge(total, got, workers)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
    total.seconds = time.perf_counter() - t0
    return total


def _next_result(results: Any, procs: list[Any]) -> dict[str, Any]:
    # A worker that died without a word (killed, out of memory) must not hang us.
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"simulation worker {dead[0].name} died (exit code {dead[0].exitcode})"
                ) from None


def _merge(total: Exploration, got: dict[str, Any], workers: int) -> None:
    total.runs += got["runs"]
    total.coverage.update(got["coverage"])
    for path, at in got["first_reached"].items():
        scaled = at * workers
        total.first_reached[path] = min(total.first_reached.get(path, scaled), scaled)


def _worker(i: int, examples: int, seed: int, shrink: bool, results: Any) -> None:
    result = Exploration()
    error = None
    try:
        explore(examples, seed=seed, shrink=shrink, into=result)
    except BaseException as exc:  # reported to the parent, which raises it
        # The notes carry Hypothesis's shrunk program and seed.
        error = "".join(traceback.format_exception(exc))
    results.put(
        {
            "worker": i,
            "runs": result.runs,
            "coverage": Counter(result.coverage),
            "first_reached": dict(result.first_reached),
            "first_failure": result.first_failure,
            "error": error,
        }
    )
