"""The Analyzer: snapshots in, verdicts out. Holds the per-metric tests; never does I/O.

One `observe` per look, at any cadence. Each metric is a conditional count test
(counts.py): errors directly, latency through slow events over a frozen bucket threshold
(latency.py). The judge (judge.py) combines them. Counters that go backwards are reported in
the verdict's notes and reasons; the interval they span is skipped by every metric.
"""

from __future__ import annotations

import hashlib
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
_CARRY_VERSION = 1


def _arm_state(arm: ArmCounts) -> list[Any]:
    return [arm.requests, arm.errors, [[le, n] for le, n in arm.latency_buckets.items()]]


def _carried_arm(value: object) -> ArmCounts:
    if not isinstance(value, list) or len(value) != 3 or not isinstance(value[2], list):
        raise ValueError("an arm's counts are not [requests, errors, buckets]")
    buckets: dict[float, Any] = {}
    for pair in value[2]:
        if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) not in (int, float):
            raise ValueError("a latency bucket is not [le, count]")
        buckets[pair[0]] = pair[1]
    # validated as any counts are (a ValidationError is a ValueError)
    return ArmCounts(requests=value[0], errors=value[1], latency_buckets=buckets)


def _names(value: object, known: set[str], what: str) -> set[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v in known for v in value):
        raise ValueError(f"{what} is not a list of this analysis' metrics")
    return set(value)


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
        self._digest: str | None = None

    def _fingerprint(self) -> str:
        """The settings, as a digest a carried state is checked against. Once per analyzer:
        its settings are frozen, and carry() runs with every record write (issue 13)."""
        if self._digest is None:
            text = self.config.model_dump_json().encode("utf-8")
            self._digest = hashlib.sha256(text).hexdigest()[:32]
        return self._digest

    def carry(self) -> dict[str, Any]:
        """The analysis' state, exactly, as JSON values: an Analyzer of the same settings
        given it by carry_on judges every later look as this one would (tests/analysis). A
        resumed rollout carries its analysis on with it instead of replaying its record."""
        last = self._last
        return {
            "v": _CARRY_VERSION,
            "config": self._fingerprint(),
            "skipped": self._skipped,
            "passed": sorted(self._passed),
            "failed": sorted(self._failed),
            "last": None
            if last is None
            else [last.elapsed_s, _arm_state(last.primary), _arm_state(last.canary)],
            "errors": self._errors.carry(),
            "latency": {
                name: {"threshold_s": lat.threshold_s, "count": lat.count.carry()}
                for name, lat in self._latency.items()
            },
        }

    def carry_on(self, state: object) -> None:
        """Take up a state carry() gave, from an Analyzer of the same settings. Raises
        ValueError naming what is wrong; this analyzer is then unchanged."""
        if not isinstance(state, dict):
            raise ValueError("the analysis state is not an object")
        if state.get("v") != _CARRY_VERSION:
            raise ValueError(f"version {state.get('v')!r}, not {_CARRY_VERSION}")
        if state.get("config") != self._fingerprint():
            raise ValueError("it was analysed with other settings")
        skipped = state.get("skipped")
        if type(skipped) is not int or skipped < 0:
            raise ValueError("skipped is not a count")
        known = set(self._settings)
        passed = _names(state.get("passed"), known, "passed")
        failed = _names(state.get("failed"), known, "failed")
        last_state = state.get("last")
        last: Snapshot | None = None
        if last_state is not None:
            if not isinstance(last_state, list) or len(last_state) != 3:
                raise ValueError("last is not [elapsed, primary, canary]")
            last = Snapshot(
                elapsed_s=last_state[0],
                primary=_carried_arm(last_state[1]),
                canary=_carried_arm(last_state[2]),
            )
        errors = self._count_test("errors")
        errors.carry_on(state.get("errors"))
        carried = state.get("latency")
        if not isinstance(carried, dict) or set(carried) != set(self._latency):
            raise ValueError(f"latency does not hold {sorted(self._latency)}")
        latency: dict[str, LatencyTest] = {}
        for name, lat in self._latency.items():
            item = carried[name]
            if not isinstance(item, dict):
                raise ValueError(f"{name} is not an object")
            threshold = item.get("threshold_s")
            if threshold is not None and (
                type(threshold) not in (int, float) or not 0 <= threshold < math.inf
            ):
                raise ValueError(f"{name}'s threshold is not a bucket bound")
            test = LatencyTest(
                quantile=lat.quantile,
                count=self._count_test(name),
                min_tail=self.config.threshold_min_tail,
            )
            test.count.carry_on(item.get("count"))
            test.threshold_s = None if threshold is None else float(threshold)
            latency[name] = test
        self._errors, self._latency = errors, latency
        self._passed, self._failed, self._skipped, self._last = passed, failed, skipped, last

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
