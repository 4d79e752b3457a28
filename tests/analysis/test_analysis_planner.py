"""The planner's Wald-style estimates agree with simulations of the engine it describes."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_sim import BOUNDS, Arm, run_until, snapshots, stream

from analysis import AnalysisConfig, Analyzer, plan
from analysis.counts import CountTest


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
def test_expected_fail_time_matches_simulation(rate: float, weight: float, p: float, ratio: float) -> None:
    """Expected seconds to a rollback are within a factor 1.5 of the simulated mean."""
    est = plan(rate_rps=rate, canary_weight=weight, baseline_error_rate=p, error_ratio=ratio)
    sim = _mean_fail_s(rc=rate * weight, rp=rate * (1 - weight), p=p, ratio=ratio, runs=40,
                         seed=int(rate))
    assert est.expected_fail_s is not None
    assert sim / 1.5 <= est.expected_fail_s <= sim * 1.5, (est.expected_fail_s, sim)
    assert est.expected_fail_canary_requests == pytest.approx(est.expected_fail_s * rate * weight)


def test_expected_pass_time_matches_simulation() -> None:
    """Expected seconds to a pass in A/A are within a factor 2 of the simulated median."""
    # The share above each threshold bucket, as the engine will see it (p50: le=0.1 or 0.05)
    probs = Arm(20).bucket_probs()
    above = 1.0 - np.cumsum(probs)
    slow = {"latency_p50": float(above[BOUNDS.index(0.05)]),
            "latency_p99": float(above[BOUNDS.index(0.25)])}
    est = plan(rate_rps=40.0, canary_weight=0.5, baseline_error_rate=0.01, slow_rates=slow)
    times = []
    for seed in range(8):
        p, c = stream(Arm(20), Arm(20), 1200, seed=500 + seed)
        decision, t, _ = run_until(Analyzer(), snapshots(p, c, every=5))
        assert decision == "pass"
        times.append(t)
    sim = float(np.median(times))
    assert est.expected_pass_s is not None
    assert sim / 2 <= est.expected_pass_s <= sim * 2, (est.expected_pass_s, sim)


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
