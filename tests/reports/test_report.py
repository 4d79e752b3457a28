"""Reports built from records of simulated rollouts judged by the real Analyzer."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from support.report_records import Scenario, external_references, simulate

from canary.reports import (
    REPORT_SCHEMA,
    Report,
    ReportError,
    build_report,
    histogram_quantile,
    render_html,
    render_json,
    render_markdown,
)

# Fixed seeds: the same counts, hence the same verdicts, on every run.
PROMOTED = Scenario(seed=11, canary_error_rate=0.01, manual_pause_at_tick=3)
ROLLED_BACK = Scenario(seed=12, canary_error_rate=0.014, failover_at_tick=2)


@pytest.fixture(scope="module")
def promoted() -> list[dict[str, Any]]:
    entries = simulate(PROMOTED)
    assert entries[-1]["kind"] == "end" and entries[-1]["outcome"] == "promoted", entries[-1]
    return entries


@pytest.fixture(scope="module")
def rolled_back() -> list[dict[str, Any]]:
    entries = simulate(ROLLED_BACK)
    assert entries[-1]["kind"] == "end" and entries[-1]["outcome"] == "rolled_back", entries[-1]
    return entries


def _ticks(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["kind"] == "tick"]


def _deciding_tick(entries: list[dict[str, Any]], decision: str) -> dict[str, Any]:
    """The first verdict with this decision: pass and fail are stopping events."""
    return next(t for t in _ticks(entries) if t["verdict"]["decision"] == decision)


# --- outcome, decision and numbers -------------------------------------------------------


def test_promoted_report_names_the_metric_that_decided(promoted: list[dict[str, Any]]) -> None:
    """A promotion is explained by the metric that passed last, at the first pass verdict,
    with its numbers and pass route taken from that verdict in the record."""
    report = build_report(promoted)
    assert report.outcome == "promoted" and report.complete and report.incomplete_reason is None
    assert report.decided.by == "analysis"
    metric = report.decided.metric
    assert metric is not None and metric.decision == "pass"
    tick = _deciding_tick(promoted, "pass")
    ticks = _ticks(promoted)
    before = ticks[ticks.index(tick) - 1]["verdict"]["metrics"]
    assert before[metric.name]["decision"] != "pass"  # it is the one that passed last
    recorded = tick["verdict"]["metrics"][metric.name]
    assert metric.e_value == recorded["e_value_pass"]
    assert metric.estimate == recorded["estimate"] and metric.test == recorded["test"]
    assert (metric.lower, metric.upper) == (recorded["lower"], recorded["upper"])
    assert report.decided.at_s == tick["at"] - promoted[0]["at"]
    if metric.route == "ratio":
        assert metric.e_value >= metric.evidence_bar == pytest.approx(2 / recorded["pass_alpha"])
        assert metric.claim == f"ratio below {1 + recorded['tolerance']:g}"
    else:
        assert metric.route == "absolute"
        assert metric.excess_bound == recorded["extra"]["abs_excess_upper"]
        assert metric.excess_bound is not None and metric.excess_bound < metric.threshold
        assert metric.threshold == recorded["abs_tolerance"]
    assert report.decided.reasons == tick["verdict"]["reasons"]


def test_rolled_back_report_names_the_regression(rolled_back: list[dict[str, Any]]) -> None:
    """A rollback is explained by the failing critical metric with the most evidence: its
    rates, estimate, e-value against the bar it crossed, and test come from the record."""
    report = build_report(rolled_back)
    assert report.outcome == "rolled_back" and report.decided.by == "analysis"
    metric = report.decided.metric
    assert metric is not None and metric.decision == "fail" and metric.route == "fail"
    recorded = _deciding_tick(rolled_back, "fail")["verdict"]["metrics"][metric.name]
    assert recorded["critical"]
    assert metric.e_value == recorded["e_value_fail"] >= 1 / recorded["alpha"]
    assert metric.evidence_bar == pytest.approx(1 / recorded["alpha"])
    assert metric.estimate == recorded["estimate"]
    assert metric.rate_canary == recorded["extra"]["rate_canary"]
    assert metric.claim == f"ratio above {recorded['fail_ratio']:g}"
    assert metric.name in report.decided.summary and "rolled back" in report.decided.summary
    assert [f.direction for f in report.failovers] == ["to-standby"]
    assert any("primary cluster unhealthy" in n.message for n in report.notes)


@pytest.mark.parametrize("which", ["promoted", "rolled_back"])
def test_final_counts_series_and_table_match_the_record(
    which: str, request: pytest.FixtureRequest
) -> None:
    """Final counts, per-tick error rates and the metric table are the record's numbers."""
    entries: list[dict[str, Any]] = request.getfixturevalue(which)
    report = build_report(entries)
    ticks = _ticks(entries)
    last = ticks[-1]
    assert report.tick_count == len(ticks)
    assert report.final_primary is not None and report.final_canary is not None
    assert report.final_primary.requests == last["primary"]["requests"]
    assert report.final_canary.errors == last["canary"]["errors"]
    for point, tick in zip(report.ticks, ticks, strict=True):
        assert point.weight_set == tick["weight_set"]
        assert point.primary is not None and point.canary is not None
        assert point.canary.error_rate == pytest.approx(
            tick["canary"]["errors"] / tick["canary"]["requests"]
        )
    assert [m.name for m in report.metrics] == list(last["verdict"]["metrics"])
    for row in report.metrics:
        recorded = last["verdict"]["metrics"][row.name]
        assert (row.e_value_fail, row.e_value_pass) == (
            recorded["e_value_fail"],
            recorded["e_value_pass"],
        )
        assert row.samples_canary == recorded["samples_canary"]
        assert row.pass_below == pytest.approx(1 + recorded["tolerance"])
        assert row.fail_ratio == recorded["fail_ratio"]
    # every metric has a band series over every tick with a verdict
    assert {s.name for s in report.metric_series} == set(last["verdict"]["metrics"])
    assert all(len(s.points) == len(ticks) for s in report.metric_series)


def test_timeline_has_steps_weights_and_manual_actions(promoted: list[dict[str, Any]]) -> None:
    """Steps, weights, transitions and the manual pause/resume are on the timeline, in
    time order, and the step spans follow the weights set."""
    report = build_report(promoted)
    kinds = [event.kind for event in report.timeline]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [t.t_s for t in report.timeline] == sorted(t.t_s for t in report.timeline)
    assert [a.command for a in report.manual_actions] == ["pause", "resume"]
    assert [s.weight for s in report.step_spans] == list(PROMOTED.steps)
    assert sum(s.ticks for s in report.step_spans) == report.tick_count
    weights = [e.text for e in report.timeline if e.kind == "weight"]
    assert weights == [f"step {i}: canary weight {w}%" for i, w in enumerate(PROMOTED.steps)]


def test_plan_is_compared_with_the_actual_decision(rolled_back: list[dict[str, Any]]) -> None:
    """The planner's estimates from the start entry sit next to the time the analysis
    actually took."""
    report = build_report(rolled_back)
    assert report.plan.expected_fail_s == rolled_back[0]["plan"]["expected_fail_s"]
    assert report.plan.actual_decision == "fail"
    assert report.plan.actual_decision_s == _deciding_tick(rolled_back, "fail")["elapsed_s"]
    assert report.plan.duration_s == rolled_back[-1]["duration_s"]


def test_plan_shows_the_estimate_from_observed_rates(promoted: list[dict[str, Any]]) -> None:
    """The runner's advice note from observed counts (canary.core.advice) sits beside the
    start estimate and the decision actually taken, in the model, the HTML and the Markdown."""
    from analysis import AnalysisConfig, ArmCounts, Snapshot
    from canary.core.advice import observed_advice
    from canary.core.records import NoteEntry, dump_entry

    entries = list(promoted)
    index, tick = next((i, e) for i, e in enumerate(entries) if e["kind"] == "tick")
    snapshot = Snapshot(
        elapsed_s=tick["elapsed_s"],
        primary=ArmCounts.model_validate(tick["primary"]),
        canary=ArmCounts.model_validate(tick["canary"]),
    )
    advice = observed_advice(
        snapshot, weight=tick["weight_set"], budget_s=900.0, config=AnalysisConfig()
    )
    note = NoteEntry(
        at=tick["at"] + 0.1,
        rollout=tick["rollout"],
        level=advice.level,
        message=advice.message,
        plan=advice.plan(),
    )
    entries.insert(index + 1, json.loads(dump_entry(note)))
    report = build_report(entries)
    assert report.plan.expected_pass_s == promoted[0]["plan"]["expected_pass_s"]
    assert report.plan.observed_after_s == tick["elapsed_s"]
    assert report.plan.observed_expected_pass_s == pytest.approx(advice.expected_pass_s)
    assert report.plan.observed_likely_pass_s == pytest.approx(advice.likely_pass_s)
    assert report.plan.observed_canary_rps == pytest.approx(advice.canary_rps)
    assert report.plan.actual_decision == "pass"
    assert any(n.message == advice.message for n in report.notes)
    markdown = render_markdown(report)
    assert f"from {tick['elapsed_s']:.0f}s of observed traffic" in markdown
    html = render_html(report)
    assert "of observed traffic" in html and "95% pass by" in html
    assert build_report(promoted).plan.observed_after_s is None  # no such note, no such row


# --- renderers ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["promoted", "rolled_back"])
def test_html_is_self_contained(which: str, request: pytest.FixtureRequest) -> None:
    """The HTML page refers to nothing outside itself: no URLs, scripts or imports."""
    page = render_html(build_report(request.getfixturevalue(which)))
    assert page.startswith("<!DOCTYPE html>")
    assert external_references(page) == []


def test_external_reference_scan_catches_what_it_should() -> None:
    """The scan used above flags remote images, stylesheets, scripts and CSS urls."""
    bad = [
        '<img src="https://cdn.example/x.png">',
        '<link href="//fonts.example.com/css">',
        "<style>body{background:url(/x.png)}</style>",
        "<script>1</script>",
        "<style>@import 'a.css';</style>",
    ]
    for snippet in bad:
        assert external_references(snippet), snippet
    assert external_references('<a href="#metrics">x</a><img src="data:image/png;base64,AA">') == []


@pytest.mark.parametrize("which", ["promoted", "rolled_back"])
def test_html_has_charts_with_series(which: str, request: pytest.FixtureRequest) -> None:
    """Weight, error-rate, latency, per-metric band and evidence charts are inline SVG with
    a line per arm, the confidence band and the threshold line."""
    report = build_report(request.getfixturevalue(which))
    page = render_html(report)
    ids = re.findall(r'<figure id="(chart-[^"]+)">', page)
    assert ids[:3] == ["chart-weight", "chart-errors", "chart-latency"]
    metric_ids = [f"chart-metric-{s.name}" for s in report.metric_series]
    assert ids[3 : 3 + len(metric_ids)] == metric_ids
    assert ids[3 + len(metric_ids) :] in (["chart-excess", "chart-evidence"], ["chart-evidence"])
    assert page.count("<svg") == len(ids)
    errors_chart = page.split('id="chart-errors"')[1].split("</figure>")[0]
    assert 'data-series="primary"' in errors_chart and 'data-series="canary"' in errors_chart
    for series in report.metric_series:
        chart = page.split(f'id="chart-metric-{series.name}"')[1].split("</figure>")[0]
        bounded = [p for p in series.points if p.lower is not None and p.upper is not None]
        assert ('<polygon class="band"' in chart) == (len(bounded) >= 2)
        assert f"pass below {series.pass_below:.2f}" in chart
    assert '<polygon class="band"' in page  # at least one metric has bounds to show
    # polylines carry real points, not an empty path
    points = re.findall(r'<polyline[^>]*points="([^"]+)"', page)
    assert points and all(len(p.split()) >= 2 for p in points)


def test_html_shows_the_record_numbers(rolled_back: list[dict[str, Any]]) -> None:
    """Outcome, final counts and the deciding e-value in the HTML are the record's."""
    report = build_report(rolled_back)
    page = render_html(report)
    last = _ticks(rolled_back)[-1]
    title = re.search(r"<title>(.*?)</title>", page)
    assert title is not None and "rolled back" in title.group(1)
    assert f"{round(last['primary']['requests']):,} / {round(last['primary']['errors']):,}" in page
    assert f"{round(last['canary']['requests']):,} / {round(last['canary']['errors']):,}" in page
    assert report.decided.metric is not None
    cell = re.search(r'id="deciding-evidence" data-e-value="([^"]+)">e-value ([\d,.]+)<', page)
    assert cell is not None
    assert float(cell.group(1)) == report.decided.metric.e_value
    assert float(cell.group(2).replace(",", "")) == pytest.approx(
        report.decided.metric.e_value, rel=0.01
    )
    assert "@media print" in page


def test_markdown_summarises_the_rollout(promoted: list[dict[str, Any]]) -> None:
    """The Markdown summary carries outcome, counts, each metric and the report link."""
    report = build_report(promoted)
    text = render_markdown(report, report_url="https://canary.example/reports/x")
    last = _ticks(promoted)[-1]
    assert text.startswith("### Canary demo/app: ✅ promoted")
    assert f"| primary | {round(last['primary']['requests']):,} |" in text
    for name in last["verdict"]["metrics"]:
        assert f"| {name}" in text
    assert "alice ran `pause`" in text
    assert text.rstrip().endswith("[Full report](https://canary.example/reports/x)")


def test_json_is_versioned_stable_and_round_trips(rolled_back: list[dict[str, Any]]) -> None:
    """JSON has report_schema 1 first, a fixed key order, the record's exact numbers, and
    parses back into the same Report."""
    report = build_report(rolled_back)
    text = render_json(report)
    data = json.loads(text)
    assert next(iter(data)) == "report_schema" and data["report_schema"] == REPORT_SCHEMA == 1
    assert list(data) == list(Report.model_fields)
    assert data["outcome"] == "rolled_back"
    assert data["final_canary"]["requests"] == _ticks(rolled_back)[-1]["canary"]["requests"]
    assert data["decided"]["metric"]["e_value"] == report.decided.metric.e_value  # type: ignore[union-attr]
    assert Report.model_validate(data) == report
    assert render_json(build_report(rolled_back)) == text  # deterministic


# --- broken and unusual records ----------------------------------------------------------


def test_empty_record_is_a_clear_error() -> None:
    """No entries at all: a ReportError saying so, not a traceback from deep inside."""
    with pytest.raises(ReportError, match="record is empty"):
        build_report([])


def test_record_without_start_is_a_clear_error(promoted: list[dict[str, Any]]) -> None:
    """A record cut at the front names the missing start entry."""
    with pytest.raises(ReportError, match="record has no start entry"):
        build_report(promoted[1:])


def test_truncated_record_renders_marked_incomplete() -> None:
    """A record that stops mid-rollout still renders everything it has, marked incomplete,
    and says at which tick it ends."""
    entries = simulate(Scenario(seed=13, canary_error_rate=0.01, truncate_after_tick=9))
    assert entries[-1]["kind"] == "tick"
    message = (
        "record ends at tick 9 without an end entry: "
        "the rollout is still running or the controller stopped"
    )
    report = build_report(entries)
    assert not report.complete and report.outcome == "incomplete"
    assert report.incomplete_reason == message and report.tick_count == 9
    page = render_html(report)
    assert 'id="incomplete"' in page and message in page and "<svg" in page
    assert message in render_markdown(report)
    assert json.loads(render_json(report))["complete"] is False
    with pytest.raises(ReportError, match=re.escape(message)):
        build_report(entries, allow_incomplete=False)


def test_record_with_only_a_start_renders() -> None:
    """A rollout that has just started: a report with no ticks and empty charts."""
    start = simulate(Scenario(seed=14, canary_error_rate=0.01, truncate_after_tick=1))[0]
    report = build_report([start])
    assert report.incomplete_reason is not None and "ends at its start entry" in (
        report.incomplete_reason
    )
    page = render_html(report)
    assert "no data" in page and external_references(page) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.__setitem__(1, {**e[1], "kind": "tock"}), "entry 2 has kind 'tock'"),
        (
            lambda e: e.__setitem__(1, {**e[1], "weight_set": "lots"}),
            r"entry 2 \(tick\): weight_set",
        ),
        (lambda e: e.__setitem__(1, 42), "entry 2 is a int"),
        (lambda e: e.append({**e[0]}), "2 start entries"),
        (lambda e: e.__setitem__(1, {**e[1], "rollout": "other@1"}), "record mixes rollouts"),
    ],
)
def test_malformed_record_names_the_entry(
    promoted: list[dict[str, Any]], mutate: Any, message: str
) -> None:
    """A bad entry is reported by its position and field."""
    entries = [dict(e) for e in promoted]
    mutate(entries)
    with pytest.raises(ReportError, match=message):
        build_report(entries)


def test_counter_reset_no_data_and_weight_mismatch_become_notes(
    promoted: list[dict[str, Any]],
) -> None:
    """Counters going backwards, ticks without data and a weight that did not take are
    called out as notes, and charts break their lines at the gap."""
    entries = [dict(e) for e in promoted]
    ticks = [i for i, e in enumerate(entries) if e["kind"] == "tick"]
    reset = entries[ticks[4]]
    entries[ticks[4]] = {
        **reset,
        "primary": {
            **reset["primary"],
            "requests": 10.0,
            "errors": 0.0,
            "latency_buckets": {"inf": 10.0},
        },
    }
    entries[ticks[2]] = {
        **entries[ticks[2]],
        "primary": None,
        "canary": None,
        "no_data_reason": "prometheus unreachable: connection refused",
        "verdict": None,
    }
    entries[ticks[3]] = {**entries[ticks[3]], "weight_read": 0}
    report = build_report(entries)
    messages = [n.message for n in report.notes]
    assert any(
        m.startswith("counter reset at tick 5: primary requests went from") for m in messages
    )
    assert any("1 of" in m and "prometheus unreachable" in m for m in messages)
    assert "tick 4: router reported 0% to the canary, 10% was set" in messages
    assert report.no_data_ticks == 1
    page = render_html(report)
    errors_chart = page.split('id="chart-errors"')[1].split("</figure>")[0]
    assert errors_chart.count('data-series="primary"') == 2  # one line before, one after the gap


def test_manual_promotion_is_decided_by_hand(promoted: list[dict[str, Any]]) -> None:
    """When a person promoted before the analysis passed, the report says so."""
    cut = next(i for i, e in enumerate(promoted) if e["kind"] == "tick" and e["elapsed_s"] > 20)
    at = promoted[cut]["at"] + 0.5
    entries = [
        *promoted[: cut + 1],
        {
            **promoted[1],
            "kind": "manual",
            "at": at,
            "command": "promote",
            "who": "bob",
            "reason": "hotfix",
        },
        {
            **promoted[-1],
            "at": at + 1,
            "reason": "promoted by hand",
            "duration_s": at + 1 - promoted[0]["at"],
        },
    ]
    entries = [
        {k: v for k, v in e.items() if k not in ("elapsed_s", "phase", "step")}
        if e["kind"] in ("manual", "end")
        else e
        for e in entries
    ]
    report = build_report(entries)
    assert report.decided.by == "manual"
    assert report.decided.summary == "promoted by hand: bob ran promote (hotfix)"


def test_unknown_fields_from_a_newer_writer_are_ignored(promoted: list[dict[str, Any]]) -> None:
    """Fields added to the record schema later do not break reports of it."""
    entries = [{**e, "added_later": {"x": 1}} for e in promoted]
    assert build_report(entries).outcome == "promoted"


# --- quantiles -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.1),
        (0.75, {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.15),
        (0.25, {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.05),  # first bucket from 0
        (0.99, {0.1: 50.0, 0.2: 90.0, math.inf: 100.0}, 0.2),  # +Inf: highest finite bound
        (0.5, {math.inf: 0.0}, None),
        (0.5, {}, None),
        (0.5, {0.1: 5.0}, None),  # no +Inf bucket: not a Prometheus histogram
    ],
)
def test_histogram_quantile_matches_prometheus(
    q: float, buckets: dict[float, float], expected: float | None
) -> None:
    """Quantiles from cumulative buckets interpolate as Prometheus' histogram_quantile."""
    result = histogram_quantile(q, buckets)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_histogram_quantile_rejects_a_bad_quantile() -> None:
    """A quantile outside 0..1 is an error naming the value."""
    with pytest.raises(ValueError, match=r"quantile must be within 0\.\.1, got 1\.5"):
        histogram_quantile(1.5, {math.inf: 1.0})
