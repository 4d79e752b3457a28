"""A report as a compact Markdown summary for PR comments and chat (`render_markdown`).

Markdown passes raw HTML through, and every text here comes from a record (reasons, notes,
who ran a command, versions): each is written through `_md`, which escapes HTML and the
characters that would start a link or a code span, so a record cannot inject markup.
"""

from __future__ import annotations

import html

from canary.reports.formatting import fmt_conf, fmt_duration, fmt_num, fmt_pct
from canary.reports.model import Report

__all__ = ["render_markdown"]

_OUTCOME_WORDS = {
    "promoted": "✅ promoted",
    "rolled_back": "❌ rolled back",
    "aborted": "⏹ aborted",
    "superseded": "↪ superseded",
    "incomplete": "⏳ incomplete",
}


def _md(text: object) -> str:
    """Record text as inert Markdown: no HTML, no links, no code spans, one line."""
    escaped = html.escape(str(text), quote=False)
    for char in "\\`[]":
        escaped = escaped.replace(char, "\\" + char)
    return escaped.replace("\r", " ").replace("\n", " ")


def _md_cell(text: object) -> str:
    return _md(text).replace("|", "\\|")


def _code(text: str) -> str:
    """Record text in a code span (shown literally, so no escaping but of backticks)."""
    return "`" + text.replace("`", "'").replace("\n", " ") + "`"


def render_markdown(report: Report, *, report_url: str | None = None) -> str:
    """A compact Markdown summary for PR comments and chat."""
    r = report
    lines = [
        f"### Canary {_md(r.target)}: {_md(_OUTCOME_WORDS.get(r.outcome, r.outcome))}",
        "",
        f"**{_md(r.primary_version or '?')} → {_md(r.canary_version or '?')}** · "
        f"rollout {_code(r.rollout)} · "
        f"duration {fmt_duration(r.duration_s)} · {r.tick_count} ticks",
        "",
    ]
    if r.incomplete_reason:
        lines += [f"> ⚠️ Incomplete: {_md(r.incomplete_reason)}", ""]
    lines += [f"**Decision:** {_md(r.decided.summary)}", ""]
    if r.final_primary and r.final_canary:
        lines += [
            "| arm | requests | errors | error rate |",
            "|---|---:|---:|---:|",
            f"| primary | {fmt_num(r.final_primary.requests)} | {fmt_num(r.final_primary.errors)} | "
            f"{fmt_pct(r.final_primary.error_rate)} |",
            f"| canary | {fmt_num(r.final_canary.requests)} | {fmt_num(r.final_canary.errors)} | "
            f"{fmt_pct(r.final_canary.error_rate)} |",
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
                f"| {_md_cell(m.name)}{' (critical)' if m.critical else ''} | "
                f"{_md_cell(m.decision)} | "
                f"{fmt_pct(m.rate_canary)} vs {fmt_pct(m.rate_primary)} | {fmt_num(m.estimate)} "
                f"[{fmt_num(m.lower)}, {fmt_num(m.upper)}] @ {fmt_conf(m.alpha)} | "
                f"{fmt_num(m.fail_ratio)} / {fmt_num(m.pass_below)} | "
                f"{fmt_num(m.e_value_fail)} ({fmt_num(m.fail_bar)}) | "
                f"{fmt_num(m.e_value_pass)} ({fmt_num(m.pass_bar)}) | "
                f"{fmt_pct(m.abs_excess_upper)} ({fmt_pct(m.abs_tolerance)}) | "
                f"{fmt_num(m.samples_canary)} / {fmt_num(m.samples_primary)} | {_md_cell(m.test)} |"
            )
        lines.append("")
    observed = (
        f"from {fmt_duration(r.plan.observed_after_s)} of observed traffic "
        f"({fmt_num(r.plan.observed_canary_rps)} canary req/s), to pass in "
        f"{fmt_duration(r.plan.observed_expected_pass_s)} (95% by "
        f"{fmt_duration(r.plan.observed_likely_pass_s)}); "
        if r.plan.observed_after_s is not None
        else ""
    )
    lines += [
        f"**Plan:** expected to catch a regression in {fmt_duration(r.plan.expected_fail_s)}, "
        f"to pass in {fmt_duration(r.plan.expected_pass_s)}; "
        + observed
        + (
            f"decided {r.plan.actual_decision} after {fmt_duration(r.plan.actual_decision_s)}."
            if r.plan.actual_decision
            else "no analysis decision."
        ),
        "",
    ]
    if r.step_spans:
        steps = ", ".join(f"{s.weight}% ({fmt_duration(s.to_s - s.from_s)})" for s in r.step_spans)
        lines += [f"**Steps:** {steps}", ""]
    if r.manual_actions:
        lines.append("**Manual actions:**")
        lines += [
            f"- {fmt_duration(a.t_s)}: {_md(a.who)} ran {_code(a.command)}"
            + (f" ({_md(a.reason)})" if a.reason else "")
            for a in r.manual_actions
        ]
        lines.append("")
    if r.failovers:
        lines.append("**Failovers:**")
        lines += [
            f"- {fmt_duration(f.t_s)}: {_md(f.direction)} by {_md(f.who)}"
            f"{' (forced)' if f.forced else ''}: {_md(f.reason)}"
            for f in r.failovers
        ]
        lines.append("")
    if r.notes:
        lines.append("**Notes:**")
        lines += [
            f"- {'⚠️ ' if n.level == 'warning' else ''}"
            + (f"{fmt_duration(n.t_s)}: " if n.t_s is not None else "")
            + _md(n.message)
            for n in r.notes
        ]
        lines.append("")
    if report_url:
        lines += [f"[Full report]({report_url})", ""]
    return "\n".join(lines)
