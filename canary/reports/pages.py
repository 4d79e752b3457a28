"""Reports for people: the records behind `canary report`, and the server's `/reports/` pages.

Why a separate module: the rest of canary.reports is pure (entries in, strings out) and must
not know about files, the record schema's classes or HTTP. This is the glue around it: find a record
(by path, or by target name as the newest record for it), read it with canary.core.records, render
it, or serve it. The `canary report` command (canary.cli.report) writes it next to the record.

Records are found by content, not by file name: every `*.jsonl` in the record directory whose
first line is a start entry is a rollout, so whatever naming the writer uses, `canary report
checkout` finds the newest rollout of `checkout`. A report's id is `notify.report_id(rollout)`,
the same id the webhook links use.

Exception tree::

    ReportError (canary.reports)          the record cannot be turned into a report
    └── RecordNotFound              no record matches the name or path given
"""

from __future__ import annotations

import asyncio
import html
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from aiohttp import web

from canary.core.records import EndEntry, RecordError, StartEntry, parse_lines, read_record
from canary.kubernetes.record_store import looks_like_configmap, unpack_record
from canary.notify.webhooks import report_id
from canary.reports import Report, ReportError, build_report, render_html, render_json
from canary.reports import render_markdown as _render_markdown

__all__ = [
    "FORMATS",
    "Format",
    "RecordNotFound",
    "RecordSummary",
    "load_report",
    "register_routes",
    "render",
    "resolve_record",
    "scan_records",
]

Format = Literal["html", "md", "json"]
FORMATS: tuple[Format, ...] = ("html", "md", "json")
# The index shows the newest rollouts; older records stay reachable by id.
_INDEX_LIMIT = 200
# The end entry is the last line; records are appended to, so look only at their tail.
_TAIL_BYTES = 64 * 1024


class RecordNotFound(ReportError):
    """No record matches what was asked for."""


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """One rollout in the record directory, from its first and last lines only."""

    id: str
    path: Path
    rollout: str
    target: str
    primary_version: str
    canary_version: str
    started_at: float
    outcome: str  # promoted | rolled_back | aborted | superseded | running


def _summary(path: Path) -> RecordSummary | None:
    try:
        with path.open("rb") as handle:
            first = handle.readline().decode("utf-8", "replace")
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(size - _TAIL_BYTES, 0))
            tail = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    try:
        start = next(iter(parse_lines([first], source=str(path))), None)
    except RecordError:
        return None
    if not isinstance(start, StartEntry):
        return None  # not a rollout record (e.g. a failover log)
    outcome = "running"
    for line in reversed(tail[-3:]):
        try:
            last = next(iter(parse_lines([line], source=str(path))), None)
        except RecordError:
            continue
        if isinstance(last, EndEntry):
            outcome = last.outcome
        break
    return RecordSummary(
        id=report_id(start.rollout),
        path=path,
        rollout=start.rollout,
        target=start.target,
        primary_version=start.primary_version,
        canary_version=start.canary_version,
        started_at=start.at,
        outcome=outcome,
    )


def scan_records(record_dir: Path) -> list[RecordSummary]:
    """Every rollout record under `record_dir`, newest start first. Blocking: file I/O."""
    if not record_dir.is_dir():
        return []
    found = [s for p in record_dir.rglob("*.jsonl") if p.is_file() if (s := _summary(p))]
    found.sort(key=lambda s: (s.started_at, s.rollout), reverse=True)
    return found


def resolve_record(name_or_path: str, *, record_dir: Path) -> Path:
    """A record file: `name_or_path` itself if it is a file, else the newest record whose
    target, rollout id or report id is `name_or_path`."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if candidate.suffix == ".jsonl" or (os.sep in name_or_path and candidate.suffix):
        raise RecordNotFound(f"{name_or_path}: no such record file")
    records = scan_records(record_dir)
    for summary in records:
        if name_or_path in (summary.target, summary.rollout, summary.id):
            return summary.path
    if not record_dir.is_dir():
        raise RecordNotFound(
            f"{name_or_path!r} is not a record file, and the record directory {record_dir} "
            "does not exist (use --record-dir)"
        )
    targets = sorted({s.target for s in records})
    known = f"; targets with records: {', '.join(targets[:10])}" if targets else ""
    raise RecordNotFound(f"no record for {name_or_path!r} in {record_dir}{known}")


def load_report(path: Path, *, allow_incomplete: bool = True) -> Report:
    """Read a record file (JSON lines, or a record ConfigMap as JSON) and build its report.
    Raises ReportError with a clear message."""
    try:
        configmap = None
        if path.suffix == ".json":  # `kubectl get configmap canary-record-... -o json`
            configmap = looks_like_configmap(path.read_text(encoding="utf-8"))
        entries = unpack_record(configmap) if configmap is not None else read_record(path)
    except RecordError as exc:
        raise ReportError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read the record: {exc}") from None
    dicts = [entry.model_dump(mode="json", by_alias=True) for entry in entries]
    try:
        return build_report(dicts, allow_incomplete=allow_incomplete)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None


def render(report: Report, fmt: Format, *, report_url: str | None = None) -> str:
    if fmt == "html":
        return render_html(report)
    if fmt == "md":
        return _render_markdown(report, report_url=report_url)
    if fmt == "json":
        return render_json(report)
    raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")


# --- HTTP -----------------------------------------------------------------------------------

_INDEX_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f4f6f7; color: #1c2833; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 20px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border: 1px solid #e5e8e8; padding: 5px 8px; text-align: left; }
th { background: #eaeded; }
.promoted { color: #1e8449; font-weight: 600; } .rolled_back { color: #c0392b; font-weight: 600; }
.running { color: #b9770e; font-weight: 600; }
"""


def _index_html(records: Sequence[RecordSummary]) -> str:
    rows = "".join(
        f"<tr><td>{_when(s.started_at)}</td><td>{html.escape(s.target)}</td>"
        f"<td>{html.escape(s.primary_version or '?')} → {html.escape(s.canary_version or '?')}"
        f'</td><td class="{html.escape(s.outcome)}">{html.escape(s.outcome.replace("_", " "))}'
        f'</td><td><a href="{html.escape(s.id)}">{html.escape(s.rollout)}</a></td></tr>'
        for s in records
    )
    body = (
        "<table><tr><th>started</th><th>target</th><th>versions</th><th>outcome</th>"
        f"<th>report</th></tr>{rows}</table>"
        if records
        else "<p>No rollout records yet.</p>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>Canary reports</title>"
        f"<style>{_INDEX_CSS}</style></head><body><main><h1>Canary reports</h1>"
        f"<p>{len(records)} most recent rollouts, newest first.</p>{body}</main></body></html>"
    )


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def register_routes(
    app: web.Application, *, record_dir: Path | Callable[[], Path], prefix: str = "/reports"
) -> None:
    """Serve `{prefix}/` (index of recent rollouts, newest first) and `{prefix}/{id}` (the
    HTML report; `?format=md|json` for the others; a target's name gives its newest). File reading and rendering run off the
    event loop."""

    def directory() -> Path:
        return record_dir() if callable(record_dir) else record_dir

    async def index(request: web.Request) -> web.Response:
        records = await asyncio.to_thread(scan_records, directory())
        if request.query.get("format") == "json":
            data = [
                {
                    "id": s.id,
                    "rollout": s.rollout,
                    "target": s.target,
                    "primary_version": s.primary_version,
                    "canary_version": s.canary_version,
                    "started_at": s.started_at,
                    "outcome": s.outcome,
                }
                for s in records[:_INDEX_LIMIT]
            ]
            return web.json_response({"reports": data})
        return web.Response(text=_index_html(records[:_INDEX_LIMIT]), content_type="text/html")

    async def redirect(request: web.Request) -> web.Response:
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPFound(f"{prefix}/{query}")

    async def one(request: web.Request) -> web.Response:
        wanted = request.match_info["id"]
        fmt = request.query.get("format", "html")
        if fmt not in FORMATS:
            raise web.HTTPBadRequest(
                text=f"format must be one of {', '.join(FORMATS)}, got {fmt!r}\n"
            )

        def build() -> str:
            records = scan_records(directory())
            match = next((s for s in records if s.id == wanted), None)
            if match is None:
                # A failover's webhook links to its service: the newest rollout of it.
                match = next((s for s in records if report_id(s.target) == wanted), None)
            if match is None:
                raise RecordNotFound(f"no report {wanted!r}")
            return render(load_report(match.path), fmt)

        try:
            text = await asyncio.to_thread(build)
        except RecordNotFound as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        except ReportError as exc:
            raise web.HTTPUnprocessableEntity(text=f"{exc}\n") from None
        content_type = {"html": "text/html", "md": "text/markdown", "json": "application/json"}
        return web.Response(text=text, content_type=content_type[fmt])

    app.router.add_get(f"{prefix}/", index)
    app.router.add_get(prefix, redirect)
    app.router.add_get(prefix + "/{id}", one)
