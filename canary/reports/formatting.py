"""How a report writes numbers, shares and durations: the same in every format.

The decision sentence (written while building the model), the Markdown, the HTML page and the
charts' axes all format through these, so "1.2%" or "3m05s" reads the same everywhere. Also
the HTML escaping used by the page and its SVG charts, and JSON-safe values (non-finite
numbers as null). Pure; imports nothing from canary.
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = [
    "escape",
    "fmt_conf",
    "fmt_duration",
    "fmt_num",
    "fmt_pct",
    "fmt_seconds",
    "json_safe",
]


def fmt_num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    if abs(value) >= 10 ** (digits - 1) or float(value).is_integer():
        return f"{round(value):,}"
    return f"{value:.{digits}g}"


def fmt_duration(seconds: float | None) -> str:
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


def fmt_pct(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.3g}%"


def fmt_conf(alpha: float) -> str:
    return f"{(1 - alpha) * 100:.4g}%"


def fmt_seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f}ms" if value >= 0.001 or value == 0 else f"{value * 1e3:.2f}ms"
    return f"{value:.2g}s"


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value
