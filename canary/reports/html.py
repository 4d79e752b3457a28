"""A report as one self-contained HTML page (`render_html`).

Inline CSS and SVG charts (`charts`), no scripts, no network requests (a Content-Security-
Policy forbids them), and print CSS so the page prints as a document.
"""

from __future__ import annotations

import json

from canary.reports.charts import render_charts
from canary.reports.formatting import (
    escape,
    fmt_conf,
    fmt_duration,
    fmt_num,
    fmt_pct,
    fmt_seconds,
    json_safe,
)
from canary.reports.model import Report

__all__ = ["render_html"]

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
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Canary {escape(r.target)}: {escape(r.primary_version or '?')} → "
        f"{escape(r.canary_version or '?')}</h1>",
        f'<p class="sub">rollout <code>{escape(r.rollout)}</code> · started '
        f"{escape(_utc(r.started_at))} · duration {escape(fmt_duration(r.duration_s))} · "
        f"{r.tick_count} ticks</p>",
        f'<div class="banner {escape(r.outcome)}" id="outcome"><b>{escape(outcome_text)}</b> — '
        f"{escape(r.decided.summary)}</div>",
    ]
    if r.incomplete_reason:
        out.append(
            f'<div class="warn" id="incomplete"><b>Incomplete record:</b> '
            f"{escape(r.incomplete_reason)}. This report shows what it has.</div>"
        )
    if r.end_reason and r.decided.by not in ("controller", "analysis"):  # else said above
        out.append(f"<p><b>Controller:</b> {escape(r.end_reason)}</p>")

    cards = [
        ("outcome", outcome_text),
        ("decided by", r.decided.by),
        ("duration", fmt_duration(r.duration_s)),
        ("steps", " → ".join(f"{w}%" for w in r.steps)),
    ]
    if r.final_primary:
        cards.append(
            (
                "primary requests / errors",
                f"{fmt_num(r.final_primary.requests)} / {fmt_num(r.final_primary.errors)}",
            )
        )
    if r.final_canary:
        cards.append(
            (
                "canary requests / errors",
                f"{fmt_num(r.final_canary.requests)} / {fmt_num(r.final_canary.errors)}",
            )
        )
    out.append(
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )

    out.append('<h2 id="decision">What decided, and why</h2>')
    d = r.decided
    out.append(f"<p>{escape(d.summary)}</p>")
    if d.metric is not None:
        m = d.metric
        evidence = (
            f"excess ≤ {fmt_pct(m.excess_bound)}"
            if m.route == "absolute"
            else f"e-value {fmt_num(m.e_value)}"
        )
        needed = fmt_pct(m.threshold) if m.route == "absolute" else fmt_num(m.evidence_bar)
        out.append(
            "<table><tr><th>deciding metric</th><th>canary vs primary</th><th>ratio</th>"
            "<th>confidence sequence</th><th>shown</th><th>evidence</th><th>needed</th>"
            "<th>events / samples canary</th><th>events / samples primary</th><th>test</th></tr>"
            f'<tr><td class="{escape(m.decision)}">{escape(m.name)}</td>'
            f'<td class="n">{escape(fmt_pct(m.rate_canary))} vs {escape(fmt_pct(m.rate_primary))}</td>'
            f'<td class="n">{escape(fmt_num(m.estimate))}</td>'
            f'<td class="n">[{escape(fmt_num(m.lower))}, {escape(fmt_num(m.upper))}] '
            f"@ {escape(fmt_conf(1 - m.confidence))}</td><td>{escape(m.claim)}</td>"
            f'<td class="n" id="deciding-evidence" data-e-value="{m.e_value!r}">'
            f'{escape(evidence)}</td><td class="n">{escape(needed)}</td>'
            f'<td class="n">{escape(fmt_num(m.events_canary))} / {escape(fmt_num(m.samples_canary))}</td>'
            f'<td class="n">{escape(fmt_num(m.events_primary))} / {escape(fmt_num(m.samples_primary))}</td>'
            f"<td>{escape(m.test)}</td></tr></table>"
        )
        if d.also:
            out.append(f"<p>Also {escape(m.decision)}: {escape(', '.join(d.also))}.</p>")
    if d.reasons:
        out.append(
            '<ul class="reasons">' + "".join(f"<li>{escape(x)}</li>" for x in d.reasons) + "</ul>"
        )

    out.append('<h2 id="charts">Over time</h2><div class="charts">')
    out += render_charts(r)
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
                f"<tr><td>{escape(row.name)}{' <small>(critical)</small>' if row.critical else ''}"
                + (
                    f"<br><small>slower than {escape(fmt_seconds(row.threshold_s))}</small>"
                    if row.threshold_s is not None
                    else ""
                )
                + f'</td><td class="{escape(row.decision)}">{escape(row.decision)}</td>'
                f'<td class="n">{escape(fmt_pct(row.rate_canary))} vs {escape(fmt_pct(row.rate_primary))}</td>'
                f'<td class="n">{escape(fmt_num(row.estimate))}</td>'
                f'<td class="n">[{escape(fmt_num(row.lower))}, {escape(fmt_num(row.upper))}] '
                f"@ {escape(fmt_conf(row.alpha))}</td>"
                f'<td class="n">{escape(fmt_num(row.fail_ratio))}</td>'
                f'<td class="n">{escape(fmt_num(row.pass_below))}</td>'
                f'<td class="n">{escape(fmt_pct(row.abs_excess_upper))} '
                f"({escape(fmt_pct(row.abs_tolerance))})</td>"
                f'<td class="n">{escape(fmt_num(row.e_value_fail))} ({escape(fmt_num(row.fail_bar))})</td>'
                f'<td class="n">{escape(fmt_num(row.e_value_pass))} ({escape(fmt_num(row.pass_bar))})</td>'
                f'<td class="n">{escape(fmt_num(row.samples_canary))} / '
                f"{escape(fmt_num(row.samples_primary))}</td>"
                f'<td class="n">{escape(fmt_num(row.events_canary))} / '
                f"{escape(fmt_num(row.events_primary))}</td>"
                f"<td>{escape(row.test)}</td></tr>"
            )
            if row.reason:
                out.append(
                    f'<tr><td></td><td colspan="12"><small>{escape(row.reason)}</small></td></tr>'
                )
        out.append("</table></div>")

    p = r.plan
    out.append(
        '<h2 id="plan">Planner estimate against actual</h2><table>'
        "<tr><th>estimate</th><th>expected time to catch a regression</th>"
        "<th>expected time to pass</th><th>95% pass by</th>"
        "<th>actual decision</th><th>after</th><th>rollout duration</th></tr>"
        "<tr><td>at start (expected traffic)</td>"
        f'<td class="n">{escape(fmt_duration(p.expected_fail_s))}</td>'
        f'<td class="n">{escape(fmt_duration(p.expected_pass_s))}</td>'
        f'<td class="n">{escape(fmt_duration(p.likely_pass_s))}</td>'
        f"<td>{escape(p.actual_decision or 'none')}</td>"
        f'<td class="n">{escape(fmt_duration(p.actual_decision_s))}</td>'
        f'<td class="n">{escape(fmt_duration(p.duration_s))}</td></tr>'
    )
    if p.observed_after_s is not None:
        out.append(
            f"<tr><td>from {escape(fmt_duration(p.observed_after_s))} of observed traffic "
            f"({escape(fmt_num(p.observed_canary_rps))} canary req/s)</td><td></td>"
            f'<td class="n">{escape(fmt_duration(p.observed_expected_pass_s))}</td>'
            f'<td class="n">{escape(fmt_duration(p.observed_likely_pass_s))}</td>'
            "<td></td><td></td><td></td></tr>"
        )
    out.append("</table>")

    out.append('<h2 id="timeline">Timeline</h2><table><tr><th>at</th><th>what</th><th></th></tr>')
    for event in r.timeline:
        out.append(
            f'<tr><td class="n">{escape(fmt_duration(event.t_s))}</td><td>{escape(event.kind)}</td>'
            f"<td>{escape(event.text)}</td></tr>"
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
                f'<td class="n">{escape(fmt_duration(span.from_s))}</td>'
                f'<td class="n">{escape(fmt_duration(span.to_s))}</td>'
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
                f'<tr><td class="n">{escape(fmt_duration(action.t_s))}</td><td>manual</td>'
                f"<td>{escape(action.who)}</td><td>{escape(action.command)}</td>"
                f"<td>{escape(action.reason)}</td></tr>"
            )
        for fo in r.failovers:
            out.append(
                f'<tr><td class="n">{escape(fmt_duration(fo.t_s))}</td><td>failover</td>'
                f"<td>{escape(fo.who)}</td><td>{escape(fo.direction)}"
                f"{' (forced)' if fo.forced else ''}</td><td>{escape(fo.reason)}</td></tr>"
            )
        out.append("</table>")

    if r.notes:
        out.append('<h2 id="notes">Notes</h2><ul>')
        for note in r.notes:
            when = f"{fmt_duration(note.t_s)}: " if note.t_s is not None else ""
            icon = "⚠ " if note.level == "warning" else ""
            out.append(f"<li>{escape(icon + when + note.message)}</li>")
        out.append("</ul>")

    if r.config:
        out.append(
            '<h2 id="config">Settings in force</h2><pre><code>'
            + escape(json.dumps(json_safe(r.config), indent=2, sort_keys=True))
            + "</code></pre>"
        )
    out.append(
        f"<footer>report schema {r.report_schema}"
        + (f" · {escape(generated_note)}" if generated_note else "")
        + "</footer></main></body></html>"
    )
    return "\n".join(out) + "\n"


def _utc(unix: float) -> str:
    # datetime is pure; only formatting, no clock read.
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
