"""The planner's estimates against what the engine did, on the benchmark's own scenarios.

For each scenario the planner is asked twice: at the start, with what a user would type (the
total rate, the weight, a 1% baseline error rate, and by default 1 - q slow requests for
each latency quantile), and after 60 s of traffic with `plan_from_counts` (the rates it
observed). Both are compared with the simulated runs: the mean and median time to pass
(A/A) or to roll back (error regressions), and for A/A the 95% quantile against the
planner's `likely_pass_s`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from analysis import ArmCounts, Snapshot, plan, plan_from_counts
from benchmarks.contenders import Outcome
from benchmarks.simulate import BUCKET_BOUNDS, ArmStream, RunStream, Scenario

__all__ = ["section"]

OBSERVE_S = 60
SAMPLES = 20  # runs whose first 60 s feed plan_from_counts; the median estimate is shown


def _snapshot_at(stream: RunStream, t: int) -> Snapshot:
    def arm(a: ArmStream) -> ArmCounts:
        buckets = np.cumsum(a.buckets[:t].sum(axis=0))
        return ArmCounts(
            requests=float(a.requests[:t].sum()),
            errors=float(a.errors[:t].sum()),
            latency_buckets=dict(zip(BUCKET_BOUNDS, buckets.astype(float).tolist(), strict=True)),
        )

    return Snapshot(elapsed_s=float(t), primary=arm(stream.primary), canary=arm(stream.canary))


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "never" if x is None or x > 0 else "n/a"
    return f"{x:,.0f}"


def _q(values: Sequence[float], q: float) -> float:
    arr = np.sort(np.asarray(values, dtype=np.float64))
    return float(arr[max(math.ceil(q * arr.size) - 1, 0)])


def section(
    all_scenarios: Sequence[Scenario],
    results: dict[str, dict[str, list[Outcome]]],
    stream_for: Callable[[int, int], RunStream],
    names: Sequence[str] = (
        "aa_200rps",
        "aa_binomial",
        "aa_20canary",
        "aa_low",
        "errors_2x",
        "errors_1_5x",
    ),
) -> list[str]:
    lines = [
        "| scenario | what | planner at start: mean / 95% (s) | planner after 60 s observed: "
        "mean / 95% (s) | simulated: mean / median / 95% (s) | decided |",
        "|---|---|---|---|---|---:|",
    ]
    index = {s.name: i for i, s in enumerate(all_scenarios)}
    for name in names:
        if name not in index:
            continue
        sc = all_scenarios[index[name]]
        outs = results[name]["analyzer"]
        aa = not sc.regression
        ratio = sc.canary.error_rate / sc.primary.error_rate if sc.primary.error_rate else 2.0
        start = plan(
            rate_rps=sc.total_rps,
            canary_weight=sc.canary_weight,
            baseline_error_rate=0.01,
            error_ratio=ratio if ratio > 1 else 2.0,
        )
        observed = []
        for run in range(SAMPLES):
            snap = _snapshot_at(stream_for(index[name], run), OBSERVE_S)
            try:
                observed.append(plan_from_counts(snap, error_ratio=ratio if ratio > 1 else 2.0))
            except ValueError:
                continue
        want = "pass" if aa else "fail"
        times = [o.time_s if o.decision == want else math.inf for o in outs]
        decided = [t for t in times if math.isfinite(t)]
        mean = float(np.mean(decided)) if decided else math.inf
        if aa:
            s_mean, s_likely = start.expected_pass_s, start.likely_pass_s
            o_mean = _median([p.expected_pass_s for p in observed])
            o_likely = _median([p.likely_pass_s for p in observed])
            sim = f"{_fmt(mean)} / {_fmt(_q(times, 0.5))} / {_fmt(_q(times, 0.95))}"
            what = "A/A: time to pass"
        else:
            s_mean, s_likely = start.expected_fail_s, None
            o_mean = _median([p.expected_fail_s for p in observed])
            o_likely = None
            sim = f"{_fmt(mean)} / {_fmt(_q(times, 0.5))} / -"
            what = f"errors x{ratio:g}: time to roll back"
        lines.append(
            f"| {name} | {what} | {_fmt(s_mean)} / {_fmt(s_likely) if aa else '-'} | "
            f"{_fmt(o_mean)} / {_fmt(o_likely) if aa else '-'} | {sim} | "
            f"{100 * len(decided) / len(outs):.1f}% |"
        )
    return lines


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    if len(finite) * 2 <= len(values):  # most runs cannot say: the planner says never
        return None
    # None (never) sorts last
    ordered = sorted(finite) + [math.inf] * (len(values) - len(finite))
    return ordered[(len(ordered) - 1) // 2]
