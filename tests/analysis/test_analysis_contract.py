"""The public contract of analysis/: names, the documented example, settings, bad input."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

import analysis
from analysis import AnalysisConfig, Analyzer, ArmCounts, Decision, MetricConfig, Snapshot, Verdict


def _example() -> Snapshot:
    return Snapshot(
        elapsed_s=30.0,
        primary=ArmCounts(
            requests=5400, errors=54, latency_buckets={0.05: 3100, 0.1: 4700, math.inf: 5400}
        ),
        canary=ArmCounts(
            requests=600, errors=7, latency_buckets={0.05: 330, 0.1: 520, math.inf: 600}
        ),
    )


def test_public_names() -> None:
    """Everything the design names is importable from `analysis` and listed in __all__."""
    for name in (
        "Analyzer",
        "AnalysisConfig",
        "Snapshot",
        "ArmCounts",
        "Decision",
        "Verdict",
        "MetricResult",
        "plan",
        "Plan",
        "MetricPlan",
    ):
        assert name in analysis.__all__
        assert hasattr(analysis, name)


def test_documented_example() -> None:
    """The DESIGN.md example gives a decision, a reason per metric and per-metric numbers."""
    v = Analyzer(AnalysisConfig()).observe(_example())
    assert v.decision in ("continue", "pass", "fail")
    assert v.decision == Decision.CONTINUE  # one look, 7 canary errors: not enough either way
    assert set(v.metrics) == {"errors", "latency_p50", "latency_p99"}
    for name in v.metrics:
        assert sum(r.startswith(f"{name}:") for r in v.reasons) == 1
    err = v.metrics["errors"]
    assert err.samples_canary == 600 and err.events_primary == 54
    assert err.estimate == pytest.approx((7 / 600) / (54 / 5400))
    assert err.lower is not None and err.upper is not None and err.lower < 1.17 < err.upper
    assert "canary 1.17% vs primary 1%" in v.metrics["errors"].reason


def test_alpha_is_split_over_critical_metrics() -> None:
    """The critical metrics' alphas sum to the analysis alpha; non-critical keep the full alpha."""
    cfg = AnalysisConfig(alpha=0.02)
    alphas = cfg.metric_alphas()
    assert sum(alphas.values()) == pytest.approx(0.02)
    cfg2 = AnalysisConfig(latency=MetricConfig(critical=False))
    alphas2 = cfg2.metric_alphas()
    assert alphas2["errors"] == pytest.approx(0.01)
    assert alphas2["latency_p99"] == pytest.approx(0.01)


def test_verdict_round_trips_through_json_after_a_crash() -> None:
    """Overwhelming evidence (a crash) still serialises: no Infinity in the JSON record."""
    an = Analyzer()
    v = an.observe(
        Snapshot(
            elapsed_s=1,
            primary=ArmCounts(requests=100, errors=0),
            canary=ArmCounts(requests=0, errors=0),
        )
    )
    v = an.observe(
        Snapshot(
            elapsed_s=2,
            primary=ArmCounts(requests=10000, errors=0),
            canary=ArmCounts(requests=5000, errors=5000),
        )
    )
    assert v.decision == Decision.FAIL
    again = Verdict.model_validate_json(v.model_dump_json())
    assert again.metrics["errors"].e_value_fail == v.metrics["errors"].e_value_fail


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 0.7}, "alpha"),
        ({"pass_alpha": -1}, "pass_alpha"),
        ({"min_samples": 0}, "min_samples"),
        ({"quantiles": [0.5, 1.5]}, "quantiles"),
        ({"quantiles": [0.5, 0.5]}, "quantiles"),
        ({"quantiles": ["p99"]}, "quantiles"),
        ({"errors": {"tolerance": -0.1}}, "tolerance"),
        ({"errors": {"tolerance": 0.2, "fail_ratio": 1.5}}, "fail_ratio"),
        ({"latency_overrides": {"latency_p95": {}}}, "latency_overrides"),
        ({"alhpa": 0.01}, "alhpa"),
        ({"errors": {"critical": False}, "latency": {"critical": False}}, "critical"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    """Each invalid setting raises a ValueError whose message names the setting."""
    with pytest.raises(ValueError, match=field):
        AnalysisConfig.model_validate(kwargs)


def test_config_is_frozen() -> None:
    """Settings cannot change under a running analysis."""
    cfg = AnalysisConfig()
    with pytest.raises(ValidationError):
        cfg.alpha = 0.5


@pytest.mark.parametrize(
    ("arm", "field"),
    [
        ({"requests": -1}, "requests"),
        ({"requests": 10, "errors": 11}, "errors"),
        ({"requests": math.nan}, "requests"),
        ({"requests": 10, "errors": math.inf}, "errors"),
        ({"requests": 10, "latency_buckets": {0.1: math.nan}}, "latency_buckets"),
        ({"requests": 10, "latency_buckets": {0.1: -2}}, "latency_buckets"),
        ({"requests": 10, "latency_buckets": {-0.1: 2}}, "latency_buckets"),
        ({"requests": 10, "latency_buckets": {0.1: 5, 0.2: 3}}, "not cumulative"),
        ({"requests": "10"}, "requests"),
    ],
)
def test_bad_counts_name_the_field(arm: dict[str, object], field: str) -> None:
    """Bad counts raise a ValueError that names what is wrong."""
    with pytest.raises(ValueError, match=field):
        ArmCounts.model_validate(arm)


def test_bad_elapsed() -> None:
    """A NaN or negative elapsed_s is refused by name."""
    arm = ArmCounts(requests=1)
    for bad in (math.nan, -1.0):
        with pytest.raises(ValueError, match="elapsed_s"):
            Snapshot(elapsed_s=bad, primary=arm, canary=arm)


def test_inf_bucket_may_differ_from_requests() -> None:
    """+Inf != requests (scrapes at different instants) is accepted; the histogram's own total is used."""
    an = Analyzer(AnalysisConfig(quantiles=(0.5,)))
    for t in range(1, 4):
        snap = Snapshot(
            elapsed_s=t,
            primary=ArmCounts(
                requests=1000 * t + 7, latency_buckets={0.1: 500 * t, math.inf: 1000 * t}
            ),
            canary=ArmCounts(
                requests=100 * t - 3, latency_buckets={0.1: 50 * t, math.inf: 100 * t}
            ),
        )
        v = an.observe(snap)
    m = v.metrics["latency_p50"]
    assert m.samples_canary == 200 and m.samples_primary == 2000  # two increments of +Inf
    assert m.events_canary == 100 and m.events_primary == 1000


def test_verdicts_built_without_validation_equal_model_construct() -> None:
    """observe()'s fast construction (types.trusted) leaves what model_construct would: the
    same fields, fields-set, extra and private state, the same JSON; a verdict validates."""
    from analysis.types import MetricResult, trusted

    an = Analyzer()
    an.observe(_example())
    later = _example().model_copy(update={"elapsed_s": 60.0})
    v = an.observe(later)
    for built in (v, *v.metrics.values()):
        cls = type(built)
        values = {name: getattr(built, name) for name in cls.model_fields}
        reference = cls.model_construct(**values)
        assert list(built.__dict__) == list(reference.__dict__) == list(cls.model_fields)
        assert built.__dict__ == reference.__dict__
        assert built.model_fields_set == reference.model_fields_set
        assert built.__pydantic_extra__ is None and built.__pydantic_private__ is None
        assert built == reference and built.model_dump_json() == reference.model_dump_json()
    assert Verdict.model_validate_json(v.model_dump_json()) == v
    with pytest.raises(ValidationError):  # still frozen
        v.metrics["errors"].reason = "x"  # type: ignore[misc]
    assert trusted(MetricResult, dict(v.metrics["errors"].__dict__)) == v.metrics["errors"]
