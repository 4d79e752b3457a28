"""The report of one rollout: one frozen value that every format renders.

`build.build_report` makes a `Report` from a record; `markdown`, `html` (with `charts`) and
`jsondoc` render it. Its JSON form is versioned by `REPORT_SCHEMA`.

Errors::

    ReportError          the record cannot be turned into a report; the message says why
                         ("record has no start entry", "entry 4 (tick): ...").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "REPORT_SCHEMA",
    "ArmPoint",
    "ArmTotals",
    "Decided",
    "DecidingMetric",
    "FailoverAction",
    "ManualAction",
    "MetricPoint",
    "MetricRow",
    "MetricSeries",
    "Plan",
    "Report",
    "ReportError",
    "ReportNote",
    "StepSpan",
    "TickPoint",
    "TimelineEvent",
]

REPORT_SCHEMA = 1


class ReportError(ValueError):
    """A record that cannot be turned into a report; the message names what is wrong."""


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
    """The planner's estimates against what happened: at the start (from the expected
    traffic, StartEntry.plan) and the latest from the observed rates (an advice note)."""

    expected_fail_s: float | None
    expected_pass_s: float | None
    likely_pass_s: float | None = None  # 95% of good canaries pass by then
    observed_expected_pass_s: float | None = None
    observed_likely_pass_s: float | None = None
    observed_after_s: float | None = None  # analysis seconds of counts it was made from
    observed_canary_rps: float | None = None
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
