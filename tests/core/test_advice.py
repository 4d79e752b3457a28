"""The planner's advice during a rollout (canary.core.advice): what it says, and when."""

from __future__ import annotations

import functools
import math

import pytest

from analysis import AnalysisConfig, ArmCounts, Snapshot, pass_advice
from canary.core.advice import Advice, assumed_advice, material, observed_advice, observed_due

CONFIG = AnalysisConfig()


def _snapshot(elapsed_s: float, total_rps: float, share: float, error_rate: float) -> Snapshot:
    def arm(requests: float) -> ArmCounts:
        # 90% under 0.1 s, 99.5% under 0.5 s on both arms: the latency thresholds freeze
        return ArmCounts(
            requests=requests,
            errors=round(requests * error_rate),
            latency_buckets={
                0.05: requests * 0.5,
                0.1: requests * 0.9,
                0.5: requests * 0.995,
                math.inf: requests,
            },
        )

    n = total_rps * elapsed_s
    return Snapshot(elapsed_s=elapsed_s, primary=arm(n * (1 - share)), canary=arm(n * share))


def test_low_traffic_is_told_it_will_not_pass_in_time_and_what_load_would_help() -> None:
    """0.2 canary req/s cannot show a good canary safe within a 15-minute step: a warning
    that says hours, and the generated load that would make it fit."""
    advice = assumed_advice(
        expected_rps=4.0, expected_error_rate=0.01, weight=5, budget_s=900.0, config=CONFIG
    )
    assert not advice.fits and advice.level == "warning"
    assert advice.likely_pass_s is not None and advice.likely_pass_s > 3600
    assert advice.canary_rps == pytest.approx(0.2)
    assert advice.extra_entry_rps is not None and advice.extra_entry_rps > 4.0
    assert advice.message.startswith(
        "time to pass at 5% (assumed 4 req/s at the entry point, 1% errors): "
        "at 0.2 canary req/s a good canary needs "
    )
    assert " h to pass in 95% of rollouts" in advice.message
    assert "longer than the 15.0 min step" in advice.message and "To fit: " in advice.message
    # the wording is pass_advice's own, then what generated load would do (canary loadtest)
    direct = pass_advice(rate_rps=4.0, canary_weight=0.05, baseline_error_rate=0.01)
    assert advice.message.endswith(
        f"{direct.message} With 250 req/s of generated load at the entry point "
        "(canary loadtest): 13.4 min."
    )


def test_high_traffic_fits_the_step() -> None:
    """20 canary req/s: a good canary passes within minutes, an info note, no load needed."""
    advice = assumed_advice(
        expected_rps=400.0, expected_error_rate=0.01, weight=5, budget_s=900.0, config=CONFIG
    )
    assert advice.fits and advice.level == "info"
    assert advice.likely_pass_s is not None and 60 < advice.likely_pass_s < 900
    assert advice.extra_canary_rps == 0.0 and advice.extra_entry_rps == 0.0
    assert "fits the 15.0 min step" in advice.message
    plan = advice.plan()
    assert plan["fits"] == 1.0 and plan["elapsed_s"] == 0.0
    assert plan["expected_fail_s"] is not None and plan["expected_fail_s"] < advice.likely_pass_s


def test_without_a_deadline_only_the_time_is_said() -> None:
    """max_step_s None: nothing rolls back at a deadline, so no 'longer than the step'."""
    advice = assumed_advice(
        expected_rps=4.0, expected_error_rate=0.01, weight=5, budget_s=None, config=CONFIG
    )
    assert advice.fits and advice.budget_s is None
    assert "step" not in advice.message.split("(no max_step_s")[0].split("errors): ", 1)[1]
    assert advice.message.endswith("(no max_step_s: the step waits for it)")


def test_observed_rates_replace_the_assumed_ones() -> None:
    """From counts: the traffic, split and error rate seen, and the seconds they cover."""
    low = observed_advice(_snapshot(60.0, 4.0, 0.05, 0.01), weight=5, budget_s=900, config=CONFIG)
    assert low.source == "observed" and low.elapsed_s == 60.0
    assert low.canary_rps == pytest.approx(0.2, rel=0.01)
    assert not low.fits and "observed over 60 s: 4 req/s" in low.message
    high = observed_advice(
        _snapshot(60.0, 400.0, 0.05, 0.01), weight=5, budget_s=900, config=CONFIG
    )
    assert high.fits and high.likely_pass_s is not None
    assert low.likely_pass_s is not None and low.likely_pass_s > 20 * high.likely_pass_s
    with pytest.raises(ValueError, match="no traffic observed"):
        observed_advice(_snapshot(60.0, 4.0, 0.0, 0.01), weight=5, budget_s=900, config=CONFIG)


def test_the_first_observed_estimate_waits_until_the_counts_replace_the_guesses() -> None:
    """After a minute of counts; earlier (from 10 s) only once each arm has min_samples
    requests and every latency threshold is frozen; then at most once a minute; never
    without traffic on both arms."""
    due = functools.partial(observed_due, config=CONFIG)
    assert not due(None, _snapshot(30.0, 4.0, 0.05, 0.01))  # 6 canary requests
    assert due(None, _snapshot(60.0, 4.0, 0.05, 0.01))
    assert due(None, _snapshot(10.0, 400.0, 0.1, 0.01))  # 400 canary, 3600 primary
    assert not due(None, _snapshot(5.0, 4000.0, 0.1, 0.01))  # too soon to call it a rate
    assert not due(None, _snapshot(10.0, 40.0, 0.5, 0.01))  # p99 threshold not frozen yet
    assert not due(None, _snapshot(120.0, 4.0, 0.0, 0.01))  # no canary traffic
    assert not due(60.0, _snapshot(100.0, 4.0, 0.05, 0.01))
    assert due(60.0, _snapshot(120.0, 4.0, 0.05, 0.01))


def _advice(**changes: object) -> Advice:
    base = assumed_advice(
        expected_rps=400.0, expected_error_rate=0.01, weight=5, budget_s=900.0, config=CONFIG
    )
    fields = {name: getattr(base, name) for name in Advice.__slots__}
    fields.update(changes)
    return Advice(**fields)  # type: ignore[arg-type]


def test_only_material_changes_are_said_again() -> None:
    """The first estimate, the first from observed rates, another weight, a flip of 'fits',
    or a time to pass moved by more than 2x are said; a 30% move is not."""
    first = _advice()
    assert first.likely_pass_s is not None
    assert material(None, first)
    assert material(first, _advice(source="observed", elapsed_s=60.0))
    assert material(first, _advice(weight=10))
    assert material(first, _advice(fits=False))
    assert material(first, _advice(likely_pass_s=first.likely_pass_s * 2.5))
    assert material(first, _advice(likely_pass_s=None))
    assert not material(first, _advice(likely_pass_s=first.likely_pass_s * 1.3))
    assert not material(first, first)


# --- generated load (canary loadtest) ---------------------------------------------------


def test_a_step_that_does_not_fit_is_told_what_generated_load_would_do() -> None:
    """0.4 canary req/s needs hours; the advice names a round entry-point rate of generated
    load (canary loadtest) at or above the one needed, and the minutes it would take then."""
    advice = assumed_advice(
        expected_rps=4.0, expected_error_rate=0.01, weight=10, budget_s=900.0, config=CONFIG
    )
    assert not advice.fits and advice.generated_rps is None
    assert advice.extra_entry_rps is not None and advice.suggested_load_rps is not None
    assert advice.extra_entry_rps <= advice.suggested_load_rps <= 1.25 * advice.extra_entry_rps
    assert advice.suggested_load_pass_s is not None and advice.suggested_load_pass_s <= 900.0
    load = f"{advice.suggested_load_rps:.3g}"
    assert f"With {load} req/s of generated load at the entry point (canary loadtest): " in (
        advice.message
    )
    assert advice.message.endswith(" min.")
    assert advice.plan()["suggested_load_rps"] == advice.suggested_load_rps
    # a step that fits needs no suggestion
    busy = assumed_advice(
        expected_rps=400.0, expected_error_rate=0.01, weight=5, budget_s=900.0, config=CONFIG
    )
    assert busy.suggested_load_rps is None and "canary loadtest" not in busy.message


def test_a_configured_load_test_is_part_of_the_assumed_estimate() -> None:
    """With 200 req/s generated at the entry point the same step fits, and the advice says
    what it would need without the load; at the canary alone the primary's few requests
    still limit the comparison, which the estimate shows."""
    without = assumed_advice(
        expected_rps=4.0, expected_error_rate=0.01, weight=10, budget_s=900.0, config=CONFIG
    )
    loaded = assumed_advice(
        expected_rps=4.0,
        expected_error_rate=0.01,
        weight=10,
        budget_s=900.0,
        config=CONFIG,
        generated_rps=200.0,
    )
    assert loaded.fits and loaded.generated_rps == 200.0 and loaded.generated_at == "entry"
    assert loaded.canary_rps == pytest.approx(20.4)
    assert loaded.without_load_pass_s == without.likely_pass_s
    assert "and 200 req/s generated at the entry point by canary loadtest" in loaded.message
    assert loaded.message.endswith(" Without the generated load: 7.7 h.")
    assert loaded.suggested_load_rps is None
    at_canary = assumed_advice(
        expected_rps=4.0,
        expected_error_rate=0.01,
        weight=10,
        budget_s=900.0,
        config=CONFIG,
        generated_rps=200.0,
        generated_at="canary",
    )
    assert at_canary.canary_rps == pytest.approx(200.4)
    assert at_canary.primary_rps == pytest.approx(3.6)
    assert at_canary.likely_pass_s is not None and loaded.likely_pass_s is not None
    assert at_canary.likely_pass_s > loaded.likely_pass_s
    with pytest.raises(ValueError, match="generated_rps"):
        assumed_advice(
            expected_rps=4.0,
            expected_error_rate=0.01,
            weight=10,
            budget_s=900.0,
            config=CONFIG,
            generated_rps=0.0,
        )


def test_observed_counts_hold_the_load_and_missing_load_is_flagged() -> None:
    """Observed rates include generated load already: the advice says so when it arrives,
    and warns when far less traffic arrives than the load test alone should send."""
    arriving = observed_advice(
        _snapshot(60.0, 204.0, 0.1, 0.01),
        weight=10,
        budget_s=900.0,
        config=CONFIG,
        generated_rps=200.0,
    )
    assert arriving.canary_rps == pytest.approx(20.4)
    assert arriving.message.endswith("(Includes 200 req/s generated at the entry point.)")
    missing = observed_advice(
        _snapshot(60.0, 4.0, 0.1, 0.01),
        weight=10,
        budget_s=900.0,
        config=CONFIG,
        generated_rps=200.0,
    )
    assert not missing.fits and missing.suggested_load_rps is None
    assert "The load test should add 200 req/s at the entry point, but only 4 req/s arrive" in (
        missing.message
    )
