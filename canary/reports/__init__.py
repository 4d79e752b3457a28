"""Reports: a record becomes a report model, then Markdown, HTML (with SVG charts) or JSON.

Why: the controller decides on its own, so every promotion and rollback must be explainable
after the fact (Flagger #1810/#1815, Argo Rollouts #404/#559, Kayenta #521 are users asking
for exactly this). The modules, each importing only those listed above it:

    formatting   how numbers, shares and durations are written (every format); HTML escaping
    model        the `Report` value that every format renders, and `ReportError`
    build        record entries -> `Report`: the outcome, what decided it, series, timeline
    charts       `Report` -> inline SVG charts (model <- charts <- html)
    html         `Report` -> one self-contained HTML page with those charts
    markdown     `Report` -> a compact summary for PR comments and chat
    jsondoc      `Report` -> stable, versioned JSON
    pages        record discovery and the /reports/ routes (`canary report` is canary.cli.report)
    cluster      the /reports/ routes of `canary kubernetes`: records read from their ConfigMaps

All but ``pages`` and ``cluster`` are pure, from record entries to text. Callers import the public names from
here (``from canary.reports import build_report, render_html``); this ``__init__`` never
imports ``pages``, which imports from it.

May import: ``canary.core`` (the record schema; ``redact``, which ``build`` applies to every
entry so no format shows a secret), ``analysis`` types; never the runner or a
supervisor except through ``pages``.
"""

from canary.reports.build import build_report, histogram_quantile
from canary.reports.html import render_html
from canary.reports.jsondoc import render_json
from canary.reports.markdown import render_markdown
from canary.reports.model import REPORT_SCHEMA, Report, ReportError

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
