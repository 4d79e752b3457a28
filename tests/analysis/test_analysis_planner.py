"""The planner's Wald-style estimates agree with simulations of the engine it describes."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_sim import BOUNDS, Arm, run_until, snapshots, stream
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import AnalysisConfig, Analyzer, pass_advice, plan, plan_from_counts, planner
from analysis.counts import CountTest, rate_bounds


def _mean_fail_s(*, rc: float, rp: float, p: float, ratio: float, runs: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    alpha = AnalysisConfig().metric_alphas()["errors"]
    times = []
    for _ in range(runs):
        t = CountTest(alpha=alpha, pass_alpha=0.05)
        t.update(0, 0, 0, 0)
        nc = ec = np_ = ep = 0.0
        for s in range(1, 3600):
            a, b = rng.poisson(rc), rng.poisson(rp)
            nc, np_ = nc + a, np_ + b
            ec += rng.binomial(a, min(p * ratio, 1.0))
            ep += rng.binomial(b, p)
            t.update(nc, ec, np_, ep)
            if t.fail_reached():
                times.append(s)
                break
    assert len(times) == runs
    return float(np.mean(times))


@pytest.mark.parametrize(
    ("rate", "weight", "p", "ratio"),
    [(200.0, 0.1, 0.01, 2.0), (50.0, 0.5, 0.02, 3.0), (1000.0, 0.05, 0.001, 2.0)],
)
def test_expected_fail_time_matches_simulation(
    rate: float, weight: float, p: float, ratio: float
) -> None:
    """Expected seconds to a rollback are within a factor 1.5 of the simulated mean."""
    est = plan(rate_rps=rate, canary_weight=weight, baseline_error_rate=p, error_ratio=ratio)
    sim = _mean_fail_s(
        rc=rate * weight, rp=rate * (1 - weight), p=p, ratio=ratio, runs=40, seed=int(rate)
    )
    assert est.expected_fail_s is not None
    assert sim / 1.5 <= est.expected_fail_s <= sim * 1.5, (est.expected_fail_s, sim)
    assert est.expected_fail_canary_requests == pytest.approx(est.expected_fail_s * rate * weight)


def test_expected_pass_time_matches_simulation() -> None:
    """Expected seconds to a pass in A/A are within a factor 2 of the simulated median, and
    the 95% quantile is not below the slowest simulated run but one."""
    # 20 canary req/s beside 180 on the primary (200 req/s at 10%), defaults.
    probs = Arm(20).bucket_probs()
    above = 1.0 - np.cumsum(probs)
    slow = {
        "latency_p50": float(above[BOUNDS.index(0.05)]),
        "latency_p99": float(above[BOUNDS.index(0.25)]),
    }
    est = plan(rate_rps=200.0, canary_weight=0.1, baseline_error_rate=0.01, slow_rates=slow)
    times = []
    for seed in range(10):
        p, c = stream(Arm(180), Arm(20), 1500, seed=500 + seed)
        decision, t, _ = run_until(Analyzer(), snapshots(p, c, every=5))
        assert decision == "pass"
        times.append(t)
    sim = float(np.median(times))
    assert est.expected_pass_s is not None and est.likely_pass_s is not None
    assert sim / 2 <= est.expected_pass_s <= sim * 2, (est.expected_pass_s, sim)
    assert est.likely_pass_s >= sorted(times)[-2], (est.likely_pass_s, times)


def test_plan_from_counts_uses_the_observed_rates() -> None:
    """Observed rates replace the guesses: a service with few slow requests above the p99
    bucket is planned with that share, and the traffic and split come from the counts."""
    p, c = stream(Arm(180), Arm(20), 120, seed=61)
    snap = list(snapshots(p, c))[-1]
    observed = plan_from_counts(snap)
    assert observed.canary_rps == pytest.approx(20, rel=0.1)
    assert observed.primary_rps == pytest.approx(180, rel=0.1)
    assert observed.base_error_rate == pytest.approx(0.01, rel=0.3)
    # the p99 threshold lands on le=0.25 s, above which ~0.4% of requests are, not 1%
    assert 0.001 < observed.slow_rates["latency_p99"] < 0.008
    guessed = plan(rate_rps=200.0, canary_weight=0.1, baseline_error_rate=0.01)
    assert guessed.slow_rates["latency_p99"] == pytest.approx(0.01)
    # a rarer tail is bounded sooner by the absolute route: the guess of 1% was too slow
    p99 = {m.name: m for m in observed.metrics}["latency_p99"]
    g99 = {m.name: m for m in guessed.metrics}["latency_p99"]
    assert p99.expected_pass_s is not None and g99.expected_pass_s is not None
    assert p99.pass_route == "absolute" and p99.expected_pass_s < g99.expected_pass_s / 1.5
    with pytest.raises(ValueError, match="no traffic"):
        plan_from_counts(next(snapshots(p[:1] * 0, c[:1] * 0)))


def test_pass_advice_says_when_a_step_is_too_short_and_what_load_fits_it() -> None:
    """At 2 canary req/s a good canary cannot pass in 15 min; the advised generated load
    makes the planner's 95% time fit, and 200 req/s at 10% already fits."""
    slow = pass_advice(rate_rps=20.0, canary_weight=0.1, baseline_error_rate=0.01)
    assert not slow.fits and slow.limiting_metric == "errors"
    assert slow.extra_canary_rps is not None and slow.extra_canary_rps > 0
    assert "generated load on the canary" in slow.message
    boosted = plan(
        rate_rps=20.0 + slow.extra_canary_rps,
        canary_weight=(2.0 + slow.extra_canary_rps) / (20.0 + slow.extra_canary_rps),
        baseline_error_rate=0.01,
    )
    assert boosted.likely_pass_s is not None and boosted.likely_pass_s <= 900.0
    ok = pass_advice(rate_rps=200.0, canary_weight=0.1, baseline_error_rate=0.01)
    assert ok.fits and ok.extra_canary_rps == 0.0 and "fits" in ok.message
    never = pass_advice(rate_rps=200.0, canary_weight=0.1, baseline_error_rate=0.0)
    assert never.likely_pass_s is not None  # errors pass by the absolute route at 0%


def test_plan_reacts_to_traffic_and_refuses_bad_input() -> None:
    """More traffic means faster decisions; nonsense input names the argument."""
    slow = plan(rate_rps=20, canary_weight=0.1, baseline_error_rate=0.01)
    fast = plan(rate_rps=2000, canary_weight=0.1, baseline_error_rate=0.01)
    assert slow.expected_fail_s and fast.expected_fail_s
    assert fast.expected_fail_s < slow.expected_fail_s / 50
    assert [m.name for m in fast.metrics] == ["errors", "latency_p50", "latency_p99"]
    for kwargs, field in (
        ({"rate_rps": -1.0}, "rate_rps"),
        ({"canary_weight": 1.0}, "canary_weight"),
        ({"baseline_error_rate": float("nan")}, "baseline_error_rate"),
    ):
        args = {"rate_rps": 100.0, "canary_weight": 0.1, "baseline_error_rate": 0.01, **kwargs}
        with pytest.raises(ValueError, match=field):
            plan(**args)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    p=st.floats(1e-5, 0.9),
    canary_rps=st.floats(1e-3, 1e4),
    primary_rps=st.floats(1e-3, 1e5),
    abs_tol=st.floats(1e-4, 0.5),
    alpha=st.sampled_from([0.001, 0.01, 0.05]),
)
def test_abs_pass_time_bisected_is_the_first_time_of_the_scan(
    p: float, canary_rps: float, primary_rps: float, abs_tol: float, alpha: float
) -> None:
    """The bisected grid search answers what the plain scan over the same grid (its earlier
    form, 30x slower) does: the first time at which the absolute bound fits."""

    def scan() -> float | None:
        for t in planner._ABS_GRID:
            n_c, n_p = canary_rps * t, primary_rps * t
            _, c_hi = rate_bounds(p * n_c, n_c, alpha / 4)
            p_lo, _ = rate_bounds(p * n_p, n_p, alpha / 4)
            if c_hi - p_lo < abs_tol:
                return t
        return None

    got = planner._abs_pass_s(
        p=p, canary_rps=canary_rps, primary_rps=primary_rps, abs_tol=abs_tol, alpha=alpha
    )
    assert got == scan()
    assert len(planner._ABS_GRID) == 273 and planner._ABS_GRID[-1] <= 7 * 86400
