"""The live page's tick history: compact, bounded, and the same points the page always read."""

from __future__ import annotations

import math
from array import array
from typing import Any

from analysis import AnalysisConfig, Analyzer, ArmCounts, Snapshot
from canary.core.records import TickEntry
from canary.runner.history import TickHistory


def _arm(n: float, errors: float) -> ArmCounts:
    return ArmCounts(requests=n, errors=errors, latency_buckets={0.1: n * 0.9, math.inf: n})


def _ticks(rollout: str, count: int, *, verdict_from: int = 2) -> list[TickEntry]:
    analyzer = Analyzer(AnalysisConfig())
    out = []
    for i in range(count):
        primary, canary = _arm(100.0 * i, 1.0 * i), _arm(10.0 * i, 0.2 * i)
        verdict = None
        if i >= verdict_from:
            verdict = analyzer.observe(Snapshot(elapsed_s=10.0 * i, primary=primary, canary=canary))
        out.append(
            TickEntry(
                at=1000.0 + 10 * i,
                rollout=rollout,
                elapsed_s=10.0 * i,
                phase="Progressing",
                step=i // 5,
                weight_set=10 * (i // 5),
                weight_read=None if i == 3 else 10 * (i // 5),
                primary=primary if i else None,
                canary=canary if i else None,
                no_data_reason=None if i else "no traffic yet",
                verdict=verdict,
            )
        )
    return out


def _single(value: float | None) -> float | None:
    """The chart's numbers are kept in single precision."""
    return None if value is None else array("f", [value])[0]


def _as_page_reads(entry: TickEntry) -> dict[str, Any]:
    """What the runner kept per tick before (a dict), which the page still reads: the times
    and counts exactly, the estimates and bounds in single precision."""

    def arm(counts: ArmCounts | None) -> list[float] | None:
        return None if counts is None else [counts.requests, counts.errors]

    verdict = entry.verdict
    return {
        "rollout": entry.rollout,
        "at": entry.at,
        "elapsed_s": entry.elapsed_s,
        "step": entry.step,
        "weight_set": entry.weight_set,
        "weight_read": entry.weight_read,
        "primary": arm(entry.primary),
        "canary": arm(entry.canary),
        "metrics": {}
        if verdict is None
        else {
            name: [_single(m.estimate), _single(m.lower), _single(m.upper), m.decision.value]
            for name, m in verdict.metrics.items()
        },
    }


def test_points_are_the_ticks_as_the_page_reads_them() -> None:
    """Ticks without a verdict, then with one (the layout grows), a missing read-back and
    missing counts all come back as the dicts the live page reads."""
    ticks = _ticks("r1", 12)
    history = TickHistory(100)
    for t in ticks:
        history.append(t)
    assert history.points() == [_as_page_reads(t) for t in ticks]


def test_bounded_thinning_the_older_ticks_and_a_new_rollout_starts_afresh() -> None:
    ticks = _ticks("r1", 500)
    history = TickHistory(40)
    for t in ticks:
        history.append(t)
        assert len(history) <= 40
    points = history.points()
    at = [p["at"] for p in points]
    assert at == sorted(at) and at[0] == ticks[0].at  # the whole rollout is still covered
    assert points[-10:] == [_as_page_reads(t) for t in ticks[-10:]]  # recent ticks all there
    assert len(history) >= 20
    fresh = _ticks("r2", 3)
    for t in fresh:
        history.append(t)
    assert history.points() == [_as_page_reads(t) for t in fresh]


def test_a_tick_with_three_metrics_is_held_in_108_bytes() -> None:
    """Times and counts in doubles, the rest in single precision (it was 168 bytes)."""
    ticks = _ticks("r1", 30)
    history = TickHistory(100)
    for t in ticks:
        history.append(t)
    assert len(ticks[-1].verdict.metrics) == 3  # type: ignore[union-attr]
    held = history._exact.itemsize * len(history._exact) + history._rest.itemsize * len(
        history._rest
    )
    assert held == 108 * len(ticks)
