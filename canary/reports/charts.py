"""The report's charts as inline SVG, for the HTML page.

Canary weight, error rate and latency per arm, each metric's confidence band against its
pass/fail lines, the bound on the canary's excess rate, and the evidence towards a decision;
step changes, manual actions and failovers as vertical marks. Pure: a `Report` in, one
`<figure>` string per chart out (`render_charts`); no scripts, no external resources.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from canary.reports.formatting import escape, fmt_conf, fmt_duration, fmt_seconds
from canary.reports.model import Report

__all__ = ["render_charts"]

# More points than a laptop screen has pixels across a chart only slows the browser.
_MAX_CHART_POINTS = 600

_PRIMARY = "#0072b2"
_CANARY = "#d55e00"
_FAIL = "#c0392b"
_PASS = "#1e8449"
_GREY = "#7f8c8d"


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
            f'<figure id="{escape(chart_id)}"><figcaption>{escape(title)}</figcaption>'
            f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">{body}'
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
            f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>'
        )
    for tick in _nice_ticks(0.0, x_hi, 6):
        if tick > x_hi:
            continue
        x = px(tick)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
            'stroke="#7f8c8d"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{escape(fmt_duration(tick))}</text>"
        )
    for x_value, label in vlines:
        x = px(x_value)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#aab7b8" '
            f'stroke-dasharray="2,3"><title>{escape(label)}</title></line>'
        )
    for band in bands:
        for segment in _segments([(x, lo_, hi_) for x, lo_, hi_ in _thin(band.points)]):
            upper = " ".join(f"{px(x):.1f},{py(h):.1f}" for x, _, h in segment)
            lower = " ".join(f"{px(x):.1f},{py(lw):.1f}" for x, lw, _ in reversed(segment))
            parts.append(
                f'<polygon class="band" points="{upper} {lower}" fill="{band.color}" '
                f'fill-opacity="0.18" stroke="none"><title>{escape(band.label)}</title></polygon>'
            )
    for y_value, label, color in hlines:
        y = py(y_value)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
            f'stroke-width="1.3" stroke-dasharray="6,4"/>'
            f'<text x="{left + plot_w - 4}" y="{y - 4:.1f}" text-anchor="end" '
            f'style="fill:{color}">{escape(label)}</text>'
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
                f'<polyline class="series" data-series="{escape(line.label)}" fill="none" '
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
        parts.append(f'<text x="{legend_x + 20}" y="{legend_y}">{escape(item_label)}</text>')
        legend_x += 28 + 6.2 * len(item_label)
    if clipped and y_cap is not None:
        parts.append(
            f'<text x="{left + 4}" y="{top + 12}" style="fill:#7f8c8d">'
            f"clipped at {escape(y_format(y_cap))}</text>"
        )
    return (
        f'<figure id="{escape(chart_id)}"><figcaption>{escape(title)}</figcaption>'
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
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


def _axis_pct(value: float) -> str:
    return f"{value * 100:.2g}%" if value < 0.1 else f"{value * 100:.0f}%"


def _axis_ratio(value: float) -> str:
    return f"{value:.2f}"


def _axis_evalue(value: float) -> str:
    return f"{value:.0e}" if value >= 1e4 or value < 1e-2 else f"{value:g}"


def render_charts(r: Report) -> list[str]:
    """Every chart of the report, in page order, one `<figure>` string each."""
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
            y_format=_axis_pct,
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
                y_format=fmt_seconds,
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
                title=f"{s.name}: canary/primary {s.scale}, {fmt_conf(s.alpha)} confidence band",
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
                y_format=_axis_ratio,
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
                    (t, f"tolerance {_axis_pct(t)}", _PASS)
                    for t in sorted({s.abs_tolerance for s in absolute})
                ],
                x_max=x_max,
                y_min=0.0,
                y_cap=max(s.abs_tolerance for s in absolute) * 4,
                y_format=_axis_pct,
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
                y_format=_axis_evalue,
                y_cap=1e3,
                log_y=True,
                vlines=vlines,
            )
        )
    return charts


def _opt(value: int | None) -> float | None:
    return None if value is None else float(value)
