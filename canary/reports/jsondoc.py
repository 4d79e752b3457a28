"""A report as stable, versioned JSON for machines (`render_json`).

Top-level "report_schema" (`model.REPORT_SCHEMA`), fields in the model's order, non-finite
numbers as null.
"""

from __future__ import annotations

import json

from canary.reports.formatting import json_safe
from canary.reports.model import Report

__all__ = ["render_json"]


def render_json(report: Report) -> str:
    """Stable, versioned JSON for machines: top-level "report_schema", fields in a fixed
    order, non-finite numbers as null."""
    data = report.model_dump(mode="json")
    return json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
