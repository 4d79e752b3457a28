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
import contextlib
import html
import math
import multiprocessing
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
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
    "REPORT_PAGES",
    "Format",
    "RecordNotFound",
    "RecordSummary",
    "ReportPages",
    "add_report_routes",
    "index_html",
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
        entries = (
            unpack_record(configmap, gaps=True) if configmap is not None else read_record(path)
        )
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


index_html = _index_html  # also the cluster's /reports/ (canary.reports.cluster)


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class _Busy(Exception):
    """Every render slot is taken: answer 503 with Retry-After."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s


class _TooLarge(ReportError):
    """The record is larger than a page may render."""


def _render_file(path: Path, fmt: Format) -> str:
    """Runs in the reports' own worker thread: read, build and render one record."""
    return render(load_report(path), fmt)


def _lower_priority() -> None:
    """A render worker yields the CPU to the controller (and its ticks) when both want it."""
    with contextlib.suppress(OSError):
        os.nice(10)


_Key = tuple[str, int, int, str]  # (path, mtime_ns, size, format)


class ReportPages:
    """The /reports/ routes' work, kept off the controller's path.

    Why: rendering a large record holds a thread (and the GIL) for seconds, and the rollouts'
    own I/O (record appends, Prometheus queries) runs in asyncio's default thread pool.
    Renders that share that pool queue the ticks behind them (eight requests for a 4.5 MiB
    record delayed a 0.2 s tick by 6.5 s; benchmarks/report_stall.py). So:

    - renders run in this object's own pool of `max_renders` worker processes (spawned at
      the first render, at a lower CPU priority; `processes=False`: threads, which still
      hold the GIL against the event loop), and record scans in one thread of its own;
      never in the default pool;
    - at most `max_pending` renders run or wait; one more is answered 503 with Retry-After;
    - a record larger than `max_record_bytes` is refused (413) before it is read;
    - pages are cached by (path, mtime, size, format), and concurrent requests for the same
      page share one render.
    """

    def __init__(
        self,
        record_dir: Path | Callable[[], Path],
        *,
        max_renders: int = 2,
        max_pending: int = 8,
        max_record_bytes: int = 16 * 2**20,
        cache_bytes: int = 64 * 2**20,
        processes: bool = True,
    ) -> None:
        if max_renders < 1 or max_pending < max_renders:
            raise ValueError("need 1 <= max_renders <= max_pending")
        self._record_dir = record_dir
        self.max_pending = max_pending
        self.max_renders = max_renders
        self.max_record_bytes = max_record_bytes
        self.cache_bytes = cache_bytes
        self.processes = processes
        self._renders = self._render_pool()
        self._scans = ThreadPoolExecutor(1, thread_name_prefix="canary-report-scan")
        self._pending = 0  # renders submitted and not finished (also if their client left)
        self._inflight: dict[_Key, asyncio.Future[str]] = {}
        self._cache: OrderedDict[_Key, str] = OrderedDict()
        self._cached_bytes = 0
        self._render_s = 1.0  # moving average of a render's duration, for Retry-After
        self.renders_done = 0

    def _render_pool(self) -> Executor:
        if self.processes:
            # spawn: a fork of a process with running threads and an event loop is unsafe
            context = multiprocessing.get_context("spawn")
            return ProcessPoolExecutor(
                self.max_renders, mp_context=context, initializer=_lower_priority
            )
        return ThreadPoolExecutor(self.max_renders, thread_name_prefix="canary-report")

    @property
    def pending(self) -> int:
        """Renders submitted and not finished."""
        return self._pending

    def directory(self) -> Path:
        return self._record_dir() if callable(self._record_dir) else self._record_dir

    async def scan(self) -> list[RecordSummary]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._scans, scan_records, self.directory())

    async def page(self, wanted: str, fmt: Format) -> str:
        """The report `wanted` (a report id, or a target's name for its newest) in `fmt`.
        Raises RecordNotFound, _TooLarge, ReportError or _Busy."""
        loop = asyncio.get_running_loop()
        path, mtime_ns, size = await loop.run_in_executor(self._scans, self._locate, wanted)
        if size > self.max_record_bytes:
            raise _TooLarge(
                f"report {wanted!r}: its record is {size / 2**20:.1f} MiB, more than the "
                f"{self.max_record_bytes / 2**20:.0f} MiB a page renders; render it with "
                f"`canary report {path.name}` where the record is"
            )
        key: _Key = (str(path), mtime_ns, size, fmt)
        if (text := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return text
        future = self._inflight.get(key)
        if future is None:
            if self._pending >= self.max_pending:
                waves = math.ceil((self._pending + 1) / self.max_renders)
                raise _Busy(max(1, min(60, math.ceil(waves * self._render_s))))
            future = self._submit(key, path, fmt)
        # shield: a client that leaves does not cancel the render others may be waiting for
        try:
            return await asyncio.shield(future)
        except BrokenExecutor:
            raise ReportError(f"report {wanted!r}: the renderer died rendering it") from None

    def _locate(self, wanted: str) -> tuple[Path, int, int]:
        records = scan_records(self.directory())
        match = next((s for s in records if s.id == wanted), None)
        if match is None:
            # A failover's webhook links to its service: the newest rollout of it.
            match = next((s for s in records if report_id(s.target) == wanted), None)
        if match is None:
            raise RecordNotFound(f"no report {wanted!r}")
        try:
            stat = match.path.stat()
        except OSError as exc:
            raise RecordNotFound(f"report {wanted!r}: {exc.strerror}") from None
        return match.path, stat.st_mtime_ns, stat.st_size

    def _submit(self, key: _Key, path: Path, fmt: Format) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            future = loop.run_in_executor(self._renders, _render_file, path, fmt)
        except BrokenExecutor:  # a worker died (e.g. out of memory): start afresh
            self._renders.shutdown(wait=False, cancel_futures=True)
            self._renders = self._render_pool()
            future = loop.run_in_executor(self._renders, _render_file, path, fmt)
        self._pending += 1
        self._inflight[key] = future

        def done(finished: asyncio.Future[str]) -> None:
            self._pending -= 1
            self._inflight.pop(key, None)
            self.renders_done += 1
            self._render_s = 0.7 * self._render_s + 0.3 * (time.monotonic() - started)
            if not finished.cancelled() and finished.exception() is None:
                self._remember(key, finished.result())

        future.add_done_callback(done)
        return future

    def _remember(self, key: _Key, text: str) -> None:
        if len(text) > self.cache_bytes // 4:
            return
        for old in [k for k in self._cache if k[:1] == key[:1] and k[3] == key[3]]:
            self._cached_bytes -= len(self._cache.pop(old))  # an older version of the page
        self._cache[key] = text
        self._cached_bytes += len(text)
        while self._cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= len(evicted)

    async def close(self) -> None:
        """Stop the workers: a render in progress is abandoned (its worker process is
        terminated, by its handle), so shutting down never waits for one."""
        # ProcessPoolExecutor keeps its workers by PID; Python 3.14 adds terminate_workers()
        processes = list((getattr(self._renders, "_processes", None) or {}).values())
        self._renders.shutdown(wait=False, cancel_futures=True)
        self._scans.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        if processes:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: [process.join(5) for process in processes]
            )


REPORT_PAGES: web.AppKey[ReportPages] = web.AppKey("report_pages", ReportPages)


_CONTENT_TYPES = {"html": "text/html", "md": "text/markdown", "json": "application/json"}


def add_report_routes(
    app: web.Application,
    prefix: str,
    scan: Callable[[], Awaitable[list[RecordSummary]]],
    page: Callable[[str, Format], Awaitable[str | None]],
) -> None:
    """The /reports/ routes over any source of records: `{prefix}/` (the newest
    `_INDEX_LIMIT`, HTML or `?format=json`), `{prefix}` (redirect) and `{prefix}/{id}`
    (`?format=html|md|json`). `page` returns None for an unknown id, or raises the HTTP error
    its source has to say (too large, busy); a ReportError is a 422 for every source."""

    async def index(request: web.Request) -> web.Response:
        records = (await scan())[:_INDEX_LIMIT]
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
                for s in records
            ]
            return web.json_response({"reports": data})
        return web.Response(text=_index_html(records), content_type="text/html")

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
        try:
            text = await page(wanted, fmt)
        except ReportError as exc:
            raise web.HTTPUnprocessableEntity(text=f"{exc}\n") from None
        if text is None:
            raise web.HTTPNotFound(text=f"no report {wanted!r}\n")
        return web.Response(text=text, content_type=_CONTENT_TYPES[fmt])

    app.router.add_get(f"{prefix}/", index)
    app.router.add_get(prefix, redirect)
    app.router.add_get(prefix + "/{id}", one)


def register_routes(
    app: web.Application,
    *,
    record_dir: Path | Callable[[], Path],
    prefix: str = "/reports",
    max_renders: int = 2,
    max_pending: int = 8,
    max_record_bytes: int = 16 * 2**20,
    processes: bool = True,
) -> None:
    """Serve `{prefix}/` (index of recent rollouts, newest first) and `{prefix}/{id}` (the
    HTML report; `?format=md|json` for the others; a target's name gives its newest).

    Reading and rendering run in the routes' own threads (see ReportPages), never in the
    event loop or its default pool: 503 with Retry-After past `max_pending` renders, 413 for
    a record larger than `max_record_bytes`. The ReportPages is `app[REPORT_PAGES]`."""
    pages = ReportPages(
        record_dir,
        max_renders=max_renders,
        max_pending=max_pending,
        max_record_bytes=max_record_bytes,
        processes=processes,
    )

    async def close(_: web.Application) -> None:
        await pages.close()

    app.on_cleanup.append(close)

    async def page(wanted: str, fmt: Format) -> str:
        try:
            return await pages.page(wanted, fmt)
        except RecordNotFound as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        except _TooLarge as exc:
            raise web.HTTPRequestEntityTooLarge(
                max_size=pages.max_record_bytes, actual_size=0, text=f"{exc}\n"
            ) from None
        except _Busy as exc:
            raise web.HTTPServiceUnavailable(
                text=f"{pages.max_pending} reports are being rendered; try again in "
                f"{exc.retry_after_s}s\n",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from None

    add_report_routes(app, prefix, pages.scan, page)
    app[REPORT_PAGES] = pages
