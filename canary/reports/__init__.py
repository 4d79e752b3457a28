"""Reports: a record becomes a report model, then Markdown, HTML (with SVG charts) or JSON.

Pure from record entries to text; ``pages`` adds the record discovery, the `canary report`
command and the /reports/ routes. Callers import the public names from here
(``from canary.reports import build_report``); this ``__init__`` never imports ``pages``,
which imports from it. May import: ``canary.core`` (the record schema), ``analysis`` types;
never the runner or a supervisor except through ``pages``.
"""

from canary.reports.report import (
    REPORT_SCHEMA,
    Report,
    ReportError,
    build_report,
    histogram_quantile,
    render_html,
    render_json,
    render_markdown,
)

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
