"""The Analyzer: snapshots in, verdicts out. Holds the per-metric tests; never does I/O.

One `observe` per look, at any cadence. Each metric is a conditional count test
(counts.py): errors directly, latency through slow events over a frozen bucket threshold
(latency.py). The judge (judge.py) combines them. Counters that go backwards are reported in
the verdict's notes and reasons; the interval they span is skipped by every metric.
"""

from __future__ import annotations

import math
from typing import Any

from analysis.config import AnalysisConfig, MetricConfig
from analysis.counts import CountState, CountTest
from analysis.judge import combine, decide_metric, reason_line, reasons
from analysis.latency import LatencyTest
from analysis.types import ArmCounts, Decision, MetricResult, Snapshot, Verdict, trusted

__all__ = ["Analyzer"]

_ERRORS_TEST = "conditional binomial mixture SPRT on error events"
_LATENCY_TEST = "conditional binomial mixture SPRT on slow requests"
_E_MAX = 1e300  # e-values are capped so that records stay valid JSON (no Infinity)


def _backwards(name: str, prev: ArmCounts, cur: ArmCounts) -> list[str]:
    out = []
    if cur.requests < prev.requests:
        out.append(f"{name} requests {prev.requests:g} -> {cur.requests:g}")
    if cur.errors < prev.errors:
        out.append(f"{name} errors {prev.errors:g} -> {cur.errors:g}")
    for le, count in cur.latency_buckets.items():
        before = prev.latency_buckets.get(le)
        if before is not None and count < before:
            out.append(f"{name} bucket le={le:g} {before:g} -> {count:g}")
            break
    return out


class Analyzer:
    """Compares canary with primary, one cumulative Snapshot at a time."""

    def __init__(self, config: AnalysisConfig | None = None) -> None:
        self.config = config or AnalysisConfig()
        cfg = self.config
        self._alphas = cfg.metric_alphas()
        self._settings: dict[str, MetricConfig] = dict(cfg.metric_configs())
        self._errors = self._count_test("errors")
        self._errors.update(0.0, 0.0, 0.0, 0.0)  # counts are cumulative from the start
        self._latency: dict[str, LatencyTest] = {}
        for q, name in zip(cfg.quantiles, cfg.latency_metric_names(), strict=True):
            self._latency[name] = LatencyTest(
                quantile=q, count=self._count_test(name), min_tail=cfg.threshold_min_tail
            )
        self._passed: set[str] = set()
        self._failed: set[str] = set()
        self._skipped = 0
        self._last: Snapshot | None = None

    def _count_test(self, name: str) -> CountTest:
        m = self._settings[name]
        return CountTest(
            alpha=self._alphas[name],
            pass_alpha=self.config.pass_alpha,
            fail_theta=m.fail_ratio,
            pass_theta=1.0 + m.tolerance,
            abs_tolerance=m.abs_tolerance,
        )

    def observe(self, snapshot: Snapshot) -> Verdict:
        """Consume one cumulative snapshot and judge all the evidence so far."""
        notes: list[str] = []
        last = self._last
        if last is not None:
            back = _backwards("primary", last.primary, snapshot.primary)
            back += _backwards("canary", last.canary, snapshot.canary)
            if back:
                self._skipped += 1
                notes.append(
                    "counter reset (went backwards: " + "; ".join(back) + "): metrics reading "
                    "those counters skip the interval since the previous snapshot and count "
                    "again from here"
                )
            if snapshot.elapsed_s < last.elapsed_s:
                notes.append(
                    f"elapsed_s went backwards ({last.elapsed_s:g} -> {snapshot.elapsed_s:g})"
                )
        self._last = snapshot
        p, c = snapshot.primary, snapshot.canary

        metrics: dict[str, MetricResult] = {}
        for note in self._errors.update(c.requests, c.errors, p.requests, p.errors):
            if "backwards" not in note:  # already said once for the whole snapshot
                notes.append(f"errors: {note}")
        metrics["errors"] = self._result("errors", self._errors, None, None)
        for name, lat in self._latency.items():
            lat_notes, no_data = lat.update(p, c)
            notes.extend(f"{name}: {n}" for n in lat_notes if "backwards" not in n)
            metrics[name] = self._result(name, lat.count, lat.threshold_s, no_data)

        decision = combine(metrics)
        if decision is Decision.PASS and min(p.requests, c.requests) < self.config.min_samples:
            decision = Decision.CONTINUE  # defensive: per-metric checks already need samples
        return trusted(
            Verdict,
            {
                "decision": decision,
                "reasons": reasons(metrics, notes),
                "metrics": metrics,
                "elapsed_s": snapshot.elapsed_s,
                "notes": notes,
            },
        )

    def replay(self, snapshot: Snapshot) -> None:
        """observe() without the Verdict: the same evidence afterwards, at a fraction of the
        cost (no bounds for reports, no results, no reason lines). A resumed rollout
        rebuilds its analysis from its record's ticks with this: each look is still judged,
        since a pass or a fail, once reached, stays (tests/analysis: a replayed analyzer's
        verdicts are identical to one that observed every look)."""
        last = self._last
        if last is not None and (
            _backwards("primary", last.primary, snapshot.primary)
            or _backwards("canary", last.canary, snapshot.canary)
        ):
            self._skipped += 1
        self._last = snapshot
        p, c = snapshot.primary, snapshot.canary
        self._errors.update(c.requests, c.errors, p.requests, p.errors)
        self._decide("errors", self._errors, None)
        for name, lat in self._latency.items():
            no_data = lat.update(p, c)[1]
            self._decide(name, lat.count, no_data)

    def _decide(self, name: str, test: CountTest, no_data: str | None) -> Decision:
        """One metric's decision at this look, kept if it is a pass or a fail: both are
        stopping events of anytime-valid tests, so they stay reached."""
        judged = test.judged()
        has_data = no_data is None and judged.samples_canary > 0 and judged.samples_primary > 0
        pass_now = test.pass_ratio_reached() or judged.passed_abs
        decision = decide_metric(
            has_data=has_data,
            e_fail=judged.e_fail,
            alpha=self._alphas[name],
            pass_reached=pass_now or name in self._passed,
            samples_primary=judged.samples_primary,
            samples_canary=judged.samples_canary,
            min_samples=self.config.min_samples,
        )
        if decision is Decision.PASS:
            self._passed.add(name)
        if decision is Decision.FAIL or name in self._failed:
            self._failed.add(name)
            decision = Decision.FAIL
        return decision

    def _result(
        self, name: str, test: CountTest, threshold_s: float | None, no_data: str | None
    ) -> MetricResult:
        cfg = self._settings[name]
        alpha = self._alphas[name]
        decision = self._decide(name, test, no_data)
        st: CountState = test.state()
        has_data = no_data is None and st.samples_canary > 0 and st.samples_primary > 0
        extra: dict[str, float] = {"skipped_intervals": float(self._skipped)}
        if st.rate_canary is not None:
            extra["rate_canary"] = st.rate_canary
        if st.rate_primary is not None:
            extra["rate_primary"] = st.rate_primary
        if st.abs_excess_upper is not None:
            extra["abs_excess_upper"] = st.abs_excess_upper
        estimate = st.estimate
        if estimate is not None and math.isinf(estimate):
            estimate = None  # primary has no events yet; the CS still bounds it
        upper = st.upper
        if upper is not None and math.isinf(upper):
            upper = None  # unbounded above (JSON has no infinity)
        # Every field, in MetricResult's declaration order (see types.trusted).
        fields: dict[str, Any] = {
            "name": name,
            "decision": decision,
            "critical": cfg.critical,
            "test": _ERRORS_TEST if threshold_s is None else _LATENCY_TEST,
            "scale": "ratio",
            "estimate": estimate,
            "lower": st.lower,
            "upper": upper,
            "tolerance": cfg.tolerance,
            "alpha": alpha,
            "fail_ratio": cfg.fail_ratio,
            "abs_tolerance": cfg.abs_tolerance,
            "pass_alpha": self.config.pass_alpha,
            "e_value_fail": min(st.e_fail, _E_MAX),
            "e_value_pass": min(st.e_pass_ratio, _E_MAX),
            "samples_primary": st.samples_primary,
            "samples_canary": st.samples_canary,
            "events_primary": st.events_primary,
            "events_canary": st.events_canary,
            "threshold_s": threshold_s,
            "reason": "",
            "extra": extra,
        }
        # Built from values this module computed itself: validation would only cost time
        # (observe() runs every tick for every rollout; the benchmark holds it to 200 us).
        result = trusted(MetricResult, fields)
        if has_data:
            line = reason_line(result)
        elif no_data is not None:
            line = f"{name}: no data ({no_data}): CONTINUE"
        else:
            line = f"{name}: no data yet (both arms need requests since the test began): CONTINUE"
        fields["reason"] = line  # before anyone else sees the result
        return result
