"""Many simulated runs: Hypothesis generates the programs and shrinks failures.

:func:`explore` is what CI's test and ``python -m sim run`` call: it runs
``examples`` programs, each with a scheduler seed Hypothesis draws too, sums
the coverage, and reports the first failure shrunk to a minimal program with
its seed (``python -m sim replay`` runs it again, alone).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from sim.runner import simulate
from sim.world import programs


@dataclass
class Exploration:
    runs: int = 0
    seconds: float = 0.0
    coverage: Counter[str] = field(default_factory=Counter)
    #: (path, runs so far) when each recovery path was first reached.
    first_reached: dict[str, int] = field(default_factory=dict)
    #: (runs, seconds) when the first violation happened, before shrinking.
    first_failure: tuple[int, float] | None = None

    @property
    def per_second(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0


def explore(
    examples: int, *, seed: int = 0, shrink: bool = True, into: Exploration | None = None
) -> Exploration:
    """Run ``examples`` generated programs; raises (shrunk) on the first violation.

    ``into`` receives the counts as they grow (still there when it raises).
    """
    result = into if into is not None else Exploration()

    @stream(examples, seed=seed, shrink=shrink)
    def one(program: list[Any], seed: int) -> None:
        try:
            covered = simulate(program, seed)
        except BaseException:
            if result.first_failure is None:
                result.first_failure = (result.runs + 1, time.perf_counter() - t0)
            raise
        result.runs += 1
        for path, n in covered.items():
            if n and path not in result.first_reached:
                result.first_reached[path] = result.runs
        result.coverage.update(covered)

    t0 = time.perf_counter()
    try:
        with exploring():
            one()
    finally:
        result.seconds = time.perf_counter() - t0
    return result


def stream(
    examples: int, *, seed: int, shrink: bool
) -> Callable[[Callable[[list[Any], int], None]], Callable[[], None]]:
    """Hypothesis's ``given`` over the first ``examples`` (program, scheduler seed)
    pairs of stream ``seed``: what :func:`explore` runs, and sim/floor.py samples."""
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    configured = settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )
    drawn = given(program=programs(), seed=st.integers(0, 2**32 - 1))
    return lambda test: hypothesis_seed(seed)(configured(drawn(test)))


@contextmanager
def exploring() -> Iterator[None]:
    """What runs are explored under (sim/floor.py samples and measures under it too)."""
    with _quiet_engine(), _constants_of_no_module(), _few_collections():
        yield


@contextmanager
def _quiet_engine() -> Iterator[None]:
    """The engine's log silenced but for the critical: it logs every injected fault."""
    logger = logging.getLogger("chatd")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _few_collections() -> Iterator[None]:
    """The collector tuned as ``chatd serve`` tunes it (chatd/cli.py), for runs.

    Every run leaves cycles behind (Trio's exceptions and their frames), so
    with the default thresholds full collections walk the interpreter's whole
    heap (Hypothesis, Trio, the engine's modules) over and over: a fifth of an
    explorer's time, measured. What is alive before exploring is frozen out of
    the collector's walks, and young collections come less often.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@contextmanager
def _constants_of_no_module() -> Iterator[None]:
    """A seed's programs depend on the seed alone, not on what else is imported.

    Hypothesis draws some numbers (1 in 20) from the literals in the source of
    every local module loaded so far (``_get_local_constants`` in
    ``hypothesis.internal.conjecture.providers``): the same seed generated
    other programs in pytest's process, which had imported the whole suite,
    than in a worker that imported only the simulator. Pinned to none while
    exploring. Private API: on a Hypothesis without it nothing is pinned, and
    sim/test_simulation.py's workers test, which compares a worker's streams
    with this process's after the whole suite was imported, fails to say so.
    """
    try:
        from hypothesis.internal.conjecture import providers

        original = providers._get_local_constants
        cached = providers.CONSTANTS_CACHE.cache
        none = providers.Constants()
    except (ImportError, AttributeError):  # pragma: no cover - another Hypothesis
        yield
        return
    providers._get_local_constants = lambda: none
    cached.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        cached.clear()
