"""Trio's floor (sim/floor.py): the raw limit ``python -m sim run`` reads its pace against."""

from __future__ import annotations

import sim.session
from sim import floor


def test_a_floor_run_has_the_shape_it_was_asked_for():
    for tasks, steps in [(64, 450), (20, 90), (5, 400)]:
        counter = floor.StepCounter()
        floor.floor_run(floor.Shape(tasks, steps), instruments=(counter,))
        assert counter.tasks == tasks
        assert steps <= counter.steps <= steps + 8, (tasks, steps, counter.steps)


def test_the_sample_is_the_start_of_the_explored_stream(monkeypatch):
    explored = []
    real = sim.session.simulate

    def _recording(program, seed):
        explored.append((program, seed))
        return real(program, seed)

    monkeypatch.setattr(sim.session, "simulate", _recording)
    sim.session.explore(6, seed=11)
    assert floor.sample(6, seed=11) == explored


def test_the_shape_counts_both_engines_tasks_and_every_step():
    runs = floor.sample(3, seed=2)
    counter = floor.StepCounter()
    for program, seed in runs:
        floor.simulate(program, seed, instruments=[counter])
    s = floor.shape(runs)
    assert (s.tasks, s.steps) == (counter.tasks / 3, counter.steps / 3)
    # Two engines of some twenty tasks each, and every task steps at least twice.
    assert s.tasks > 40 and s.steps > 2 * s.tasks


def test_the_floor_is_measured_and_read_against_a_pace():
    f = floor.measure(floor.Shape(30, 120), seconds=0.05)
    assert f.per_second > 0
    line = f.against(f.per_second / 4)
    assert "(30 tasks, 120 steps)" in line and "at 0.25 of it" in line


def test_sim_run_reports_its_pace_against_the_floor(capsys):
    from sim.__main__ import main

    # 30 programs reach only some recovery paths: the run says which, and fails.
    assert main(["run", "--examples", "30", "--seed", "4"]) == 1
    out = capsys.readouterr().out
    assert "30 interleavings in" in out and "NEVER" in out
    assert "Trio's floor for runs of this shape (" in out
    assert "the simulator runs at 0." in out
