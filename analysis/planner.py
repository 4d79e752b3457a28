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

Spread. A mean says little about "will it pass within my step?". Per second, the log e-value
of the mixture's leading term moves by a compound-Poisson increment with drift lambda*mu and
variance lambda*(sigma^2 + mu^2) (lambda events/s, mu and sigma^2 the per-event mean and
variance of the log-likelihood ratio); its first passage over the level is then
inverse-Gaussian, and `likely_pass_s` is that law's quantile (95% by default). The absolute
route is a plug-in of expected counts and has no spread here.

Three entry points, all pure:

* `plan(...)`: from what the user says about the service before the rollout starts;
* `plan_from_counts(snapshot)`: the same estimate from the rates observed so far (traffic,
  split, the primary's error rate, the share of slow requests above each latency threshold
  the engine would freeze), to be called once there is traffic, so the estimate stops
  depending on guesses;
* `pass_advice(...)`: how long a good canary needs to pass at this traffic, whether that fits
  a step's budget, and how much generated load (on the canary, or at the entry point) would
  make it fit.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from analysis.config import AnalysisConfig
from analysis.counts import fail_points, pass_points, rate_lower, rate_upper
from analysis.invgauss import invgauss_ppf
from analysis.latency import arm_total, shared_bounds
from analysis.types import Snapshot

__all__ = ["MetricPlan", "PassAdvice", "Plan", "pass_advice", "plan", "plan_from_counts"]


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
    likely_pass_s: float | None = None  # the `likely` quantile of the time to pass


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
    likely_pass_s: float | None = None  # the slowest metric's `likely` quantile
    likely: float = 0.95  # the quantile likely_pass_s is
    base_error_rate: float = 0.0  # what the estimate assumed (observed, for plan_from_counts)
    slow_rates: dict[str, float] = Field(default_factory=dict)


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


def _leading_term(
    *, truth: float, null: float, points: list[tuple[float, float]], level: float, rho: float
) -> tuple[float, float, float] | None:
    """(events to the level, per-event drift, per-event variance) of the fastest prior point."""
    q_true, q_null = _q(truth, rho), _q(null, rho)
    best: tuple[float, float, float] | None = None
    for theta_j, w in points:
        q_j = _q(theta_j, rho)
        drift = _kl(q_true, q_null) - _kl(q_true, q_j)
        if drift <= 0:
            continue
        n = (math.log(1.0 / level) + math.log(1.0 / w)) / drift
        jump = math.log(q_j / q_null) - math.log((1.0 - q_j) / (1.0 - q_null))
        var = q_true * (1.0 - q_true) * jump * jump
        if best is None or n < best[0]:
            best = (n, drift, var)
    return best


def _mixture_events(
    *, truth: float, null: float, points: list[tuple[float, float]], level: float, rho: float
) -> float | None:
    best = _leading_term(truth=truth, null=null, points=points, level=level, rho=rho)
    return None if best is None else best[0]


def _passage_quantile(
    *, events: float, drift: float, var: float, events_per_s: float, likely: float
) -> float:
    """Seconds until a compound-Poisson walk with this per-event law first crosses its level.

    Level a = events * drift. Per second: mean lambda*mu, variance lambda*(sigma^2 + mu^2);
    the first passage of the matching Brownian motion is IG(a/m, a^2/v), whose quantile this is.
    """
    level = events * drift
    m = events_per_s * drift
    v = events_per_s * (var + drift * drift)
    mean = level / m
    shape = level * level / v
    return invgauss_ppf(likely, mean, shape)


# The times _abs_pass_s tries: 1 s growing by 5% up to a week (273 of them).
_ABS_GRID: tuple[float, ...] = tuple(
    itertools.takewhile(
        lambda t: t <= 7 * 86400,
        itertools.accumulate(itertools.repeat(1.05), operator.mul, initial=1.0),
    )
)


def _abs_pass_s(
    *, p: float, canary_rps: float, primary_rps: float, abs_tol: float, alpha: float
) -> float | None:
    """The first time on _ABS_GRID at which the absolute bound on canary - primary is below
    `abs_tol` with both arms at rate p. More samples only narrow the bounds, so the grid is
    bisected (9 looks instead of up to 273: this ran for every metric of every estimate, and
    with 1,000 rollouts the planner was a third of the controller's time; issue 13)."""
    if abs_tol <= 0:
        return None

    def fits(t: float) -> bool:
        n_c, n_p = canary_rps * t, primary_rps * t
        c_hi = rate_upper(p * n_c, n_c, alpha / 4)
        p_lo = rate_lower(p * n_p, n_p, alpha / 4)
        return c_hi - p_lo < abs_tol

    lo, hi = -1, len(_ABS_GRID) - 1  # fits(grid[lo]) is false (or lo is -1), then bisect
    if not fits(_ABS_GRID[hi]):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(_ABS_GRID[mid]):
            hi = mid
        else:
            lo = mid
    return _ABS_GRID[hi]


def plan(
    *,
    rate_rps: float,
    canary_weight: float,
    baseline_error_rate: float,
    error_ratio: float = 2.0,
    slow_ratio: float = 2.0,
    slow_rates: Mapping[str, float] | None = None,
    config: AnalysisConfig | None = None,
    likely: float = 0.95,
) -> Plan:
    """Expected time to detect `error_ratio` x the baseline error rate, and to pass in A/A.

    `canary_weight` is the canary's share of `rate_rps` in (0, 1); `slow_ratio` is the
    regression assumed for each latency metric's slow events. `slow_rates` maps latency metric
    names to the primary's share of requests above that metric's threshold (by default
    1 - quantile; once a threshold is frozen, MetricResult.extra["rate_primary"] is the real one).
    `likely` is the quantile reported as `likely_pass_s`.
    """
    cfg = config or AnalysisConfig()
    for field, value, ok in (
        ("rate_rps", rate_rps, rate_rps > 0),
        ("canary_weight", canary_weight, 0 < canary_weight < 1),
        ("baseline_error_rate", baseline_error_rate, 0 <= baseline_error_rate < 1),
        ("error_ratio", error_ratio, error_ratio > 0),
        ("slow_ratio", slow_ratio, slow_ratio > 0),
        ("likely", likely, 0 < likely < 1),
    ):
        if not math.isfinite(value) or not ok:
            raise ValueError(f"{field}: {value!r} is out of range")
    canary_rps = rate_rps * canary_weight
    return _plan_rates(
        canary_rps=canary_rps,
        primary_rps=rate_rps - canary_rps,
        baseline_error_rate=baseline_error_rate,
        error_ratio=error_ratio,
        slow_ratio=slow_ratio,
        slow_rates=slow_rates,
        cfg=cfg,
        likely=likely,
    )


def _plan_rates(
    *,
    canary_rps: float,
    primary_rps: float,
    baseline_error_rate: float,
    error_ratio: float,
    slow_ratio: float,
    slow_rates: Mapping[str, float] | None,
    cfg: AnalysisConfig,
    likely: float,
) -> Plan:
    rho = canary_rps / primary_rps
    alphas = cfg.metric_alphas()
    settings = dict(cfg.metric_configs())
    min_samples_s = cfg.min_samples / min(canary_rps, primary_rps)
    metric_plans: list[MetricPlan] = []
    quantiles = dict(zip(cfg.latency_metric_names(), cfg.quantiles, strict=True))
    used_slow: dict[str, float] = {}
    for name, m in settings.items():
        if name == "errors":
            p, ratio, wait_s = baseline_error_rate, error_ratio, 0.0
        else:
            q = quantiles[name]
            p = (slow_rates or {}).get(name, 1.0 - q)
            if not (math.isfinite(p) and 0.0 < p < 1.0):
                raise ValueError(f"slow_rates[{name!r}]: {p!r} is not in (0, 1)")
            used_slow[name] = p
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
        likely_s: float | None = None
        route = "none"
        if p > 0:
            lead = _leading_term(
                truth=1.0, null=pass_theta, points=passes, level=cfg.pass_alpha / 2, rho=rho
            )
            if lead is not None:
                aa_events_per_s = p * (canary_rps + primary_rps)
                pass_s, route = lead[0] / aa_events_per_s, "ratio"
                likely_s = _passage_quantile(
                    events=lead[0],
                    drift=lead[1],
                    var=lead[2],
                    events_per_s=aa_events_per_s,
                    likely=likely,
                )
        abs_s = _abs_pass_s(
            p=p,
            canary_rps=canary_rps,
            primary_rps=primary_rps,
            abs_tol=m.abs_tolerance,
            alpha=cfg.pass_alpha,
        )
        if abs_s is not None and (pass_s is None or abs_s < pass_s):
            pass_s, route = abs_s, "absolute"
        if abs_s is not None and (likely_s is None or abs_s < likely_s):
            likely_s = abs_s
        if pass_s is not None:
            pass_s = max(pass_s + wait_s, min_samples_s)
        if likely_s is not None:
            likely_s = max(likely_s + wait_s, min_samples_s)
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
                likely_pass_s=likely_s,
            )
        )
    errors = metric_plans[0]
    expected_pass = _slowest([mp.expected_pass_s for mp in metric_plans])
    return Plan(
        canary_rps=canary_rps,
        primary_rps=primary_rps,
        expected_fail_s=errors.expected_fail_s,
        expected_fail_canary_requests=errors.expected_fail_canary_requests,
        expected_pass_s=expected_pass,
        expected_pass_canary_requests=None if expected_pass is None else expected_pass * canary_rps,
        metrics=metric_plans,
        likely_pass_s=_slowest([mp.likely_pass_s for mp in metric_plans]),
        likely=likely,
        base_error_rate=baseline_error_rate,
        slow_rates=used_slow,
    )


def _slowest(times: list[float | None]) -> float | None:
    """The analysis passes when its slowest metric does; None if any metric cannot pass."""
    if any(t is None for t in times):
        return None
    return max(t for t in times if t is not None)


def observed_slow_rates(snapshot: Snapshot, config: AnalysisConfig) -> dict[str, float]:
    """The primary's share above each latency threshold the engine would freeze now.

    The same rule as latency.LatencyTest: the smallest bucket bound both arms report where
    the primary's cumulative share reaches the quantile, once the primary has
    threshold_min_tail / (1 - q) requests. Metrics without such a bound are left out.
    """
    primary, canary = snapshot.primary, snapshot.canary
    out: dict[str, float] = {}
    bounds = shared_bounds(primary, canary)
    total = arm_total(primary)
    for q, name in zip(config.quantiles, config.latency_metric_names(), strict=True):
        if not bounds or total < config.threshold_min_tail / (1.0 - q):
            continue
        for b in bounds:
            below = primary.latency_buckets[b]
            if below >= q * total:
                # A share of 0 would make the metric unplannable; half an event instead.
                out[name] = min(max(total - below, 0.5) / total, 1.0 - 1e-9)
                break
    return out


def plan_from_counts(
    snapshot: Snapshot,
    *,
    config: AnalysisConfig | None = None,
    error_ratio: float = 2.0,
    slow_ratio: float = 2.0,
    likely: float = 0.95,
) -> Plan:
    """The estimate again, from the rates observed so far instead of assumed ones.

    `snapshot` is what the Analyzer was given (cumulative counts since the analysis began):
    the traffic of each arm per second, the primary's error rate (Krichevsky-Trofimov,
    (errors + 1/2) / (requests + 1), so that a few clean seconds do not say "0%") and the
    share above each latency threshold replace the guesses. Metrics without an observed rate
    yet keep plan()'s default. The times are from the start of the analysis, like plan()'s.
    Raises ValueError while an arm has served nothing (there is no rate to plan from).
    """
    cfg = config or AnalysisConfig()
    t = snapshot.elapsed_s
    p, c = snapshot.primary, snapshot.canary
    if t <= 0 or p.requests <= 0 or c.requests <= 0:
        raise ValueError(
            "plan_from_counts: no traffic observed on both arms yet "
            f"(elapsed {t:g} s, primary {p.requests:g}, canary {c.requests:g} requests)"
        )
    base = (p.errors + 0.5) / (p.requests + 1.0)
    return _plan_rates(
        canary_rps=c.requests / t,
        primary_rps=p.requests / t,
        baseline_error_rate=min(base, 1.0 - 1e-9),
        error_ratio=error_ratio,
        slow_ratio=slow_ratio,
        slow_rates=observed_slow_rates(snapshot, cfg),
        cfg=cfg,
        likely=likely,
    )


class PassAdvice(BaseModel):
    """Will a good canary pass within `budget_s` at this traffic, and what would help."""

    model_config = ConfigDict(frozen=True)

    canary_rps: float
    primary_rps: float
    budget_s: float
    likely: float  # the quantile likely_pass_s is (0.95: 19 good canaries in 20 pass by then)
    expected_pass_s: float | None  # mean; None: cannot pass at all at this traffic
    likely_pass_s: float | None
    fits: bool  # likely_pass_s <= budget_s
    limiting_metric: str | None  # the metric that passes last
    # Generated load that makes likely_pass_s fit the budget: requests/s sent to the canary
    # alone (a load tester on the canary service), or at the entry point (split like real
    # traffic). 0 when it already fits; None when no amount up to 100x the traffic does.
    extra_canary_rps: float | None
    extra_entry_rps: float | None
    message: str


def _extra_needed(fits: Callable[[float], bool], ceiling: float) -> float | None:
    """Smallest extra load x in (0, ceiling] with fits(x), to 2% (more load never slows a
    pass down in this model, so bisection finds it); None if even the ceiling does not fit."""
    if not fits(ceiling):
        return None
    lo, hi = 0.0, ceiling
    while hi - lo > 0.02 * hi:
        mid = (lo + hi) / 2.0
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def pass_advice(
    *,
    rate_rps: float,
    canary_weight: float,
    baseline_error_rate: float,
    budget_s: float = 900.0,
    slow_rates: Mapping[str, float] | None = None,
    config: AnalysisConfig | None = None,
    likely: float = 0.95,
) -> PassAdvice:
    """How long a good canary needs to pass here, and the generated load that would fit it.

    Call it at the start of a rollout (with the service's traffic and error rate, or with the
    rates from plan_from_counts once observed) to tell the user up front when a step of
    `budget_s` seconds is too short to show a good canary safe: the step would then end in a
    rollback by its deadline, not by evidence. Generated load is assumed to behave like real
    traffic (same error and latency rates).
    """
    base = plan(
        rate_rps=rate_rps,
        canary_weight=canary_weight,
        baseline_error_rate=baseline_error_rate,
        slow_rates=slow_rates,
        config=config,
        likely=likely,
    )
    if not (math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s: {budget_s!r} is out of range")
    cfg = config or AnalysisConfig()

    def fits_with(extra_canary: float, extra_primary: float) -> bool:
        t = _plan_rates(
            canary_rps=base.canary_rps + extra_canary,
            primary_rps=base.primary_rps + extra_primary,
            baseline_error_rate=baseline_error_rate,
            error_ratio=2.0,
            slow_ratio=2.0,
            slow_rates=base.slow_rates,
            cfg=cfg,
            likely=likely,
        ).likely_pass_s
        return t is not None and t <= budget_s

    never_passing = [m for m in base.metrics if m.likely_pass_s is None]
    limiting = never_passing or sorted(base.metrics, key=lambda m: m.likely_pass_s or 0.0)[-1:]
    limiting_metric = limiting[0].name if limiting else None
    fits = base.likely_pass_s is not None and base.likely_pass_s <= budget_s
    extra_c: float | None = 0.0
    extra_e: float | None = 0.0
    if not fits:
        ceiling = 100.0 * rate_rps
        extra_c = _extra_needed(lambda x: fits_with(x, 0.0), ceiling)
        extra_e = _extra_needed(
            lambda x: fits_with(x * canary_weight, x * (1.0 - canary_weight)), ceiling
        )
    pct = f"{100 * likely:.0f}%"
    if fits:
        message = (
            f"a good canary passes within {_duration(base.likely_pass_s)} in {pct} of rollouts "
            f"(mean {_duration(base.expected_pass_s)}) at {base.canary_rps:.3g} canary req/s: "
            f"fits the {_duration(budget_s)} step"
        )
    else:
        helps = []
        if extra_c is not None:
            helps.append(f"{extra_c:.3g} req/s of generated load on the canary")
        if extra_e is not None:
            helps.append(f"{extra_e:.3g} req/s more at the entry point")
        needs = (
            "may never pass"
            if base.likely_pass_s is None
            else f"needs {_duration(base.likely_pass_s)} to pass in {pct} of rollouts"
        )
        message = (
            f"at {base.canary_rps:.3g} canary req/s a good canary {needs} (mean "
            f"{_duration(base.expected_pass_s)}; slowest metric {limiting_metric}): longer than the "
            f"{_duration(budget_s)} step, which would then roll back a good canary. "
            + (
                "To fit: " + " or ".join(helps) + "."
                if helps
                else "No generated load up to 100x the traffic makes it fit: lengthen the step."
            )
        )
    return PassAdvice(
        canary_rps=base.canary_rps,
        primary_rps=base.primary_rps,
        budget_s=budget_s,
        likely=likely,
        expected_pass_s=base.expected_pass_s,
        likely_pass_s=base.likely_pass_s,
        fits=fits,
        limiting_metric=limiting_metric,
        extra_canary_rps=extra_c,
        extra_entry_rps=extra_e,
        message=message,
    )
