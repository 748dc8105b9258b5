"""``python -m sim``: explore interleavings, or replay one.

python -m sim run [--examples N] [--seed S] [--workers W]   # pace, coverage, first failure
python -m sim replay "[Send(c=0, conv=0), ...]" --seed S
"""

from __future__ import annotations

import argparse
import logging
import sys

from sim.coverage import PATHS


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sim")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="explore generated programs")
    r.add_argument("--examples", type=int, default=10000)
    r.add_argument("--seed", type=int, default=0, help="which stream of programs")
    r.add_argument("--no-shrink", action="store_true", help="report a failure unshrunk")
    r.add_argument(
        "--workers", type=int, default=1, help="explorer processes (the budget is split)"
    )
    rp = sub.add_parser("replay", help="run one program, as a failure printed it")
    rp.add_argument("program", help='e.g. "[Send(c=0, conv=0), RestartRedis()]"')
    rp.add_argument("--seed", type=int, required=True)
    rp.add_argument("--log", action="store_true", help="show the engine's log")
    args = p.parse_args(argv)
    if args.cmd == "replay":
        return _replay(args.program, args.seed, args.log)
    if args.workers > 1:
        return _run_parallel(args.examples, args.workers, args.seed, not args.no_shrink)
    from sim.session import Exploration, explore

    result = Exploration()
    try:
        explore(args.examples, seed=args.seed, shrink=not args.no_shrink, into=result)
    except BaseException:
        assert result.first_failure is not None
        runs, seconds = result.first_failure
        print(
            f"VIOLATION at interleaving {runs}, {seconds:.1f}s in "
            f"({result.seconds:.1f}s with shrinking); the program and seed are above"
        )
        raise
    print(report(result))
    print(_floor(args.seed, args.examples, result.per_second))
    missing = [path for path in PATHS if not result.coverage[path]]
    return 1 if missing else 0


def _floor(seed: int, examples: int, pace: float) -> str:
    """Trio's floor for runs like the ones explored, measured now (sim/floor.py).

    Its shape is the mean of the first programs of the (first worker's) stream.
    """
    from sim import floor

    runs = floor.sample(min(examples, _SHAPE_SAMPLE), seed=seed)
    return floor.measure(floor.shape(runs)).against(pace)


#: At most this many programs give the floor its shape (about 5 s of runs;
#: timing the floor takes 5 s more).
_SHAPE_SAMPLE = 200


def _run_parallel(examples: int, workers: int, seed: int, shrink: bool) -> int:
    import time

    from sim.parallel import Violation, explore_parallel

    t0 = time.perf_counter()
    try:
        result = explore_parallel(examples, workers, seed=seed, shrink=shrink)
    except Violation as v:
        print(str(v))
        print(
            f"VIOLATION at interleaving {v.runs}, {v.seconds:.1f}s in "
            f"({time.perf_counter() - t0:.1f}s with shrinking); the program and seed are above"
        )
        return 1
    print(report(result) + f"\n({workers} workers: {result.per_second / workers:.0f}/s each)")
    print(_floor(seed * workers, examples // workers, result.per_second / workers))
    missing = [path for path in PATHS if not result.coverage[path]]
    return 1 if missing else 0


def report(result: object) -> str:
    from sim.session import Exploration

    assert isinstance(result, Exploration)
    lines = [
        f"{result.runs} interleavings in {result.seconds:.1f}s: "
        f"{result.per_second:.0f}/s, every invariant held",
        f"{'recovery path':<18}{'reached':>9}{'first at run':>14}  what",
    ]
    for path, what in PATHS.items():
        first = result.first_reached.get(path)
        lines.append(
            f"{path:<18}{result.coverage[path]:>9}{first if first else 'NEVER':>14}  {what}"
        )
    return "\n".join(lines)


def _replay(program_text: str, seed: int, show_log: bool) -> int:
    import fuzz.program as fp
    import sim.world as sw
    from sim.runner import simulate

    names = {**vars(fp), **vars(sw)}
    program = eval(program_text, {"__builtins__": {}}, names)
    logging.basicConfig(
        level=logging.INFO if show_log else logging.CRITICAL,
        format="%(name)s %(levelname)s %(message)s",
    )
    covered = simulate(program, seed)
    print("every invariant held; reached:", dict(+covered))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
