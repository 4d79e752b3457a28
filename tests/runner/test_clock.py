"""Timers run on a clock that never jumps: a wall clock stepped by an hour changes nothing."""

from __future__ import annotations

import itertools
from pathlib import Path

from test_runner import SPEC, TICK_S, Clock, FakeMetrics, FakeRouter

from analysis import AnalysisConfig, Analyzer
from canary.core.records import TransitionEntry, read_record
from canary.core.rollout import Phase
from canary.metrics.base import MetricsResult
from canary.runner import Controller, RolloutRunner
from canary.runner.clock import MonotonicWallClock
from canary.runner.runner import next_tick_at


def test_stepped_wall_clock_leaves_the_clock_steady() -> None:
    """The wall clock stepping back an hour and then forward two leaves `now` monotone, and
    wall_offset() says by how much the wall clock moved."""
    mono = Clock()
    jump = 0.0
    clock = MonotonicWallClock(wall=lambda: mono.now + jump, monotonic=mono)
    start = clock()
    mono.now += 10
    jump = -3600.0
    assert clock() == start + 10 and clock.wall_offset() == -3600.0
    mono.now += 10
    jump = 3600.0
    assert clock() == start + 20 and clock.wall_offset() == 3600.0


async def test_rollout_keeps_its_pace_when_the_wall_clock_steps(tmp_path: Path) -> None:
    """The wall clock steps back an hour after the second look and forward two hours later:
    the rollout walks its steps at their minimum time and is promoted (no frozen deadline,
    no false rollback), and Prometheus is still asked in its own (wall) time."""
    mono = Clock()
    router = FakeRouter()
    metrics = FakeMetrics(router, mono)
    jump = {"s": 0.0}
    clock = MonotonicWallClock(wall=lambda: mono.now + jump["s"], monotonic=mono)
    asked: list[tuple[float, float]] = []
    original = metrics.fetch

    async def fetch(*, since: float, now: float) -> MetricsResult:
        asked.append((now, mono.now + jump["s"]))
        looks = len(asked)
        if looks == 2:
            jump["s"] = -3600.0
        elif looks == 6:
            jump["s"] = 3600.0
        return await original(since=since, now=now)

    metrics.fetch = fetch  # type: ignore[method-assign]
    runner = RolloutRunner(
        name="app",
        spec=SPEC,
        router=router,
        metrics=metrics,
        record_path=tmp_path / "app.jsonl",
        tick_s=TICK_S,
        analyzer_factory=lambda: Analyzer(AnalysisConfig()),
        canary_version="v2",
        clock=clock,
    )
    statuses = await Controller([runner]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED
    assert router.sets == [5, 10, 25, 50, 100]
    assert all(now == wall for now, wall in asked)  # queries follow the wall clock
    transitions = [e for e in read_record(runner.record_path) if isinstance(e, TransitionEntry)]
    times = [e.at for e in transitions]
    assert times == sorted(times)  # the record's times never go back
    steps = [e for e in transitions if e.to_phase == "Progressing"][1:]
    gaps = [b.at - a.at for a, b in itertools.pairwise(steps)]
    assert all(SPEC.min_step_s <= gap <= SPEC.min_step_s + 30 for gap in gaps), gaps


def test_ticks_keep_a_fixed_rate_and_a_late_one_does_not_burst() -> None:
    """The schedule: the first tick after the jitter, then every period after the last
    scheduled one whatever each tick cost; a tick that ran past its slot is followed by the
    next slot on the same grid at least half a period away (no burst, no back-to-back looks)."""
    first = next_tick_at(None, 100.0, 10.0, first=3.5)
    assert first == 103.5
    # a tick that took 4 s still leaves the next one at 113.5, not 117.5
    assert next_tick_at(first, 107.5, 10.0, first=0) == 113.5
    # stalled until 150: slots 113.5..143.5 are gone; 153.5 is 3.5 s away: too close -> 163.5
    assert next_tick_at(113.5, 150.0, 10.0, first=0) == 163.5
    # stalled until 145: 153.5 is 8.5 s away, on the grid
    assert next_tick_at(113.5, 145.0, 10.0, first=0) == 153.5
    # 3 s late on a 10 s period: the very next slot is 7 s away
    assert next_tick_at(103.5, 116.5, 10.0, first=0) == 123.5
