"""The judge's rules as tables: per-metric decisions and how they combine."""

from __future__ import annotations

import math

import pytest

from analysis import Decision, MetricResult
from analysis.judge import combine, decide_metric, reason_line

BASE = {
    "has_data": True,
    "e_fail": 1.0,
    "alpha": 0.01,
    "pass_reached": False,
    "samples_primary": 1000.0,
    "samples_canary": 1000.0,
    "min_samples": 200.0,
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, Decision.CONTINUE),
        ({"e_fail": 100.0}, Decision.FAIL),  # exactly 1/alpha
        ({"e_fail": 99.9}, Decision.CONTINUE),
        ({"e_fail": 1e6, "pass_reached": True}, Decision.FAIL),  # fail wins
        ({"pass_reached": True}, Decision.PASS),
        ({"pass_reached": True, "samples_canary": 199.0}, Decision.CONTINUE),
        ({"pass_reached": True, "samples_primary": 0.0}, Decision.CONTINUE),
        ({"pass_reached": True, "has_data": False}, Decision.CONTINUE),
        ({"e_fail": 1e9, "has_data": False}, Decision.CONTINUE),
        ({"e_fail": math.nan}, Decision.CONTINUE),
        ({"pass_reached": True, "samples_canary": math.nan}, Decision.CONTINUE),
        ({"e_fail": math.inf}, Decision.FAIL),
    ],
)
def test_decide_metric(change: dict[str, object], expected: Decision) -> None:
    """A metric fails at e >= 1/alpha, passes only with evidence and samples, else continues."""
    assert decide_metric(**{**BASE, **change}) is expected  # type: ignore[arg-type]


def _m(name: str, decision: Decision, *, critical: bool = True) -> MetricResult:
    return MetricResult(
        name=name, decision=decision, critical=critical, test="t", tolerance=0.5, alpha=0.01
    )


C, P, F = Decision.CONTINUE, Decision.PASS, Decision.FAIL


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ([], C),  # nothing measured: never a pass
        ([("a", P, True)], P),
        ([("a", P, True), ("b", P, False)], P),
        ([("a", P, True), ("b", C, True)], C),
        ([("a", P, True), ("b", C, False)], C),  # every metric must pass
        ([("a", P, True), ("b", F, True)], F),
        ([("a", C, True), ("b", F, True)], F),
        ([("a", P, True), ("b", F, False)], C),  # a non-critical failure cannot roll back...
        ([("a", C, True), ("b", F, False)], C),
    ],
)
def test_combine(metrics: list[tuple[str, Decision, bool]], expected: Decision) -> None:
    """Any critical fail fails; all passing passes; anything else continues."""
    ms = {n: _m(n, d, critical=c) for n, d, c in metrics}
    assert combine(ms) is expected


def test_reason_line_reads_well() -> None:
    """The reason names the metric, both rates, the ratio, the bound, the test and the decision."""
    m = MetricResult(
        name="errors",
        decision=Decision.FAIL,
        critical=True,
        test="conditional count test",
        estimate=2.05,
        lower=1.41,
        upper=3.02,
        tolerance=1.0,
        alpha=0.008,
        e_value_fail=143.0,
        samples_canary=1000,
        samples_primary=9000,
        events_canary=21,
        events_primary=90,
        extra={"rate_canary": 0.021, "rate_primary": 0.01},
    )
    line = reason_line(m)
    for part in (
        "errors:",
        "canary 2.1% vs primary 1%",
        "ratio 2.05",
        "one-sided 99.2% bounds [1.41, 3.02]",
        "conditional count test",
        "e_fail=143 >= 125",
        "FAIL",
    ):
        assert part in line, (part, line)
