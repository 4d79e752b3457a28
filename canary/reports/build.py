"""Record entries -> the `Report` model: what happened, what decided it, and when.

The record (canary/core/records.py) already holds every tick; `build_report` turns it into one
`Report` value: the outcome and the metric (or the person, or the failover) that decided it,
per-tick and per-metric series, step spans, a timeline and notes (counter resets, ticks
without data, a router that reads back another weight than was set).

Secrets (URL credentials, tokens) in an entry are masked on the way in
(canary.core.redact), so no format can show them, whatever the record holds.

Pure: it takes record entries as plain JSON objects (what `canary.core.records.dump_entry`
writes, one dict per line). The entry shapes are mirrored here as tolerant light models that
ignore fields they do not know (the record schema may grow); they date from when this code
lived in analysis/, which may not import canary.

Errors::

    ReportError          the record cannot be turned into a report; the message says why
                         ("record has no start entry", "entry 4 (tick): ...").

A record without an `end` entry (rollout still running, or controller stopped) is not an
error by default: the report is built from what is there and marked incomplete.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from analysis.types import ArmCounts, Decision, MetricResult, Verdict
from canary.core.redact import redact
from canary.reports.formatting import fmt_conf, fmt_duration, fmt_num, fmt_pct
from canary.reports.model import (
    ArmPoint,
    ArmTotals,
    Decided,
    DecidingMetric,
    FailoverAction,
    ManualAction,
    MetricPoint,
    MetricRow,
    MetricSeries,
    Plan,
    Report,
    ReportError,
    ReportNote,
    StepSpan,
    TickPoint,
    TimelineEvent,
)

__all__ = ["build_report", "histogram_quantile"]

_QUANTILES = (0.5, 0.9, 0.99)


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
    plan: dict[str, float | None] = Field(default_factory=dict)  # advice notes only


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
            # Records written before redaction (or by another writer) may hold credentials.
            parsed.append(model.model_validate(redact(dict(raw))))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "entry"
            raise ReportError(f"entry {index} ({kind}): {where}: {first['msg']}") from None
    return parsed


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
        claim = f"ratio above {fmt_num(threshold)}"
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
            claim = f"excess rate below {fmt_pct(threshold)}"
        else:
            route, threshold = "ratio", 1.0 + chosen.tolerance
            claim = f"ratio below {fmt_num(threshold)}"
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


def _metric_sentence(metric: DecidingMetric) -> str:
    rates = ""
    if metric.rate_canary is not None and metric.rate_primary is not None:
        rates = f"canary {fmt_pct(metric.rate_canary)} vs primary {fmt_pct(metric.rate_primary)}, "
    head = f"{metric.name}: {rates}"
    if metric.estimate is not None or metric.lower is not None:
        head += (
            f"ratio {fmt_num(metric.estimate)} ({fmt_conf(1 - metric.confidence)} "
            f"CS [{fmt_num(metric.lower)}, {fmt_num(metric.upper)}])"
        )
    else:
        head += "no events in either arm yet"
    if metric.route == "absolute":
        return (
            f"{head}; the canary's excess rate is at most {fmt_pct(metric.excess_bound)}, "
            f"below the tolerance of {fmt_pct(metric.threshold)} ({metric.test})"
        )
    return (
        f"{head}; evidence of a {metric.claim}: e-value {fmt_num(metric.e_value)} ≥ "
        f"{fmt_num(metric.evidence_bar)} ({metric.test})"
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


def _gate_event(t_s: float, text: str) -> TimelineEvent:
    """A gate's answer on the timeline; a load-test rollout hook's (canary.notify.gates names
    the load in its answer: "rollout: open (load test: ...; HTTP 200)") as the load test it
    is: "load test: 50 req/s to H for 30s, open (HTTP 200)"."""
    result, _, detail = text.removeprefix("rollout: ").partition(" (")
    load, _, answer = detail.removesuffix(")").partition("; ")
    if not (text.startswith("rollout: ") and load.startswith("load test: ") and answer):
        return TimelineEvent(t_s=t_s, kind="gate", text=text)
    return TimelineEvent(t_s=t_s, kind="load", text=f"{load}, {result} ({answer})")


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
                                f"{fmt_num(before.requests)} to {fmt_num(now.requests)}"
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
            if entry.message.startswith("gate "):  # a gate's answer (noted when it changes)
                timeline.append(_gate_event(t_s, entry.message.removeprefix("gate ")))
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
    observed = [
        e.plan for e in b.others if isinstance(e, _Note) and (e.plan.get("elapsed_s") or 0.0) > 0
    ]
    latest = observed[-1] if observed else {}
    plan = Plan(
        expected_fail_s=_finite(start.plan.get("expected_fail_s")),
        expected_pass_s=_finite(start.plan.get("expected_pass_s")),
        likely_pass_s=_finite(start.plan.get("likely_pass_s")),
        observed_expected_pass_s=_finite(latest.get("expected_pass_s")),
        observed_likely_pass_s=_finite(latest.get("likely_pass_s")),
        observed_after_s=_finite(latest.get("elapsed_s")),
        observed_canary_rps=_finite(latest.get("canary_rps")),
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
        summary = f"{outcome} after {fmt_duration(tick.elapsed_s)} of analysis"
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
