"""How long will the analysis take? Wald-style estimates of *this* engine's tests. Pure.

Reports show the estimate next to what happened, and step durations can be chosen from it:
a step shorter than the time to detect a doubling of errors at that weight is a step that
cannot protect anyone.

Fail. Under a regression theta (canary rate / primary rate), each event's log-likelihood ratio
of a prior point theta_j against the null fail_theta drifts by
KL(q_theta || q_null) - KL(q_theta || q_j) per event (q as in counts.py). The mixture reaches
log(1/alpha) when its best term does, so the expected number of events is
min_j (log(1/alpha) + log(1/w_j)) / drift_j: Wald's approximation without overshoot, applied to
the mixture that the engine actually runs. Events arrive at canary_rps*p*theta + primary_rps*p.

Pass (nothing wrong, theta = 1). The ratio route is the mirror image at level pass_alpha/2. The
absolute route is computed by plugging the expected counts into the same rate bounds the
engine uses (counts.rate_bounds) over a grid of times. The earlier route wins; a pass also waits
for min_samples on both arms, and latency metrics first wait for their threshold to freeze.
The analysis passes when its slowest metric does.

Latency metrics are planned with a slow-event base rate of 1 - quantile unless the caller
knows better (`slow_rates`): the threshold bucket usually leaves fewer requests above it, which
changes the estimates for high quantiles a lot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from analysis.config import AnalysisConfig
from analysis.counts import fail_points, pass_points, rate_bounds

__all__ = ["MetricPlan", "Plan", "plan"]


class MetricPlan(BaseModel):
    """One metric's expected times; None when the regression is out of the test's reach."""

    model_config = ConfigDict(frozen=True)

    name: str
    base_rate: float  # events per request on the primary
    regression: float  # canary rate / primary rate assumed for the fail estimate
    events_per_s: float  # under the regression
    expected_fail_events: float | None
    expected_fail_s: float | None
    expected_fail_canary_requests: float | None
    expected_pass_s: float | None
    pass_route: str  # "ratio", "absolute", or "none"


class Plan(BaseModel):
    """Expected seconds (and canary requests) to a rollback and to a pass."""

    model_config = ConfigDict(frozen=True)

    canary_rps: float
    primary_rps: float
    expected_fail_s: float | None  # the error regression
    expected_fail_canary_requests: float | None
    expected_pass_s: float | None  # A/A: every metric within tolerance
    expected_pass_canary_requests: float | None
    metrics: list[MetricPlan] = Field(default_factory=list)


def _q(theta: float, rho: float) -> float:
    return rho * theta / (1.0 + rho * theta)


def _kl(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b))."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def _mixture_events(
    *, truth: float, null: float, points: list[tuple[float, float]], level: float, rho: float
) -> float | None:
    q_true, q_null = _q(truth, rho), _q(null, rho)
    best: float | None = None
    for theta_j, w in points:
        drift = _kl(q_true, q_null) - _kl(q_true, _q(theta_j, rho))
        if drift <= 0:
            continue
        n = (math.log(1.0 / level) + math.log(1.0 / w)) / drift
        best = n if best is None else min(best, n)
    return best


def _abs_pass_s(
    *, p: float, canary_rps: float, primary_rps: float, abs_tol: float, alpha: float
) -> float | None:
    if abs_tol <= 0:
        return None
    t = 1.0
    while t <= 7 * 86400:
        n_c, n_p = canary_rps * t, primary_rps * t
        _, c_hi = rate_bounds(p * n_c, n_c, alpha / 4)
        p_lo, _ = rate_bounds(p * n_p, n_p, alpha / 4)
        if c_hi - p_lo < abs_tol:
            return t
        t *= 1.05
    return None


def plan(
    *,
    rate_rps: float,
    canary_weight: float,
    baseline_error_rate: float,
    error_ratio: float = 2.0,
    slow_ratio: float = 2.0,
    slow_rates: Mapping[str, float] | None = None,
    config: AnalysisConfig | None = None,
) -> Plan:
    """Expected time to detect `error_ratio` x the baseline error rate, and to pass in A/A.

    `canary_weight` is the canary's share of `rate_rps` in (0, 1); `slow_ratio` is the
    regression assumed for each latency metric's slow events. `slow_rates` maps latency metric
    names to the primary's share of requests above that metric's threshold (by default
    1 - quantile; once a threshold is frozen, MetricResult.extra["rate_primary"] is the real one).
    """
    cfg = config or AnalysisConfig()
    for field, value, ok in (
        ("rate_rps", rate_rps, rate_rps > 0),
        ("canary_weight", canary_weight, 0 < canary_weight < 1),
        ("baseline_error_rate", baseline_error_rate, 0 <= baseline_error_rate < 1),
        ("error_ratio", error_ratio, error_ratio > 0),
        ("slow_ratio", slow_ratio, slow_ratio > 0),
    ):
        if not math.isfinite(value) or not ok:
            raise ValueError(f"{field}: {value!r} is out of range")
    canary_rps = rate_rps * canary_weight
    primary_rps = rate_rps - canary_rps
    rho = canary_rps / primary_rps
    alphas = cfg.metric_alphas()
    settings = dict(cfg.metric_configs())
    min_samples_s = cfg.min_samples / min(canary_rps, primary_rps)
    metric_plans: list[MetricPlan] = []
    quantiles = dict(zip(cfg.latency_metric_names(), cfg.quantiles, strict=True))
    for name, m in settings.items():
        if name == "errors":
            p, ratio, wait_s = baseline_error_rate, error_ratio, 0.0
        else:
            q = quantiles[name]
            p = (slow_rates or {}).get(name, 1.0 - q)
            if not (math.isfinite(p) and 0.0 < p < 1.0):
                raise ValueError(f"slow_rates[{name!r}]: {p!r} is not in (0, 1)")
            ratio = slow_ratio
            wait_s = cfg.threshold_min_tail / (1.0 - q) / primary_rps
        pass_theta = 1.0 + m.tolerance
        fails, passes = fail_points(m.fail_ratio), pass_points(pass_theta)
        events_per_s = p * (canary_rps * min(ratio, 1.0 / max(p, 1e-12)) + primary_rps)
        fail_events = None
        if p > 0 and ratio * p <= 1.0:
            fail_events = _mixture_events(
                truth=ratio, null=m.fail_ratio, points=fails, level=alphas[name], rho=rho
            )
        fail_s = None if fail_events is None else wait_s + fail_events / events_per_s
        pass_s: float | None = None
        route = "none"
        if p > 0:
            ev = _mixture_events(
                truth=1.0, null=pass_theta, points=passes, level=cfg.pass_alpha / 2, rho=rho
            )
            if ev is not None:
                pass_s, route = ev / (p * (canary_rps + primary_rps)), "ratio"
        abs_s = _abs_pass_s(
            p=p, canary_rps=canary_rps, primary_rps=primary_rps, abs_tol=m.abs_tolerance,
            alpha=cfg.pass_alpha,
        )
        if abs_s is not None and (pass_s is None or abs_s < pass_s):
            pass_s, route = abs_s, "absolute"
        if pass_s is not None:
            pass_s = max(pass_s + wait_s, min_samples_s)
        metric_plans.append(
            MetricPlan(
                name=name,
                base_rate=p,
                regression=ratio,
                events_per_s=events_per_s,
                expected_fail_events=fail_events,
                expected_fail_s=fail_s,
                expected_fail_canary_requests=None if fail_s is None else fail_s * canary_rps,
                expected_pass_s=pass_s,
                pass_route=route,
            )
        )
    errors = metric_plans[0]
    pass_times = [mp.expected_pass_s for mp in metric_plans]
    expected_pass = None if any(t is None for t in pass_times) else max(
        t for t in pass_times if t is not None
    )
    return Plan(
        canary_rps=canary_rps,
        primary_rps=primary_rps,
        expected_fail_s=errors.expected_fail_s,
        expected_fail_canary_requests=errors.expected_fail_canary_requests,
        expected_pass_s=expected_pass,
        expected_pass_canary_requests=None if expected_pass is None else expected_pass * canary_rps,
        metrics=metric_plans,
    )
