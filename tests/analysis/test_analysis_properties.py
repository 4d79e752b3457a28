"""Invariants of the Analyzer under arbitrary (valid and invalid) input, by hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import AnalysisConfig, Analyzer, ArmCounts, Decision, Snapshot

BOUNDS = (0.05, 0.1, 0.5)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# One interval of one arm: requests, errors <= requests, slow-split of the requests.
step = st.tuples(
    st.integers(0, 400), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)
)


def _arm(cum: list[float]) -> ArmCounts:
    n, e, b1, b2, b3 = cum
    return ArmCounts(
        requests=n, errors=e, latency_buckets={0.05: b1, 0.1: b2, 0.5: b3, math.inf: n}
    )


def _grow(cum: list[float], s: tuple[int, float, float, float, float]) -> list[float]:
    n, fe, f1, f2, f3 = s
    e = math.floor(n * fe)
    cuts = sorted((math.floor(n * f1), math.floor(n * f2), math.floor(n * f3)))
    return [cum[0] + n, cum[1] + e, cum[2] + cuts[0], cum[3] + cuts[1], cum[4] + cuts[2]]


def _feed(
    an: Analyzer,
    steps: list[tuple[tuple[int, float, float, float, float], ...]],
    *,
    swap: bool = False,
) -> list[Decision]:
    p = [0.0] * 5
    c = [0.0] * 5
    out = []
    for t, (sp, sc) in enumerate(steps, start=1):
        p, c = _grow(p, sp), _grow(c, sc)
        a, b = (_arm(c), _arm(p)) if swap else (_arm(p), _arm(c))
        out.append(an.observe(Snapshot(elapsed_s=t, primary=a, canary=b)).decision)
    return out


@FAST
@given(st.lists(st.tuples(step, step), min_size=1, max_size=40))
def test_growing_counters_never_crash_and_fail_is_final(
    steps: list[tuple[tuple[int, float, float, float, float], ...]],
) -> None:
    """Any counters that only grow give valid verdicts; a fail is never taken back."""
    an = Analyzer(AnalysisConfig(min_samples=10))
    decisions = _feed(an, steps)
    if Decision.FAIL in decisions:
        first = decisions.index(Decision.FAIL)
        assert all(d is Decision.FAIL for d in decisions[first:])


@FAST
@given(st.lists(st.tuples(step, step), min_size=1, max_size=30))
def test_every_metric_reports_sane_numbers(
    steps: list[tuple[tuple[int, float, float, float, float], ...]],
) -> None:
    """E-values are finite and >= 0; bounds, when given, bracket the estimate."""
    an = Analyzer()
    p = [0.0] * 5
    c = [0.0] * 5
    for t, (sp, sc) in enumerate(steps, start=1):
        p, c = _grow(p, sp), _grow(c, sc)
        v = an.observe(Snapshot(elapsed_s=t, primary=_arm(p), canary=_arm(c)))
        assert len(v.reasons) >= len(v.metrics)
        for m in v.metrics.values():
            assert 0 <= m.e_value_fail < math.inf and 0 <= m.e_value_pass < math.inf
            assert m.samples_canary >= 0 and m.events_canary >= 0
            if m.lower is not None and m.upper is not None:
                assert m.lower <= m.upper


@FAST
@given(st.lists(st.tuples(step, step), min_size=1, max_size=30), st.booleans())
def test_never_a_pass_without_data_on_both_arms(
    steps: list[tuple[tuple[int, float, float, float, float], ...]], silent_canary: bool
) -> None:
    """If one arm never serves a request, the analysis never passes (nor fails)."""
    an = Analyzer(AnalysisConfig(min_samples=1))
    empty = (0, 0.0, 0.0, 0.0, 0.0)
    steps = [((sp, empty) if silent_canary else (empty, sc)) for sp, sc in steps]
    assert set(_feed(an, steps)) == {Decision.CONTINUE}


@FAST
@given(st.lists(st.integers(0, 300), min_size=1, max_size=30))
def test_never_a_pass_without_latency_buckets(sizes: list[int]) -> None:
    """Perfectly healthy errors but no histogram: latency has no data, so no pass."""
    an = Analyzer(AnalysisConfig(min_samples=1))
    n = 0.0
    for t, k in enumerate(sizes, start=1):
        n += k
        arm = ArmCounts(requests=n, errors=0)
        v = an.observe(Snapshot(elapsed_s=t, primary=arm, canary=arm))
        assert v.decision is Decision.CONTINUE
        assert "no data" in v.metrics["latency_p50"].reason


@FAST
@given(st.lists(st.tuples(step, step), min_size=2, max_size=25))
def test_swapping_the_arms_flips_the_direction(
    steps: list[tuple[tuple[int, float, float, float, float], ...]],
) -> None:
    """Swapping canary and primary inverts the error ratio's estimate and its bounds."""
    a, b = Analyzer(), Analyzer()
    _feed(a, steps)
    _feed(b, steps, swap=True)
    ea = a._errors.state()
    eb = b._errors.state()
    if ea.estimate is not None and eb.estimate is not None and 0 < ea.estimate < math.inf:
        assert eb.estimate == pytest.approx(1 / ea.estimate)
    if ea.lower is not None and eb.upper is not None and ea.lower > 0 and eb.upper < math.inf:
        assert eb.upper == pytest.approx(1 / ea.lower, rel=1e-9)
    if ea.upper is not None and eb.lower is not None and ea.upper < math.inf and eb.lower > 0:
        assert eb.lower == pytest.approx(1 / ea.upper, rel=1e-9)


finite = st.floats(0, 1e6)


@FAST
@given(
    st.sampled_from(["requests", "errors", "bucket"]),
    st.sampled_from([-1.0, -1e-9, math.nan, math.inf, -math.inf]),
)
def test_bad_numbers_are_refused_by_name(field: str, bad: float) -> None:
    """Negative, NaN or infinite counts raise a ValueError that names the field."""
    with pytest.raises(ValueError, match=r"requests|errors|latency_buckets"):
        if field == "requests":
            ArmCounts(requests=bad)
        elif field == "errors":
            ArmCounts(requests=10, errors=bad)
        else:
            ArmCounts(requests=10, latency_buckets={0.1: bad})


@FAST
@given(finite, st.floats(0.5, 1e6))
def test_errors_above_requests_refused(n: float, extra: float) -> None:
    """errors > requests is refused, naming both."""
    with pytest.raises(ValueError, match=r"errors .* > requests"):
        ArmCounts(requests=n, errors=n + extra)
