"""Analysis records -> a report an SRE would rather read than a log.

Why this module exists: the controller decides on its own, so every promotion and rollback
must be explainable after the fact (Flagger #1810/#1815, Argo Rollouts #404/#559, Kayenta #521
are users asking for exactly this). The record (canary/records.py) already holds every tick;
this module turns it into one `Report` value and renders it as self-contained HTML (inline SVG
charts, no network requests, print CSS), Markdown (PR comments, chat) and versioned JSON.

Pure, like the rest of analysis/: it takes record entries as plain JSON objects (what
`canary.core.records.dump_entry` writes, one dict per line) and returns strings. analysis/ must not
depend on canary/, so the entry shapes are mirrored here as tolerant light models that ignore
fields they do not know (the record schema may grow).

Errors::

    ReportError          the record cannot be turned into a report; the message says why
                         ("record has no start entry", "entry 4 (tick): ...").

A record without an `end` entry (rollout still running, or controller stopped) is not an
error by default: the report is built from what is there and marked incomplete.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from analysis.types import ArmCounts, Decision, MetricResult, Verdict

__all__ = [
    "REPORT_SCHEMA",
    "Report",
    "ReportError",
    "build_report",
    "histogram_quantile",
    "render_html",
    "render_json",
    "render_markdown",
]

REPORT_SCHEMA = 1
_QUANTILES = (0.5, 0.9, 0.99)
# More points than a laptop screen has pixels across a chart only slows the browser.
_MAX_CHART_POINTS = 600


class ReportError(ValueError):
    """A record that cannot be turned into a report; the message names what is wrong."""


# --- the record, as this module reads it -------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    at: float
    rollout: str


class _Start(_In):
    kind: Literal["start"]
    target: str
    primary_version: str = ""
    canary_version: str = ""
    steps: list[int]
    config: dict[str, Any] = Field(default_factory=dict)
    plan: dict[str, float | None] = Field(default_factory=dict)


class _Tick(_In):
    kind: Literal["tick"]
    elapsed_s: float
    phase: str
    step: int
    weight_set: int
    weight_read: int | None = None
    primary: ArmCounts | None = None
    canary: ArmCounts | None = None
    no_data_reason: str | None = None
    verdict: Verdict | None = None
    observed_canary_share: float | None = None


class _Transition(_In):
    kind: Literal["transition"]
    from_phase: str
    to_phase: str
    step: int
    weight: int
    reason: str


class _Manual(_In):
    kind: Literal["manual"]
    command: str
    who: str
    reason: str = ""


class _Failover(_In):
    kind: Literal["failover"]
    direction: str
    who: str
    reason: str
    forced: bool = False


class _Note(_In):
    kind: Literal["note"]
    level: str = "info"
    message: str


class _End(_In):
    kind: Literal["end"]
    outcome: str
    reason: str
    duration_s: float


_KINDS: dict[str, type[_In]] = {
    "start": _Start,
    "tick": _Tick,
    "transition": _Transition,
    "manual": _Manual,
    "failover": _Failover,
    "note": _Note,
    "end": _End,
}


def _parse(entries: Iterable[Mapping[str, Any]]) -> list[_In]:
    parsed: list[_In] = []
    for index, raw in enumerate(entries, start=1):
        if not isinstance(raw, Mapping):
            raise ReportError(f"entry {index} is a {type(raw).__name__}, not a JSON object")
        kind = raw.get("kind")
        model = _KINDS.get(kind) if isinstance(kind, str) else None
        if model is None:
            known = ", ".join(_KINDS)
            raise ReportError(f"entry {index} has kind {kind!r}; expected one of {known}")
        try:
            parsed.append(model.model_validate(dict(raw)))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "entry"
            raise ReportError(f"entry {index} ({kind}): {where}: {first['msg']}") from None
    return parsed


# --- the report value ---------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ArmPoint(_Out):
    """One arm at one tick, from its cumulative counts since the analysis began."""

    requests: float
    errors: float
    error_rate: float | None
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None


class TickPoint(_Out):
    t_s: float  # since the start entry
    elapsed_s: float  # since the analysis began (the analyzer's clock)
    phase: str
    step: int
    weight_set: int
    weight_read: int | None
    observed_canary_share: float | None
    primary: ArmPoint | None
    canary: ArmPoint | None
    no_data_reason: str | None
    decision: str | None


class MetricPoint(_Out):
    t_s: float
    estimate: float | None
    lower: float | None
    upper: float | None
    abs_excess_upper: float | None
    e_value_fail: float
    e_value_pass: float
    decision: str


class MetricSeries(_Out):
    """A metric's confidence sequence over time, with the lines it is judged against."""

    name: str
    scale: str
    test: str
    critical: bool
    fail_ratio: float  # fail: evidence that the ratio is above this
    pass_below: float  # 1 + tolerance; pass: evidence that the ratio is below this ...
    abs_tolerance: float  # ... or that the canary's excess rate is below this
    alpha: float
    pass_alpha: float
    fail_bar: float  # an e_value_fail at or above it fails the metric
    pass_bar: float  # an e_value_pass at or above it passes the metric (ratio route)
    points: list[MetricPoint]


class MetricRow(_Out):
    name: str
    decision: str
    critical: bool
    test: str
    scale: str
    estimate: float | None
    lower: float | None
    upper: float | None
    confidence: float  # 1 - alpha, the coverage of [lower, upper]
    rate_primary: float | None
    rate_canary: float | None
    fail_ratio: float
    pass_below: float
    tolerance: float
    abs_tolerance: float
    abs_excess_upper: float | None
    alpha: float
    pass_alpha: float
    e_value_fail: float
    fail_bar: float
    e_value_pass: float
    pass_bar: float
    samples_primary: float
    samples_canary: float
    events_primary: float
    events_canary: float
    threshold_s: float | None
    reason: str


class DecidingMetric(_Out):
    """The metric that settled the verdict, at the tick it did, and by which route."""

    name: str
    decision: str
    # fail: e_value_fail reached fail_bar (lower bound above fail_ratio);
    # ratio: e_value_pass reached pass_bar (upper bound below 1 + tolerance);
    # absolute: the bound on the canary's excess rate fell below abs_tolerance.
    route: Literal["fail", "ratio", "absolute"]
    test: str
    scale: str
    estimate: float | None
    lower: float | None
    upper: float | None
    confidence: float  # of [lower, upper]
    # what the evidence showed: "ratio above 1", "ratio below 2", "excess below 1%"
    claim: str
    threshold: float  # the ratio (or, for the absolute route, the excess rate) in the claim
    excess_bound: float | None  # the bound on the canary's excess rate, when there is one
    rate_primary: float | None
    rate_canary: float | None
    e_value: float
    evidence_bar: float
    samples_primary: float
    samples_canary: float
    events_primary: float
    events_canary: float
    reason: str


class Decided(_Out):
    """What ended the rollout and why, in one sentence plus the evidence behind it."""

    by: Literal["analysis", "manual", "failover", "controller", "undecided"]
    summary: str
    at_s: float | None
    elapsed_s: float | None = None  # analysis time of the deciding verdict
    metric: DecidingMetric | None = None
    also: list[str] = Field(default_factory=list)  # other metrics that agreed
    reasons: list[str] = Field(default_factory=list)  # the deciding verdict's reasons


class StepSpan(_Out):
    step: int
    weight: int
    from_s: float
    to_s: float
    ticks: int


class TimelineEvent(_Out):
    t_s: float
    kind: str
    text: str


class ManualAction(_Out):
    t_s: float
    command: str
    who: str
    reason: str


class FailoverAction(_Out):
    t_s: float
    direction: str
    who: str
    reason: str
    forced: bool


class ReportNote(_Out):
    t_s: float | None
    level: str
    message: str


class ArmTotals(_Out):
    requests: float
    errors: float
    error_rate: float | None


class Plan(_Out):
    """The planner's estimate at start against what happened."""

    expected_fail_s: float | None
    expected_pass_s: float | None
    actual_decision: str | None  # "pass" | "fail" | None
    actual_decision_s: float | None  # analysis seconds until the deciding verdict
    duration_s: float | None


class Report(_Out):
    report_schema: Literal[1] = 1
    rollout: str
    target: str
    primary_version: str
    canary_version: str
    started_at: float
    ended_at: float | None
    duration_s: float
    outcome: str  # promoted | rolled_back | aborted | superseded | incomplete
    complete: bool
    incomplete_reason: str | None
    end_reason: str | None
    steps: list[int]
    config: dict[str, Any]
    decided: Decided
    final_primary: ArmTotals | None
    final_canary: ArmTotals | None
    tick_count: int
    no_data_ticks: int
    step_spans: list[StepSpan]
    timeline: list[TimelineEvent]
    ticks: list[TickPoint]
    metric_series: list[MetricSeries]
    metrics: list[MetricRow]
    plan: Plan
    manual_actions: list[ManualAction]
    failovers: list[FailoverAction]
    notes: list[ReportNote]


# --- building --------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative `le` buckets (seconds).

    Linear interpolation inside the bucket holding the rank; a rank in the +Inf bucket
    answers with the highest finite bound, as Prometheus does. None without data.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    ordered = sorted(buckets.items())
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                finite = [b for b, _ in ordered if not math.isinf(b)]
                return finite[-1] if finite else None
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return None


def _finite(value: float | None) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value


def _rate(errors: float, requests: float) -> float | None:
    return errors / requests if requests > 0 else None


def _arm_point(arm: ArmCounts | None) -> ArmPoint | None:
    if arm is None:
        return None
    p50, p90, p99 = (histogram_quantile(q, arm.latency_buckets) for q in _QUANTILES)
    return ArmPoint(
        requests=arm.requests,
        errors=arm.errors,
        error_rate=_rate(arm.errors, arm.requests),
        p50_s=p50,
        p90_s=p90,
        p99_s=p99,
    )


def _fail_bar(metric: MetricResult) -> float:
    return 1.0 / metric.alpha if metric.alpha > 0 else math.inf


def _pass_bar(metric: MetricResult) -> float:
    # analysis/counts.py gives the ratio route half of pass_alpha (the other half bounds the
    # arms' rates for the absolute route); an analyzer may state its bar in `extra`.
    if "pass_bar" in metric.extra:
        return metric.extra["pass_bar"]
    return 2.0 / metric.pass_alpha if metric.pass_alpha > 0 else math.inf


def _row(metric: MetricResult) -> MetricRow:
    return MetricRow(
        name=metric.name,
        decision=str(metric.decision),
        critical=metric.critical,
        test=metric.test,
        scale=metric.scale,
        estimate=_finite(metric.estimate),
        lower=_finite(metric.lower),
        upper=_finite(metric.upper),
        confidence=1.0 - metric.alpha,
        rate_primary=_finite(metric.extra.get("rate_primary")),
        rate_canary=_finite(metric.extra.get("rate_canary")),
        fail_ratio=metric.fail_ratio,
        pass_below=1.0 + metric.tolerance,
        tolerance=metric.tolerance,
        abs_tolerance=metric.abs_tolerance,
        abs_excess_upper=_finite(metric.extra.get("abs_excess_upper")),
        alpha=metric.alpha,
        pass_alpha=metric.pass_alpha,
        e_value_fail=metric.e_value_fail,
        fail_bar=_fail_bar(metric),
        e_value_pass=metric.e_value_pass,
        pass_bar=_pass_bar(metric),
        samples_primary=metric.samples_primary,
        samples_canary=metric.samples_canary,
        events_primary=metric.events_primary,
        events_canary=metric.events_canary,
        threshold_s=metric.threshold_s,
        reason=metric.reason,
    )


def _deciding(
    verdict: Verdict, previous: Verdict | None
) -> tuple[DecidingMetric | None, list[str]]:
    """The metric that settled a pass/fail verdict, and the others that agreed.

    A fail is settled by the critical metric with the strongest evidence of a regression.
    A pass needs every metric, so it was settled by the metric(s) that passed last: those
    not yet passing at the previous verdict; among them, the one with the least evidence.
    """
    agreeing = [m for m in verdict.metrics.values() if m.decision == verdict.decision]
    if not agreeing:
        return None, []
    route: Literal["fail", "ratio", "absolute"]
    if verdict.decision == Decision.FAIL:
        chosen = max(agreeing, key=lambda m: (m.critical, m.e_value_fail / _fail_bar(m)))
        route, threshold = "fail", chosen.fail_ratio
        claim = f"ratio above {_num(threshold)}"
        e_value, bar = chosen.e_value_fail, _fail_bar(chosen)
    else:
        before = previous.metrics if previous is not None else {}
        newly = [
            m for m in agreeing if m.name not in before or before[m.name].decision != m.decision
        ]
        chosen = min(newly or agreeing, key=lambda m: m.e_value_pass / _pass_bar(m))
        e_value, bar = chosen.e_value_pass, _pass_bar(chosen)
        excess = chosen.extra.get("abs_excess_upper")
        if e_value < bar and excess is not None and excess < chosen.abs_tolerance:
            route, threshold = "absolute", chosen.abs_tolerance
            claim = f"excess rate below {_pct(threshold)}"
        else:
            route, threshold = "ratio", 1.0 + chosen.tolerance
            claim = f"ratio below {_num(threshold)}"
    metric = DecidingMetric(
        name=chosen.name,
        decision=str(chosen.decision),
        route=route,
        test=chosen.test,
        scale=chosen.scale,
        estimate=_finite(chosen.estimate),
        lower=_finite(chosen.lower),
        upper=_finite(chosen.upper),
        confidence=1.0 - chosen.alpha,
        claim=claim,
        threshold=threshold,
        excess_bound=_finite(chosen.extra.get("abs_excess_upper")),
        rate_primary=_finite(chosen.extra.get("rate_primary")),
        rate_canary=_finite(chosen.extra.get("rate_canary")),
        e_value=e_value,
        evidence_bar=bar,
        samples_primary=chosen.samples_primary,
        samples_canary=chosen.samples_canary,
        events_primary=chosen.events_primary,
        events_canary=chosen.events_canary,
        reason=chosen.reason,
    )
    return metric, sorted(m.name for m in agreeing if m.name != chosen.name)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    if abs(value) >= 10 ** (digits - 1) or float(value).is_integer():
        return f"{round(value):,}"
    return f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 or seconds.is_integer() else f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _metric_sentence(metric: DecidingMetric) -> str:
    rates = ""
    if metric.rate_canary is not None and metric.rate_primary is not None:
        rates = f"canary {_pct(metric.rate_canary)} vs primary {_pct(metric.rate_primary)}, "
    head = f"{metric.name}: {rates}"
    if metric.estimate is not None or metric.lower is not None:
        head += (
            f"ratio {_num(metric.estimate)} ({_conf(1 - metric.confidence)} "
            f"CS [{_num(metric.lower)}, {_num(metric.upper)}])"
        )
    else:
        head += "no events in either arm yet"
    if metric.route == "absolute":
        return (
            f"{head}; the canary's excess rate is at most {_pct(metric.excess_bound)}, "
            f"below the tolerance of {_pct(metric.threshold)} ({metric.test})"
        )
    return (
        f"{head}; evidence of a {metric.claim}: e-value {_num(metric.e_value)} ≥ "
        f"{_num(metric.evidence_bar)} ({metric.test})"
    )


@dataclass
class _Builder:
    start: _Start
    t0: float
    ticks: list[_Tick] = field(default_factory=list)
    others: list[_In] = field(default_factory=list)
    end: _End | None = None

    def rel(self, at: float) -> float:
        return at - self.t0


def build_report(entries: Iterable[Mapping[str, Any]], *, allow_incomplete: bool = True) -> Report:
    """The report of one rollout's record (entries as JSON objects, in record order).

    Raises ReportError for an empty record, one without a start entry, a malformed entry,
    or (with allow_incomplete=False) a record that has no end entry yet.
    """
    parsed = _parse(entries)
    if not parsed:
        raise ReportError("record is empty: it has no entries at all")
    starts = [entry for entry in parsed if isinstance(entry, _Start)]
    if not starts:
        raise ReportError(
            f"record has no start entry (its {len(parsed)} entries begin with a "
            f"{type(parsed[0]).__name__.strip('_').lower()} entry): it is not a rollout's "
            "record, or it was cut at the front"
        )
    if len(starts) > 1:
        raise ReportError(
            f"record has {len(starts)} start entries ({', '.join(s.rollout for s in starts)}); "
            "one record holds one rollout"
        )
    start = starts[0]
    builder = _Builder(start=start, t0=start.at)
    ends = [entry for entry in parsed if isinstance(entry, _End)]
    if len(ends) > 1:
        raise ReportError(f"record has {len(ends)} end entries; one rollout ends once")
    for entry in parsed:
        if entry.rollout != start.rollout:
            raise ReportError(
                f"record mixes rollouts: start is {start.rollout!r}, "
                f"a {type(entry).__name__.strip('_').lower()} entry is {entry.rollout!r}"
            )
        if isinstance(entry, _Tick):
            builder.ticks.append(entry)
        elif isinstance(entry, _End):
            builder.end = entry
        elif not isinstance(entry, _Start):
            builder.others.append(entry)

    incomplete_reason: str | None = None
    if builder.end is None:
        last = f"tick {len(builder.ticks)}" if builder.ticks else "its start entry"
        incomplete_reason = (
            f"record ends at {last} without an end entry: "
            "the rollout is still running or the controller stopped"
        )
        if not allow_incomplete:
            raise ReportError(incomplete_reason)
    return _assemble(builder, incomplete_reason)


def _assemble(b: _Builder, incomplete_reason: str | None) -> Report:
    start, end = b.start, b.end
    last_at = max([start.at] + [t.at for t in b.ticks] + [e.at for e in b.others])
    duration = end.duration_s if end is not None else last_at - start.at
    ticks = [
        TickPoint(
            t_s=b.rel(t.at),
            elapsed_s=t.elapsed_s,
            phase=t.phase,
            step=t.step,
            weight_set=t.weight_set,
            weight_read=t.weight_read,
            observed_canary_share=t.observed_canary_share,
            primary=_arm_point(t.primary),
            canary=_arm_point(t.canary),
            no_data_reason=t.no_data_reason,
            decision=str(t.verdict.decision) if t.verdict is not None else None,
        )
        for t in b.ticks
    ]

    notes: list[ReportNote] = []
    seen_notes: set[str] = set()
    previous: _Tick | None = None
    for index, tick in enumerate(b.ticks, start=1):
        if tick.verdict is not None:
            for message in tick.verdict.notes:
                if message not in seen_notes:
                    seen_notes.add(message)
                    notes.append(ReportNote(t_s=b.rel(tick.at), level="info", message=message))
        if previous is not None:
            for arm in ("primary", "canary"):
                before, now = getattr(previous, arm), getattr(tick, arm)
                if before is not None and now is not None and now.requests < before.requests:
                    notes.append(
                        ReportNote(
                            t_s=b.rel(tick.at),
                            level="warning",
                            message=(
                                f"counter reset at tick {index}: {arm} requests went from "
                                f"{_num(before.requests)} to {_num(now.requests)}"
                            ),
                        )
                    )
        if tick.weight_read is not None and tick.weight_read != tick.weight_set:
            notes.append(
                ReportNote(
                    t_s=b.rel(tick.at),
                    level="warning",
                    message=(
                        f"tick {index}: router reported {tick.weight_read}% to the canary, "
                        f"{tick.weight_set}% was set"
                    ),
                )
            )
        previous = tick
    no_data = [t for t in b.ticks if t.primary is None or t.canary is None]
    if no_data:
        reasons = sorted({t.no_data_reason or "no reason given" for t in no_data})
        notes.append(
            ReportNote(
                t_s=None,
                level="warning",
                message=f"{len(no_data)} of {len(b.ticks)} ticks had no data: "
                + "; ".join(reasons[:3])
                + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""),
            )
        )

    timeline: list[TimelineEvent] = [
        TimelineEvent(
            t_s=0.0,
            kind="start",
            text=f"started {start.target}: {start.primary_version or '?'} → "
            f"{start.canary_version or '?'}, steps {start.steps}",
        )
    ]
    manual: list[ManualAction] = []
    failovers: list[FailoverAction] = []
    for entry in b.others:
        t_s = b.rel(entry.at)
        if isinstance(entry, _Transition):
            timeline.append(
                TimelineEvent(
                    t_s=t_s,
                    kind="transition",
                    text=f"{entry.from_phase} → {entry.to_phase} at step {entry.step} "
                    f"({entry.weight}%): {entry.reason}",
                )
            )
        elif isinstance(entry, _Manual):
            manual.append(
                ManualAction(t_s=t_s, command=entry.command, who=entry.who, reason=entry.reason)
            )
            timeline.append(
                TimelineEvent(
                    t_s=t_s,
                    kind="manual",
                    text=f"{entry.who} ran {entry.command}"
                    + (f": {entry.reason}" if entry.reason else ""),
                )
            )
        elif isinstance(entry, _Failover):
            failovers.append(
                FailoverAction(
                    t_s=t_s,
                    direction=entry.direction,
                    who=entry.who,
                    reason=entry.reason,
                    forced=entry.forced,
                )
            )
            timeline.append(
                TimelineEvent(
                    t_s=t_s,
                    kind="failover",
                    text=f"failover {entry.direction} by {entry.who}"
                    + (" (forced)" if entry.forced else "")
                    + f": {entry.reason}",
                )
            )
        elif isinstance(entry, _Note):
            notes.append(ReportNote(t_s=t_s, level=entry.level, message=entry.message))
    if end is not None:
        timeline.append(
            TimelineEvent(t_s=b.rel(end.at), kind="end", text=f"{end.outcome}: {end.reason}")
        )

    spans: list[StepSpan] = []
    for tick, point in zip(b.ticks, ticks, strict=True):
        if spans and spans[-1].step == tick.step and spans[-1].weight == tick.weight_set:
            last = spans[-1]
            spans[-1] = last.model_copy(update={"to_s": point.t_s, "ticks": last.ticks + 1})
            continue
        if spans:
            spans[-1] = spans[-1].model_copy(update={"to_s": point.t_s})
        spans.append(
            StepSpan(
                step=tick.step, weight=tick.weight_set, from_s=point.t_s, to_s=point.t_s, ticks=1
            )
        )
        mismatch = tick.weight_read is not None and tick.weight_read != tick.weight_set
        timeline.append(
            TimelineEvent(
                t_s=point.t_s,
                kind="weight",
                text=f"step {tick.step}: canary weight {tick.weight_set}%"
                + (f" (router reads {tick.weight_read}%)" if mismatch else ""),
            )
        )
    if spans and end is not None:
        spans[-1] = spans[-1].model_copy(update={"to_s": max(spans[-1].to_s, b.rel(end.at))})
    last_decision: str | None = None
    for tick in b.ticks:
        if tick.verdict is None or tick.verdict.decision == last_decision:
            continue
        if last_decision is not None or tick.verdict.decision != Decision.CONTINUE:
            changed = [
                m.name for m in tick.verdict.metrics.values() if m.decision == tick.verdict.decision
            ]
            timeline.append(
                TimelineEvent(
                    t_s=b.rel(tick.at),
                    kind="verdict",
                    text=f"analysis: {last_decision or 'continue'} → {tick.verdict.decision}"
                    + (f" ({', '.join(changed)})" if changed else ""),
                )
            )
        last_decision = tick.verdict.decision
    timeline.sort(key=lambda e: (e.t_s, e.kind != "start", e.kind == "end"))

    # Metric series, in the order the analyzer names them.
    series: dict[str, tuple[MetricResult, list[MetricPoint]]] = {}
    for tick in b.ticks:
        if tick.verdict is None:
            continue
        for name, metric in tick.verdict.metrics.items():
            metric_point = MetricPoint(
                t_s=b.rel(tick.at),
                estimate=_finite(metric.estimate),
                lower=_finite(metric.lower),
                upper=_finite(metric.upper),
                abs_excess_upper=_finite(metric.extra.get("abs_excess_upper")),
                e_value_fail=metric.e_value_fail,
                e_value_pass=metric.e_value_pass,
                decision=str(metric.decision),
            )
            if name in series:
                series[name] = (metric, [*series[name][1], metric_point])
            else:
                series[name] = (metric, [metric_point])
    metric_series = [
        MetricSeries(
            name=name,
            scale=metric.scale,
            test=metric.test,
            critical=metric.critical,
            fail_ratio=metric.fail_ratio,
            pass_below=1.0 + metric.tolerance,
            abs_tolerance=metric.abs_tolerance,
            alpha=metric.alpha,
            pass_alpha=metric.pass_alpha,
            fail_bar=_fail_bar(metric),
            pass_bar=_pass_bar(metric),
            points=points,
        )
        for name, (metric, points) in series.items()
    ]

    verdict_ticks = [t for t in b.ticks if t.verdict is not None]
    last_verdict = verdict_ticks[-1].verdict if verdict_ticks else None
    metrics = [_row(m) for m in last_verdict.metrics.values()] if last_verdict else []

    decided = _decide(b, verdict_ticks, manual, failovers)
    plan = Plan(
        expected_fail_s=_finite(start.plan.get("expected_fail_s")),
        expected_pass_s=_finite(start.plan.get("expected_pass_s")),
        actual_decision=decided.metric.decision if decided.metric is not None else None,
        actual_decision_s=decided.elapsed_s,
        duration_s=duration if end is not None else None,
    )

    with_data = [t for t in b.ticks if t.primary is not None and t.canary is not None]
    final = with_data[-1] if with_data else None

    def totals(arm: ArmCounts | None) -> ArmTotals | None:
        if arm is None:
            return None
        return ArmTotals(
            requests=arm.requests, errors=arm.errors, error_rate=_rate(arm.errors, arm.requests)
        )

    return Report(
        rollout=start.rollout,
        target=start.target,
        primary_version=start.primary_version,
        canary_version=start.canary_version,
        started_at=start.at,
        ended_at=end.at if end is not None else None,
        duration_s=duration,
        outcome=end.outcome if end is not None else "incomplete",
        complete=end is not None,
        incomplete_reason=incomplete_reason,
        end_reason=end.reason if end is not None else None,
        steps=start.steps,
        config=start.config,
        decided=decided,
        final_primary=totals(final.primary) if final else None,
        final_canary=totals(final.canary) if final else None,
        tick_count=len(b.ticks),
        no_data_ticks=len(no_data),
        step_spans=spans,
        timeline=timeline,
        ticks=ticks,
        metric_series=metric_series,
        metrics=metrics,
        plan=plan,
        manual_actions=manual,
        failovers=failovers,
        notes=notes,
    )


def _decide(
    b: _Builder,
    verdict_ticks: Sequence[_Tick],
    manual: Sequence[ManualAction],
    failovers: Sequence[FailoverAction],
) -> Decided:
    end = b.end
    wanted = {"promoted": Decision.PASS, "rolled_back": Decision.FAIL}.get(
        end.outcome if end else "", None
    )
    # The verdict behind the outcome: the first one that said so (pass and fail are stopping
    # events, they stay); for an unfinished record, the first decisive one.
    candidates = [
        t
        for t in verdict_ticks
        if t.verdict is not None
        and t.verdict.decision != Decision.CONTINUE
        and (wanted is None or t.verdict.decision == wanted)
    ]
    decisive_manual = [m for m in manual if m.command in ("promote", "abort", "rollback")]
    if (
        end is not None
        and decisive_manual
        and (not candidates or b.rel(candidates[0].at) > decisive_manual[-1].t_s)
    ):
        action = decisive_manual[-1]
        return Decided(
            by="manual",
            at_s=action.t_s,
            summary=f"{end.outcome.replace('_', ' ')} by hand: {action.who} ran "
            f"{action.command}" + (f" ({action.reason})" if action.reason else ""),
        )
    if candidates and (end is None or wanted is not None):
        tick = candidates[0]
        assert tick.verdict is not None
        index = list(verdict_ticks).index(tick)
        previous = verdict_ticks[index - 1].verdict if index > 0 else None
        metric, also = _deciding(tick.verdict, previous)
        outcome = (
            end.outcome.replace("_", " ")
            if end is not None
            else f"analysis says {tick.verdict.decision}"
        )
        summary = f"{outcome} after {_duration(tick.elapsed_s)} of analysis"
        if metric is not None:
            summary += f": {_metric_sentence(metric)}"
        return Decided(
            by="analysis",
            at_s=b.rel(tick.at),
            elapsed_s=tick.elapsed_s,
            summary=summary,
            metric=metric,
            also=also,
            reasons=list(tick.verdict.reasons),
        )
    if end is not None and failovers and end.outcome in ("rolled_back", "aborted"):
        last_failover = failovers[-1]
        return Decided(
            by="failover",
            at_s=last_failover.t_s,
            summary=f"{end.outcome.replace('_', ' ')}: failover {last_failover.direction} "
            f"by {last_failover.who}: {last_failover.reason}",
        )
    if end is not None:
        return Decided(
            by="controller",
            at_s=b.rel(end.at),
            summary=f"{end.outcome.replace('_', ' ')}: {end.reason}",
        )
    return Decided(by="undecided", at_s=None, summary="no decision yet")


# --- JSON -------------------------------------------------------------------------------


def render_json(report: Report) -> str:
    """Stable, versioned JSON for machines: top-level "report_schema", fields in a fixed
    order, non-finite numbers as null."""
    data = report.model_dump(mode="json")
    return json.dumps(_json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


# --- Markdown ---------------------------------------------------------------------------

_OUTCOME_WORDS = {
    "promoted": "✅ promoted",
    "rolled_back": "❌ rolled back",
    "aborted": "⏹ aborted",
    "superseded": "↪ superseded",
    "incomplete": "⏳ incomplete",
}


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, *, report_url: str | None = None) -> str:
    """A compact Markdown summary for PR comments and chat."""
    r = report
    lines = [
        f"### Canary {r.target}: {_OUTCOME_WORDS.get(r.outcome, r.outcome)}",
        "",
        f"**{r.primary_version or '?'} → {r.canary_version or '?'}** · rollout `{r.rollout}` · "
        f"duration {_duration(r.duration_s)} · {r.tick_count} ticks",
        "",
    ]
    if r.incomplete_reason:
        lines += [f"> ⚠️ Incomplete: {r.incomplete_reason}", ""]
    lines += [f"**Decision:** {r.decided.summary}", ""]
    if r.final_primary and r.final_canary:
        lines += [
            "| arm | requests | errors | error rate |",
            "|---|---:|---:|---:|",
            f"| primary | {_num(r.final_primary.requests)} | {_num(r.final_primary.errors)} | "
            f"{_pct(r.final_primary.error_rate)} |",
            f"| canary | {_num(r.final_canary.requests)} | {_num(r.final_canary.errors)} | "
            f"{_pct(r.final_canary.error_rate)} |",
            "",
        ]
    if r.metrics:
        lines += [
            "| metric | decision | canary vs primary | ratio [CS] | fail above / pass below | "
            "e-value fail (needs) | e-value pass (needs) | excess bound (tolerance) | "
            "samples c / p | test |",
            "|---|---|---|---|---|---:|---:|---|---:|---|",
        ]
        for m in r.metrics:
            lines.append(
                f"| {_md_cell(m.name)}{' (critical)' if m.critical else ''} | {m.decision} | "
                f"{_pct(m.rate_canary)} vs {_pct(m.rate_primary)} | {_num(m.estimate)} "
                f"[{_num(m.lower)}, {_num(m.upper)}] @ {_conf(m.alpha)} | "
                f"{_num(m.fail_ratio)} / {_num(m.pass_below)} | "
                f"{_num(m.e_value_fail)} ({_num(m.fail_bar)}) | "
                f"{_num(m.e_value_pass)} ({_num(m.pass_bar)}) | "
                f"{_pct(m.abs_excess_upper)} ({_pct(m.abs_tolerance)}) | "
                f"{_num(m.samples_canary)} / {_num(m.samples_primary)} | {_md_cell(m.test)} |"
            )
        lines.append("")
    lines += [
        f"**Plan:** expected to catch a regression in {_duration(r.plan.expected_fail_s)}, "
        f"to pass in {_duration(r.plan.expected_pass_s)}; "
        + (
            f"decided {r.plan.actual_decision} after {_duration(r.plan.actual_decision_s)}."
            if r.plan.actual_decision
            else "no analysis decision."
        ),
        "",
    ]
    if r.step_spans:
        steps = ", ".join(f"{s.weight}% ({_duration(s.to_s - s.from_s)})" for s in r.step_spans)
        lines += [f"**Steps:** {steps}", ""]
    if r.manual_actions:
        lines.append("**Manual actions:**")
        lines += [
            f"- {_duration(a.t_s)}: {a.who} ran `{a.command}`"
            + (f" ({a.reason})" if a.reason else "")
            for a in r.manual_actions
        ]
        lines.append("")
    if r.failovers:
        lines.append("**Failovers:**")
        lines += [
            f"- {_duration(f.t_s)}: {f.direction} by {f.who}{' (forced)' if f.forced else ''}: "
            f"{f.reason}"
            for f in r.failovers
        ]
        lines.append("")
    if r.notes:
        lines.append("**Notes:**")
        lines += [
            f"- {'⚠️ ' if n.level == 'warning' else ''}"
            + (f"{_duration(n.t_s)}: " if n.t_s is not None else "")
            + n.message
            for n in r.notes
        ]
        lines.append("")
    if report_url:
        lines += [f"[Full report]({report_url})", ""]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.3g}%"


def _conf(alpha: float) -> str:
    return f"{(1 - alpha) * 100:.4g}%"


# --- HTML -------------------------------------------------------------------------------

_PRIMARY = "#0072b2"
_CANARY = "#d55e00"
_FAIL = "#c0392b"
_PASS = "#1e8449"
_GREY = "#7f8c8d"

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1c2833;
  margin: 0; background: #f4f6f7; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 22px; margin: 4px 0 2px; }
h2 { font-size: 16px; margin: 22px 0 8px; border-bottom: 1px solid #d5dbdb; padding-bottom: 3px; }
.sub { color: #566573; margin: 0 0 10px; }
.banner { border-radius: 6px; padding: 10px 14px; margin: 8px 0 12px; color: #fff; }
.banner b { font-size: 17px; }
.promoted { background: #1e8449; } .rolled_back { background: #c0392b; }
.aborted, .superseded { background: #6c7a89; } .incomplete { background: #b9770e; }
.warn { background: #fdf2e9; border-left: 4px solid #b9770e; padding: 8px 12px; margin: 8px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 8px; }
.card { background: #fff; border-radius: 6px; padding: 8px 12px; border: 1px solid #e5e8e8; }
.card .k { color: #566573; font-size: 12px; } .card .v { font-size: 18px; font-weight: 600; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 10px; }
figure { margin: 0; background: #fff; border: 1px solid #e5e8e8; border-radius: 6px;
  padding: 6px 8px; break-inside: avoid; }
figcaption { font-weight: 600; font-size: 13px; }
svg { display: block; width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #34495e; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; }
th, td { border: 1px solid #e5e8e8; padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: #eaeded; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.wide { overflow-x: auto; }
.pass { color: #1e8449; font-weight: 600; } .fail { color: #c0392b; font-weight: 600; }
.continue { color: #566573; }
ul.reasons { margin: 6px 0 0 18px; padding: 0; }
code { font-size: 12px; }
footer { color: #7f8c8d; font-size: 12px; margin-top: 24px; }
@media print {
  body { background: #fff; font-size: 11px; }
  main { max-width: none; padding: 0; }
  .banner { color: #000; border: 2px solid #000; background: none !important; }
  .charts { grid-template-columns: 1fr 1fr; }
  figure, tr, .cards { break-inside: avoid; }
  .wide { overflow: visible; } .wide table { font-size: 9px; }
  td, th { overflow-wrap: anywhere; }
  h2 { break-after: avoid; }
  @page { margin: 12mm; }
}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class _Line:
    label: str
    color: str
    points: Sequence[tuple[float, float | None]]
    dashed: bool = False
    width: float = 1.8


@dataclass(frozen=True)
class _Band:
    label: str
    color: str
    points: Sequence[tuple[float, float | None, float | None]]  # x, low, high


def _thin(points: Sequence[Any]) -> Sequence[Any]:
    if len(points) <= _MAX_CHART_POINTS:
        return points
    stride = math.ceil(len(points) / _MAX_CHART_POINTS)
    kept = list(points[::stride])
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _svg_chart(
    *,
    title: str,
    lines: Sequence[_Line],
    x_max: float,
    y_format: Any,
    bands: Sequence[_Band] = (),
    hlines: Sequence[tuple[float, str, str]] = (),  # y, label, color
    vlines: Sequence[tuple[float, str]] = (),  # x, label
    y_min: float | None = None,
    y_cap: float | None = None,
    log_y: bool = False,
    step_lines: bool = False,
    chart_id: str = "",
) -> str:
    """A small line chart as inline SVG: axes, grid, bands, reference lines, legend.

    Values above `y_cap` are clipped to it (a note says so) so one early, wide confidence
    bound does not flatten the rest of the chart.
    """
    width, plot_h = 560, 176
    left, right, top = 58, 12, 10
    plot_w = width - left - right
    legend = [
        *[(ln.label, ln.color, "dash" if ln.dashed else "line") for ln in lines],
        *[(bd.label, bd.color, "band") for bd in bands],
    ]
    # Legend rows: wrap rather than run off the right edge.
    legend_rows, row_x = 1, float(left)
    for label, _, _ in legend:
        item_w = 28 + 6.2 * len(label)
        if row_x + item_w > width and row_x > left:
            legend_rows, row_x = legend_rows + 1, float(left)
        row_x += item_w
    bottom = 30 + 14 * legend_rows
    height = top + plot_h + bottom

    def tf(v: float) -> float:
        return math.log10(v) if log_y else v

    values: list[float] = []
    for line in lines:
        values += [v for _, v in line.points if v is not None]
    for band in bands:
        for _, low, high in band.points:
            values += [v for v in (low, high) if v is not None]
    values += [y for y, _, _ in hlines]
    if log_y:
        values = [v for v in values if v > 0]
    clipped = False
    if y_cap is not None and any(v > y_cap for v in values):
        clipped = True
        values = [min(v, y_cap) for v in values]
    if not values:
        body = f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>'
        return (
            f'<figure id="{_e(chart_id)}"><figcaption>{_e(title)}</figcaption>'
            f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">{body}'
            "</svg></figure>"
        )
    lo = min(values) if y_min is None else min(y_min, min(values))
    hi = max(values)
    if log_y:
        lo, hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        if hi <= lo:
            hi = lo + 1
        stride = max(1, math.ceil((hi - lo) / 6))
        y_ticks = [float(v) for v in range(int(lo), int(hi) + 1, stride)]
    else:
        if hi == lo:
            hi = lo + (abs(lo) * 0.1 or 1.0)
        pad = (hi - lo) * 0.05
        lo = lo if y_min is not None else lo - pad
        hi = hi + pad
        y_ticks = [v for v in _nice_ticks(lo, hi) if lo <= v <= hi]
    x_hi = x_max if x_max > 0 else 1.0

    def px(x: float) -> float:
        return left + plot_w * min(max(x / x_hi, 0.0), 1.0)

    def py(y: float) -> float:
        if y_cap is not None:
            y = min(y, y_cap)
        value = tf(y) if not log_y else (math.log10(y) if y > 0 else lo)
        frac = (value - lo) / (hi - lo)
        return top + plot_h * (1 - min(max(frac, 0.0), 1.0))

    parts: list[str] = [
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfc" '
        'stroke="#d5dbdb"/>'
    ]
    for tick in y_ticks:
        y = top + plot_h * (1 - (tick - lo) / (hi - lo))
        label = y_format(10**tick) if log_y else y_format(tick)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#eaeded"/>'
            f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{_e(label)}</text>'
        )
    for tick in _nice_ticks(0.0, x_hi, 6):
        if tick > x_hi:
            continue
        x = px(tick)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
            'stroke="#7f8c8d"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{_e(_duration(tick))}</text>"
        )
    for x_value, label in vlines:
        x = px(x_value)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#aab7b8" '
            f'stroke-dasharray="2,3"><title>{_e(label)}</title></line>'
        )
    for band in bands:
        for segment in _segments([(x, lo_, hi_) for x, lo_, hi_ in _thin(band.points)]):
            upper = " ".join(f"{px(x):.1f},{py(h):.1f}" for x, _, h in segment)
            lower = " ".join(f"{px(x):.1f},{py(lw):.1f}" for x, lw, _ in reversed(segment))
            parts.append(
                f'<polygon class="band" points="{upper} {lower}" fill="{band.color}" '
                f'fill-opacity="0.18" stroke="none"><title>{_e(band.label)}</title></polygon>'
            )
    for y_value, label, color in hlines:
        y = py(y_value)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
            f'stroke-width="1.3" stroke-dasharray="6,4"/>'
            f'<text x="{left + plot_w - 4}" y="{y - 4:.1f}" text-anchor="end" '
            f'style="fill:{color}">{_e(label)}</text>'
        )
    for line in lines:
        pts = [(x, v) for x, v in _thin(line.points)]
        for run in _runs(pts):
            coords: list[str] = []
            for i, (x, v) in enumerate(run):
                if step_lines and i > 0:
                    coords.append(f"{px(x):.1f},{py(run[i - 1][1]):.1f}")
                coords.append(f"{px(x):.1f},{py(v):.1f}")
            if len(coords) == 1:
                cx, cy = coords[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{line.color}"/>')
                continue
            dash = ' stroke-dasharray="5,3"' if line.dashed else ""
            parts.append(
                f'<polyline class="series" data-series="{_e(line.label)}" fill="none" '
                f'stroke="{line.color}" stroke-width="{line.width}"{dash} '
                f'points="{" ".join(coords)}"/>'
            )
    legend_x = float(left)
    legend_y = top + plot_h + 36
    for item_label, color, kind in legend:
        if legend_x + 28 + 6.2 * len(item_label) > width and legend_x > left:
            legend_x, legend_y = float(left), legend_y + 14
        if kind == "band":
            parts.append(
                f'<rect x="{legend_x}" y="{legend_y - 8}" width="16" height="8" '
                f'fill="{color}" fill-opacity="0.25"/>'
            )
        else:
            dash = ' stroke-dasharray="4,2"' if kind == "dash" else ""
            parts.append(
                f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="{legend_y - 4}" '
                f'y2="{legend_y - 4}" stroke="{color}" stroke-width="2"{dash}/>'
            )
        parts.append(f'<text x="{legend_x + 20}" y="{legend_y}">{_e(item_label)}</text>')
        legend_x += 28 + 6.2 * len(item_label)
    if clipped and y_cap is not None:
        parts.append(
            f'<text x="{left + 4}" y="{top + 12}" style="fill:#7f8c8d">'
            f"clipped at {_e(y_format(y_cap))}</text>"
        )
    return (
        f'<figure id="{_e(chart_id)}"><figcaption>{_e(title)}</figcaption>'
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
        + "".join(parts)
        + "</svg></figure>"
    )


def _runs(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Split a series at missing values, so a gap in the data is a gap in the line."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, value in points:
        if value is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, value))
    return [run for run in runs if run]


def _segments(
    points: Sequence[tuple[float, float | None, float | None]],
) -> list[list[tuple[float, float, float]]]:
    runs: list[list[tuple[float, float, float]]] = [[]]
    for x, low, high in points:
        if low is None or high is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, low, high))
    return [run for run in runs if len(run) >= 2]


def _fmt_pct(value: float) -> str:
    return f"{value * 100:.2g}%" if value < 0.1 else f"{value * 100:.0f}%"


def _fmt_seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f}ms" if value >= 0.001 or value == 0 else f"{value * 1e3:.2f}ms"
    return f"{value:.2g}s"


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}"


def _fmt_evalue(value: float) -> str:
    return f"{value:.0e}" if value >= 1e4 or value < 1e-2 else f"{value:g}"


def _charts(r: Report) -> list[str]:
    x_max = max([r.duration_s] + [t.t_s for t in r.ticks]) or 1.0
    vlines = [(s.from_s, f"step {s.step}: {s.weight}%") for s in r.step_spans[1:]]
    vlines += [(a.t_s, f"manual: {a.command}") for a in r.manual_actions]
    vlines += [(f.t_s, f"failover {f.direction}") for f in r.failovers]
    charts = [
        _svg_chart(
            chart_id="chart-weight",
            title="Canary weight (% of traffic)",
            lines=[
                _Line("set", _CANARY, [(t.t_s, float(t.weight_set)) for t in r.ticks]),
                _Line(
                    "read back",
                    _GREY,
                    [(t.t_s, _opt(t.weight_read)) for t in r.ticks],
                    dashed=True,
                ),
                *(
                    [
                        _Line(
                            "observed share",
                            _PRIMARY,
                            [
                                (
                                    t.t_s,
                                    None
                                    if t.observed_canary_share is None
                                    else t.observed_canary_share * 100,
                                )
                                for t in r.ticks
                            ],
                            width=1.2,
                        )
                    ]
                    if any(t.observed_canary_share is not None for t in r.ticks)
                    else []
                ),
            ],
            x_max=x_max,
            y_min=0.0,
            y_format=lambda v: f"{v:.0f}%",
            step_lines=True,
            vlines=vlines,
        ),
        _svg_chart(
            chart_id="chart-errors",
            title="Error rate per arm (cumulative since analysis began)",
            lines=[
                _Line(
                    "primary",
                    _PRIMARY,
                    [(t.t_s, t.primary.error_rate if t.primary else None) for t in r.ticks],
                ),
                _Line(
                    "canary",
                    _CANARY,
                    [(t.t_s, t.canary.error_rate if t.canary else None) for t in r.ticks],
                ),
            ],
            x_max=x_max,
            y_min=0.0,
            y_format=_fmt_pct,
            vlines=vlines,
        ),
    ]
    if any(t.primary and t.primary.p50_s is not None for t in r.ticks):
        latency_lines: list[_Line] = []
        for arm, color in (("primary", _PRIMARY), ("canary", _CANARY)):
            for quantile, dashed in (("p50_s", False), ("p99_s", True)):
                latency_lines.append(
                    _Line(
                        f"{arm} {quantile[:-2]}",
                        color,
                        [
                            (t.t_s, getattr(getattr(t, arm), quantile) if getattr(t, arm) else None)
                            for t in r.ticks
                        ],
                        dashed=dashed,
                    )
                )
        charts.append(
            _svg_chart(
                chart_id="chart-latency",
                title="Latency quantiles per arm (from cumulative histogram buckets)",
                lines=latency_lines,
                x_max=x_max,
                y_min=0.0,
                y_format=_fmt_seconds,
                vlines=vlines,
            )
        )
    palette = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9"]
    for s in r.metric_series:
        cap = max(2.0, s.pass_below * 2.0, s.fail_ratio * 1.5) if s.scale == "ratio" else None
        hlines = [(s.pass_below, f"pass below {s.pass_below:.2f}", _PASS)]
        if s.fail_ratio != s.pass_below:
            hlines.append((s.fail_ratio, f"fail above {s.fail_ratio:.2f}", _FAIL))
        if s.scale == "ratio" and 1.0 not in (s.fail_ratio, s.pass_below):
            hlines.append((1.0, "equal", _GREY))
        charts.append(
            _svg_chart(
                chart_id=f"chart-metric-{s.name}",
                title=f"{s.name}: canary/primary {s.scale}, {_conf(s.alpha)} confidence band",
                lines=[
                    _Line("estimate", _CANARY, [(p.t_s, p.estimate) for p in s.points]),
                ],
                bands=[
                    _Band(
                        "confidence band",
                        _CANARY,
                        [(p.t_s, p.lower, p.upper) for p in s.points],
                    )
                ],
                hlines=hlines,
                x_max=x_max,
                y_min=0.0 if s.scale == "ratio" else None,
                y_cap=cap,
                y_format=_fmt_ratio,
                vlines=vlines,
            )
        )
    absolute = [
        s
        for s in r.metric_series
        if s.abs_tolerance > 0 and any(p.abs_excess_upper is not None for p in s.points)
    ]
    if absolute:
        charts.append(
            _svg_chart(
                chart_id="chart-excess",
                title="Bound on the canary's excess rate over the primary's (pass below tolerance)",
                lines=[
                    _Line(
                        s.name,
                        palette[i % len(palette)],
                        [(p.t_s, p.abs_excess_upper) for p in s.points],
                    )
                    for i, s in enumerate(absolute)
                ],
                hlines=[
                    (t, f"tolerance {_fmt_pct(t)}", _PASS)
                    for t in sorted({s.abs_tolerance for s in absolute})
                ],
                x_max=x_max,
                y_min=0.0,
                y_cap=max(s.abs_tolerance for s in absolute) * 4,
                y_format=_fmt_pct,
                vlines=vlines,
            )
        )
    if r.metric_series:
        lines = []
        # Each e-value over the bar it must reach, so one line at 1 marks every decision.
        floor = 1e-3
        for i, s in enumerate(r.metric_series):
            color = palette[i % len(palette)]
            lines.append(
                _Line(
                    f"{s.name} regression",
                    color,
                    [(p.t_s, max(p.e_value_fail / s.fail_bar, floor)) for p in s.points],
                )
            )
            lines.append(
                _Line(
                    f"{s.name} pass",
                    color,
                    [(p.t_s, max(p.e_value_pass / s.pass_bar, floor)) for p in s.points],
                    dashed=True,
                )
            )
        charts.append(
            _svg_chart(
                chart_id="chart-evidence",
                title="Evidence as a share of what decides (1 = decided): "
                "regression solid, pass dashed",
                lines=lines,
                hlines=[(1.0, "decides", _FAIL)],
                x_max=x_max,
                y_format=_fmt_evalue,
                y_cap=1e3,
                log_y=True,
                vlines=vlines,
            )
        )
    return charts


def _opt(value: int | None) -> float | None:
    return None if value is None else float(value)


def render_html(report: Report, *, generated_note: str = "") -> str:
    """One self-contained HTML page: inline CSS and SVG, no scripts, no external resources."""
    r = report
    # Words, not emoji: a headless or print renderer may have no emoji font.
    outcome_text = r.outcome.replace("_", " ")
    title = f"Canary report: {r.target} {r.canary_version} {outcome_text}".replace("  ", " ")
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No network: forbid everything except inline styles and data: images.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Canary {_e(r.target)}: {_e(r.primary_version or '?')} → "
        f"{_e(r.canary_version or '?')}</h1>",
        f'<p class="sub">rollout <code>{_e(r.rollout)}</code> · started '
        f"{_e(_utc(r.started_at))} · duration {_e(_duration(r.duration_s))} · "
        f"{r.tick_count} ticks</p>",
        f'<div class="banner {_e(r.outcome)}" id="outcome"><b>{_e(outcome_text)}</b> — '
        f"{_e(r.decided.summary)}</div>",
    ]
    if r.incomplete_reason:
        out.append(
            f'<div class="warn" id="incomplete"><b>Incomplete record:</b> '
            f"{_e(r.incomplete_reason)}. This report shows what it has.</div>"
        )
    if r.end_reason and r.decided.by not in ("controller", "analysis"):  # else said above
        out.append(f"<p><b>Controller:</b> {_e(r.end_reason)}</p>")

    cards = [
        ("outcome", outcome_text),
        ("decided by", r.decided.by),
        ("duration", _duration(r.duration_s)),
        ("steps", " → ".join(f"{w}%" for w in r.steps)),
    ]
    if r.final_primary:
        cards.append(
            (
                "primary requests / errors",
                f"{_num(r.final_primary.requests)} / {_num(r.final_primary.errors)}",
            )
        )
    if r.final_canary:
        cards.append(
            (
                "canary requests / errors",
                f"{_num(r.final_canary.requests)} / {_num(r.final_canary.errors)}",
            )
        )
    out.append(
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )

    out.append('<h2 id="decision">What decided, and why</h2>')
    d = r.decided
    out.append(f"<p>{_e(d.summary)}</p>")
    if d.metric is not None:
        m = d.metric
        evidence = (
            f"excess ≤ {_pct(m.excess_bound)}"
            if m.route == "absolute"
            else f"e-value {_num(m.e_value)}"
        )
        needed = _pct(m.threshold) if m.route == "absolute" else _num(m.evidence_bar)
        out.append(
            "<table><tr><th>deciding metric</th><th>canary vs primary</th><th>ratio</th>"
            "<th>confidence sequence</th><th>shown</th><th>evidence</th><th>needed</th>"
            "<th>events / samples canary</th><th>events / samples primary</th><th>test</th></tr>"
            f'<tr><td class="{_e(m.decision)}">{_e(m.name)}</td>'
            f'<td class="n">{_e(_pct(m.rate_canary))} vs {_e(_pct(m.rate_primary))}</td>'
            f'<td class="n">{_e(_num(m.estimate))}</td>'
            f'<td class="n">[{_e(_num(m.lower))}, {_e(_num(m.upper))}] '
            f"@ {_e(_conf(1 - m.confidence))}</td><td>{_e(m.claim)}</td>"
            f'<td class="n" id="deciding-evidence" data-e-value="{m.e_value!r}">'
            f'{_e(evidence)}</td><td class="n">{_e(needed)}</td>'
            f'<td class="n">{_e(_num(m.events_canary))} / {_e(_num(m.samples_canary))}</td>'
            f'<td class="n">{_e(_num(m.events_primary))} / {_e(_num(m.samples_primary))}</td>'
            f"<td>{_e(m.test)}</td></tr></table>"
        )
        if d.also:
            out.append(f"<p>Also {_e(m.decision)}: {_e(', '.join(d.also))}.</p>")
    if d.reasons:
        out.append(
            '<ul class="reasons">' + "".join(f"<li>{_e(x)}</li>" for x in d.reasons) + "</ul>"
        )

    out.append('<h2 id="charts">Over time</h2><div class="charts">')
    out += _charts(r)
    out.append("</div>")

    if r.metrics:
        out.append(
            '<h2 id="metrics">Metrics at the last verdict</h2><div class="wide"><table><tr>'
            "<th>metric</th><th>decision</th><th>canary vs primary</th><th>ratio</th>"
            "<th>confidence sequence</th><th>fail above</th><th>pass below</th>"
            "<th>excess bound (tolerance)</th><th>e-value fail (needs)</th>"
            "<th>e-value pass (needs)</th><th>samples c / p</th><th>events c / p</th>"
            "<th>test</th></tr>"
        )
        for row in r.metrics:
            out.append(
                f"<tr><td>{_e(row.name)}{' <small>(critical)</small>' if row.critical else ''}"
                + (
                    f"<br><small>slower than {_e(_fmt_seconds(row.threshold_s))}</small>"
                    if row.threshold_s is not None
                    else ""
                )
                + f'</td><td class="{_e(row.decision)}">{_e(row.decision)}</td>'
                f'<td class="n">{_e(_pct(row.rate_canary))} vs {_e(_pct(row.rate_primary))}</td>'
                f'<td class="n">{_e(_num(row.estimate))}</td>'
                f'<td class="n">[{_e(_num(row.lower))}, {_e(_num(row.upper))}] '
                f"@ {_e(_conf(row.alpha))}</td>"
                f'<td class="n">{_e(_num(row.fail_ratio))}</td>'
                f'<td class="n">{_e(_num(row.pass_below))}</td>'
                f'<td class="n">{_e(_pct(row.abs_excess_upper))} '
                f"({_e(_pct(row.abs_tolerance))})</td>"
                f'<td class="n">{_e(_num(row.e_value_fail))} ({_e(_num(row.fail_bar))})</td>'
                f'<td class="n">{_e(_num(row.e_value_pass))} ({_e(_num(row.pass_bar))})</td>'
                f'<td class="n">{_e(_num(row.samples_canary))} / '
                f"{_e(_num(row.samples_primary))}</td>"
                f'<td class="n">{_e(_num(row.events_canary))} / '
                f"{_e(_num(row.events_primary))}</td>"
                f"<td>{_e(row.test)}</td></tr>"
            )
            if row.reason:
                out.append(
                    f'<tr><td></td><td colspan="12"><small>{_e(row.reason)}</small></td></tr>'
                )
        out.append("</table></div>")

    p = r.plan
    out.append(
        '<h2 id="plan">Planner estimate against actual</h2><table>'
        "<tr><th>expected time to catch a regression</th><th>expected time to pass</th>"
        "<th>actual decision</th><th>after</th><th>rollout duration</th></tr>"
        f'<tr><td class="n">{_e(_duration(p.expected_fail_s))}</td>'
        f'<td class="n">{_e(_duration(p.expected_pass_s))}</td>'
        f"<td>{_e(p.actual_decision or 'none')}</td>"
        f'<td class="n">{_e(_duration(p.actual_decision_s))}</td>'
        f'<td class="n">{_e(_duration(p.duration_s))}</td></tr></table>'
    )

    out.append('<h2 id="timeline">Timeline</h2><table><tr><th>at</th><th>what</th><th></th></tr>')
    for event in r.timeline:
        out.append(
            f'<tr><td class="n">{_e(_duration(event.t_s))}</td><td>{_e(event.kind)}</td>'
            f"<td>{_e(event.text)}</td></tr>"
        )
    out.append("</table>")
    if r.step_spans:
        out.append(
            '<h2 id="steps">Steps</h2><table><tr><th>step</th><th>canary weight</th>'
            "<th>from</th><th>to</th><th>ticks</th></tr>"
        )
        for span in r.step_spans:
            out.append(
                f'<tr><td class="n">{span.step}</td><td class="n">{span.weight}%</td>'
                f'<td class="n">{_e(_duration(span.from_s))}</td>'
                f'<td class="n">{_e(_duration(span.to_s))}</td>'
                f'<td class="n">{span.ticks}</td></tr>'
            )
        out.append("</table>")

    out.append('<h2 id="manual">Manual actions and failovers</h2>')
    if not r.manual_actions and not r.failovers:
        out.append("<p>None.</p>")
    else:
        out.append(
            "<table><tr><th>at</th><th>kind</th><th>who</th><th>what</th><th>reason</th></tr>"
        )
        for action in r.manual_actions:
            out.append(
                f'<tr><td class="n">{_e(_duration(action.t_s))}</td><td>manual</td>'
                f"<td>{_e(action.who)}</td><td>{_e(action.command)}</td>"
                f"<td>{_e(action.reason)}</td></tr>"
            )
        for fo in r.failovers:
            out.append(
                f'<tr><td class="n">{_e(_duration(fo.t_s))}</td><td>failover</td>'
                f"<td>{_e(fo.who)}</td><td>{_e(fo.direction)}"
                f"{' (forced)' if fo.forced else ''}</td><td>{_e(fo.reason)}</td></tr>"
            )
        out.append("</table>")

    if r.notes:
        out.append('<h2 id="notes">Notes</h2><ul>')
        for note in r.notes:
            when = f"{_duration(note.t_s)}: " if note.t_s is not None else ""
            icon = "⚠ " if note.level == "warning" else ""
            out.append(f"<li>{_e(icon + when + note.message)}</li>")
        out.append("</ul>")

    if r.config:
        out.append(
            '<h2 id="config">Settings in force</h2><pre><code>'
            + _e(json.dumps(_json_safe(r.config), indent=2, sort_keys=True))
            + "</code></pre>"
        )
    out.append(
        f"<footer>report schema {r.report_schema}"
        + (f" · {_e(generated_note)}" if generated_note else "")
        + "</footer></main></body></html>"
    )
    return "\n".join(out) + "\n"


def _utc(unix: float) -> str:
    # datetime is pure; only formatting, no clock read.
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
