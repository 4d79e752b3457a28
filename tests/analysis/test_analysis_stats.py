"""Statistical behaviour with fixed seeds: calibration, power, robustness, cadence, resets.

Run counts are small (CI), so each check compares with a margin that a broken test would
still blow through: e.g. repeated naive tests under peeking reject far above alpha.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from analysis_sim import Arm, arm_counts, run_until, snapshots, split_stream, stream

from analysis import AnalysisConfig, Analyzer, ArmCounts, Decision, Snapshot
from analysis.counts import CountTest, rate_bounds


def _count_runs(
    *,
    runs: int,
    seconds: int,
    rc: float,
    rp: float,
    pc: float,
    pp: float,
    alpha: float,
    seed: int,
    every: int = 1,
) -> tuple[int, list[int]]:
    """Errors-only CountTests on simulated streams: (number that failed, seconds to fail)."""
    rng = np.random.default_rng(seed)
    fails, times = 0, []
    for _ in range(runs):
        nc = rng.poisson(rc, seconds).cumsum()
        np_ = rng.poisson(rp, seconds).cumsum()
        ec = rng.binomial(np.diff(nc, prepend=0), pc).cumsum()
        ep = rng.binomial(np.diff(np_, prepend=0), pp).cumsum()
        t = CountTest(alpha=alpha, pass_alpha=0.05)
        t.update(0, 0, 0, 0)
        for s in range(every - 1, seconds, every):
            t.update(float(nc[s]), float(ec[s]), float(np_[s]), float(ep[s]))
            if t.fail_reached():
                fails += 1
                times.append(s + 1)
                break
    return fails, times


def test_calibration_under_continuous_peeking() -> None:
    """A/A at alpha=0.05, looked at every second for 10 min: false fails stay below alpha."""
    fails, _ = _count_runs(
        runs=200, seconds=600, rc=20, rp=180, pc=0.02, pp=0.02, alpha=0.05, seed=11
    )
    # Ville: P(ever) <= 5%, i.e. ~10 of 200; a peeking z-test would reject in ~40-60%.
    assert fails <= 16


def test_calibration_at_low_traffic() -> None:
    """A/A at 0.4 canary req/s (most seconds have no canary request) stays calibrated."""
    fails, _ = _count_runs(
        runs=150, seconds=900, rc=0.4, rp=3.6, pc=0.05, pp=0.05, alpha=0.05, seed=12
    )
    assert fails <= 13


def test_calibration_with_the_split_drawn_per_second() -> None:
    """Issue 12's traffic: Poisson(200) arrivals, Binomial(arrivals, 10%) to the canary each
    second, looked at every second for 15 min: false fails stay below alpha = 5%."""
    rng = np.random.default_rng(15)
    runs, seconds, fails = 200, 900, 0
    for _ in range(runs):
        total = rng.poisson(200.0, seconds)
        nc = rng.binomial(total, 0.1)
        np_ = total - nc
        ec, ep = rng.binomial(nc, 0.01).cumsum(), rng.binomial(np_, 0.01).cumsum()
        nc, np_ = nc.cumsum(), np_.cumsum()
        t = CountTest(alpha=0.05, pass_alpha=0.05)
        t.update(0, 0, 0, 0)
        for s in range(seconds):
            t.update(float(nc[s]), float(ec[s]), float(np_[s]), float(ep[s]))
            if t.fail_reached():
                fails += 1
                break
    # ~10 of 200 at most by Ville (usually fewer); a test that ignored the per-second split
    # or peeked at a fixed-sample z-test would be far above.
    assert fails <= 16


def test_one_and_a_half_x_errors_are_rolled_back_with_defaults() -> None:
    """1% -> 1.5% errors at 200 req/s, 10% canary, split drawn per second, defaults untouched,
    observed every second: rolled back, never promoted (it was promoted ~45% of the time when
    the tolerance allowed 2x)."""
    cfg = AnalysisConfig()
    # 1.5x at a 1% base is outside both routes of the pass test, by construction
    assert 1.0 + cfg.errors.tolerance <= 1.5 and cfg.errors.abs_tolerance < 0.005
    decisions = []
    for seed in range(10):
        p, c = split_stream(
            total_rps=200.0,
            weight=0.1,
            primary=Arm(0),
            canary=Arm(0, error_rate=0.015),
            seconds=900,
            seed=700 + seed,
        )
        decision, _t, v = run_until(Analyzer(), snapshots(p, c))
        decisions.append(decision)
        if decision == "fail":
            assert v.metrics["errors"].decision is Decision.FAIL
    assert decisions.count("pass") == 0
    assert decisions.count("fail") >= 9, decisions


def test_power_and_speed_against_wald() -> None:
    """1% -> 2% at 200 req/s, 10% canary: median within 1.5x of the two-sample SPRT's ~1008 req."""
    fails, times = _count_runs(
        runs=60, seconds=400, rc=20, rp=180, pc=0.02, pp=0.01, alpha=0.008, seed=13
    )
    assert fails == 60
    median_canary_requests = float(np.median(times)) * 20
    assert median_canary_requests <= 1.5 * 1008


def test_cadence_invariance() -> None:
    """The same streams looked at every 1 s or every 60 s give comparable decisions."""
    kw = dict(runs=40, seconds=600, rc=20, rp=180, pc=0.02, pp=0.01, alpha=0.008, seed=14)
    f1, t1 = _count_runs(**kw, every=1)  # type: ignore[arg-type]
    f60, t60 = _count_runs(**kw, every=60)  # type: ignore[arg-type]
    assert f1 == f60 == 40
    # 60 s looks can only add up to one interval of delay to the decision.
    assert float(np.median(t1)) <= float(np.median(t60)) <= float(np.median(t1)) + 60
    # and the evidence at a common look is the same statistic
    an1, an60 = Analyzer(), Analyzer()
    p, c = stream(Arm(180), Arm(20, error_rate=0.015), 120, seed=5)
    for s in snapshots(p, c, every=1):
        v1 = an1.observe(s)
    for s in snapshots(p, c, every=60):
        v60 = an60.observe(s)
    e1, e60 = v1.metrics["errors"].e_value_fail, v60.metrics["errors"].e_value_fail
    assert math.log(e60) == pytest.approx(math.log(e1), abs=0.5)


def test_crash_is_caught_within_three_observations() -> None:
    """A canary failing every request at 10 req/s fails within 3 one-second looks."""
    for seed in range(10):
        p, c = stream(Arm(90), Arm(10, error_rate=1.0), 10, seed=seed)
        decision, t, _ = run_until(Analyzer(), snapshots(p, c))
        assert decision == "fail" and t <= 3


def test_shared_incident_and_bursts_do_not_fail() -> None:
    """Errors x10 and traffic x5 hitting both arms alike never roll back a good canary."""
    seconds = 600
    rate = np.ones(seconds)
    rate[100:145] = 5.0
    rate[400:445] = 5.0
    err = np.ones(seconds)
    err[200:260] = 10.0
    fails = 0
    for seed in range(12):
        p, c = stream(
            Arm(180), Arm(20), seconds, seed=100 + seed, rate_factor=rate, error_factor=err
        )
        decision, _, _ = run_until(Analyzer(), snapshots(p, c, every=5))
        fails += decision == "fail"
    assert fails == 0


def test_canary_only_incident_fails() -> None:
    """The same incident on the canary alone is a regression and is caught (the test can fail)."""
    seconds = 300
    err = np.ones(seconds)
    err[100:160] = 10.0
    p, _ = stream(Arm(180), Arm(20), seconds, seed=7)
    _, c = stream(Arm(180), Arm(20), seconds, seed=8, error_factor=err)
    decision, t, _ = run_until(Analyzer(), snapshots(p, c))
    assert decision == "fail" and 100 < t < 160


def test_counter_reset_is_reported_and_skipped() -> None:
    """A counter going backwards (pod restart) is said in reasons and never crashes or fails."""
    an = Analyzer()
    p, c = stream(Arm(180), Arm(20), 120, seed=3)
    verdicts = []
    for s in snapshots(p, c):
        if s.elapsed_s > 60:  # the canary restarted at 60 s: its counters start again
            base = c[59]
            row = c[int(s.elapsed_s) - 1] - base
            s = Snapshot(elapsed_s=s.elapsed_s, primary=s.primary, canary=arm_counts(row))
        verdicts.append(an.observe(s))
    reset = verdicts[60]
    assert any("counter reset" in r and "canary requests" in r for r in reset.reasons)
    assert all(v.decision is not Decision.FAIL for v in verdicts)
    assert verdicts[-1].metrics["errors"].extra["skipped_intervals"] == 1
    # The increments after the reset are counted again.
    assert (
        verdicts[-1].metrics["errors"].samples_canary
        > verdicts[59].metrics["errors"].samples_canary
    )


def test_aa_passes_at_twenty_canary_rps() -> None:
    """A/A at 20 canary req/s (50% weight, 1% errors) passes within 10 minutes, defaults."""
    passes, times = 0, []
    for seed in range(8):
        p, c = stream(Arm(20), Arm(20), 600, seed=200 + seed)
        decision, t, v = run_until(Analyzer(), snapshots(p, c, every=5))
        assert decision != "fail"
        if decision == "pass":
            passes += 1
            times.append(t)
            assert all(m.decision is Decision.PASS for m in v.metrics.values())
    assert passes >= 7


def test_latency_regressions_are_detected() -> None:
    """A +30% median and a tail-only regression (3% of requests 8x slower) are both caught."""
    base = Arm(180)
    for name, canary in (
        ("latency_p50", Arm(20, median_s=0.065)),
        ("latency_p99", Arm(20, slow_fraction=0.03, slow_factor=8.0)),
    ):
        for seed in range(3):
            p, c = stream(base, canary, 900, seed=300 + seed)
            decision, _t, v = run_until(Analyzer(), snapshots(p, c, every=5))
            assert decision == "fail", name
            assert v.metrics[name].decision is Decision.FAIL
            assert v.metrics["errors"].decision is not Decision.FAIL


def test_latency_threshold_is_frozen_and_mismatched_buckets_are_said() -> None:
    """The threshold is chosen once from the primary, over the bounds both arms share."""
    an = Analyzer(AnalysisConfig(quantiles=(0.5,)))
    p, c = stream(Arm(180), Arm(20), 30, seed=9)
    thresholds = set()
    notes = []
    for s in snapshots(p, c):
        canary = ArmCounts(
            requests=s.canary.requests,
            errors=s.canary.errors,
            latency_buckets={k: v for k, v in s.canary.latency_buckets.items() if k != 0.05},
        )
        v = an.observe(Snapshot(elapsed_s=s.elapsed_s, primary=s.primary, canary=canary))
        notes += v.notes
        if v.metrics["latency_p50"].threshold_s is not None:
            thresholds.add(v.metrics["latency_p50"].threshold_s)
    assert thresholds == {0.1}  # 0.05 is the primary's median bound, but the canary lacks it
    assert any("bucket bounds differ" in n and "0.05" in n for n in notes)
    assert sum("threshold frozen" in n for n in notes) == 1


def test_rate_bounds_cover() -> None:
    """The one-arm confidence sequence covers the true rate at every look, in >= 1-alpha runs."""
    rng = np.random.default_rng(21)
    misses = 0
    for _ in range(200):
        x = rng.random(2000) < 0.01
        e = np.cumsum(x)
        for n in range(50, 2001, 50):
            lo, hi = rate_bounds(float(e[n - 1]), float(n), 0.05)
            if not lo <= 0.01 <= hi:
                misses += 1
                break
    assert misses <= 10  # alpha = 5% -> ~10 of 200 at most, usually far fewer


def test_arm_swap_flips_bounds_on_real_data() -> None:
    """On a regression stream, swapping the arms maps estimate and CS to their reciprocals."""
    p, c = stream(Arm(180), Arm(20, error_rate=0.02), 60, seed=4)
    a, b = Analyzer(), Analyzer()
    for s in snapshots(p, c):
        va = a.observe(s)
        vb = b.observe(Snapshot(elapsed_s=s.elapsed_s, primary=s.canary, canary=s.primary))
    ea, eb = va.metrics["errors"], vb.metrics["errors"]
    assert ea.estimate is not None and eb.estimate is not None
    assert ea.estimate > 1 > eb.estimate
    assert eb.estimate == pytest.approx(1 / ea.estimate)
    assert ea.lower is not None and eb.upper is not None and ea.upper is not None
    assert eb.upper == pytest.approx(1 / ea.lower) and eb.lower == pytest.approx(1 / ea.upper)


def test_fail_and_lower_bound_agree() -> None:
    """At every look, errors fail exactly when the lower bound reaches the fail ratio (1)."""
    seen_fail = False
    for seed in range(4):
        p, c = stream(Arm(180), Arm(20, error_rate=0.018), 300, seed=40 + seed)
        an = Analyzer()
        for s in snapshots(p, c):
            m = an.observe(s).metrics["errors"]
            if m.lower is None:
                continue
            failing = m.e_value_fail >= 1 / m.alpha
            assert failing == (m.lower >= 1.0), (m.e_value_fail, m.lower)
            seen_fail |= failing
            assert m.upper is None or m.lower <= (m.estimate or 0) <= m.upper or m.estimate is None
    assert seen_fail


def test_conditions_on_the_observed_split() -> None:
    """A split that swings between 2% and 30% while a shared incident hits is not a regression."""
    seconds = 400
    share = np.where((np.arange(seconds) // 30) % 2 == 0, 0.02, 0.30)
    err = np.ones(seconds)
    err[30:60] = 10.0  # the incident lands in 30%-canary phases
    err[150:180] = 10.0
    fails = 0
    for seed in range(6):
        rng = np.random.default_rng(600 + seed)
        n = rng.poisson(200.0, seconds)
        nc = rng.binomial(n, share)
        np_ = n - nc
        ec = rng.binomial(nc, 0.01 * err)
        ep = rng.binomial(np_, 0.01 * err)
        an = Analyzer(AnalysisConfig(quantiles=()))
        for t in range(1, seconds + 1):
            v = an.observe(
                Snapshot(
                    elapsed_s=t,
                    primary=ArmCounts(requests=float(np_[:t].sum()), errors=float(ep[:t].sum())),
                    canary=ArmCounts(requests=float(nc[:t].sum()), errors=float(ec[:t].sum())),
                )
            )
            if v.decision != "continue":
                break
        fails += v.decision == "fail"
        # The canary's share of errors over the run is well above its average traffic share:
        # a test on the configured (or average) split would call this a regression.
        assert ec.sum() / (ec.sum() + ep.sum()) > 1.3 * nc.sum() / n.sum()
    assert fails == 0


def test_latency_without_inf_bucket_and_with_a_missing_threshold_bucket() -> None:
    """No +Inf bucket: requests is the total; a look missing the threshold bucket is skipped."""
    an = Analyzer(AnalysisConfig(quantiles=(0.5,)))
    p, c = stream(Arm(180), Arm(20), 40, seed=31)
    notes: list[str] = []
    for s in snapshots(p, c):
        drop = {math.inf} | ({0.1, 0.05} if s.elapsed_s == 20 else set())
        arms = [
            ArmCounts(
                requests=a.requests,
                errors=a.errors,
                latency_buckets={k: v for k, v in a.latency_buckets.items() if k not in drop},
            )
            for a in (s.primary, s.canary)
        ]
        v = an.observe(Snapshot(elapsed_s=s.elapsed_s, primary=arms[0], canary=arms[1]))
        notes += v.notes
    m = v.metrics["latency_p50"]
    assert m.threshold_s in (0.05, 0.1)
    assert any("missing from an arm" in n for n in notes)
    # all post-freeze requests are counted, the skipped look's increment included afterwards
    assert m.samples_primary + m.samples_canary > 0.9 * (p[-1, 0] + c[-1, 0]) - 2000
