"""From per-metric evidence to one decision, with a readable line per metric. Pure functions.

The rules, in order:

* **fail** as soon as any *critical* metric's fail e-process reaches 1/alpha_metric (the
  alphas of the critical metrics sum to the analysis' alpha, so a false rollback has
  probability <= alpha overall);
* **pass** only when *every* metric has positive evidence of being within tolerance and both
  arms have at least `min_samples` of that metric's samples;
* otherwise **continue**. No data, too little data, or a NaN anywhere is never a pass: the
  checks are written so that a NaN compares false and falls through to "continue".

A non-critical metric never rolls back, but it still has to pass for the analysis to pass:
"not critical" means "do not act on it alone", not "ignore it". If it fails, the rollout
waits (for a human, or its deadline) rather than promoting over the evidence.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Protocol

from analysis.types import Decision, MetricResult

__all__ = ["MetricLike", "combine", "decide_metric", "reason_line", "reasons"]


def decide_metric(
    *,
    has_data: bool,
    e_fail: float,
    alpha: float,
    pass_reached: bool,
    samples_primary: float,
    samples_canary: float,
    min_samples: float,
) -> Decision:
    """One metric's decision from its evidence."""
    if not has_data:
        return Decision.CONTINUE
    if e_fail >= 1.0 / alpha:  # NaN >= x is False
        return Decision.FAIL
    enough = samples_primary >= min_samples and samples_canary >= min_samples
    if pass_reached and enough:
        return Decision.PASS
    return Decision.CONTINUE


def combine(metrics: Mapping[str, MetricResult]) -> Decision:
    """The analysis' decision: any critical fail fails; all passing passes; else continue."""
    if any(m.critical and m.decision is Decision.FAIL for m in metrics.values()):
        return Decision.FAIL
    if metrics and all(m.decision is Decision.PASS for m in metrics.values()):
        return Decision.PASS
    return Decision.CONTINUE


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3g}%"


def _e(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.1e}"


class MetricLike(Protocol):
    """The fields of MetricResult that reason_line reads."""

    name: str
    decision: Decision
    critical: bool
    test: str
    estimate: float | None
    lower: float | None
    upper: float | None
    tolerance: float
    alpha: float
    fail_ratio: float
    abs_tolerance: float
    e_value_fail: float
    e_value_pass: float
    samples_primary: float
    samples_canary: float
    events_primary: float
    events_canary: float
    threshold_s: float | None
    extra: dict[str, float]


@functools.lru_cache(maxsize=256)
def _fixed_parts(
    name: str,
    threshold_s: float | None,
    alpha: float,
    fail_ratio: float,
    tolerance: float,
    abs_tolerance: float,
    test: str,
) -> tuple[str, str, str, float, str]:
    """The parts of a metric's line that stay the same from one look to the next (formatted
    once per metric, not on every observe)."""
    what = "error rate" if threshold_s is None else f"share slower than {threshold_s:g} s"
    abs_part = f" or excess < {_pct(abs_tolerance)}" if abs_tolerance > 0 else ""
    level = 1.0 / alpha
    return (
        f"{name}: {what}: canary ",
        f"one-sided {100 * (1 - alpha):.4g}% bounds [",
        f"fail above {fail_ratio:g}, pass below {1 + tolerance:g}{abs_part}) — {test}: e_fail=",
        level,
        _e(level),
    )


def reason_line(m: MetricLike) -> str:
    """One line: what was compared, the estimate, the bound, the test, the decision."""
    head, bounds, rule, level, level_text = _fixed_parts(
        m.name, m.threshold_s, m.alpha, m.fail_ratio, m.tolerance, m.abs_tolerance, m.test
    )
    extra = m.extra
    excess = extra.get("abs_excess_upper")
    excess_part = "" if excess is None else f", excess bound {_pct(excess)}"
    tag = m.decision.value.upper() + ("" if m.critical else " (not critical)")
    return (
        f"{head}{_pct(extra.get('rate_canary'))} vs primary "
        f"{_pct(extra.get('rate_primary'))} (ratio {_num(m.estimate)}, "
        f"{bounds}{_num(m.lower)}, {_num(m.upper)}]; "
        f"{rule}{_e(m.e_value_fail)} {'>=' if m.e_value_fail >= level else '<'} "
        f"{level_text}, e_pass={_e(m.e_value_pass)}{excess_part}; samples canary "
        f"{m.samples_canary:.0f} / primary {m.samples_primary:.0f}, events "
        f"{m.events_canary:.0f} / {m.events_primary:.0f}: {tag}"
    )


def reasons(metrics: Mapping[str, MetricResult], notes: Sequence[str]) -> list[str]:
    """The verdict's reasons: each metric's line, then the notes of this observation."""
    return [m.reason for m in metrics.values()] + [f"note: {n}" for n in notes]
