"""`/reports/` in a cluster (`canary kubernetes`): the reports of the records in ConfigMaps.

Why not canary.reports.pages' file-based routes: in a cluster the records are ConfigMaps in
the controller's namespace (canary.kubernetes.record_store), and the controller may only
`get` them by name (its RBAC has no `list` of ConfigMaps). The names come from what the
controller already knows: each watched Deployment's current or last rollout (its status
annotation's `record`). So the index lists those rollouts, one per Deployment, newest first;
older records stay readable with `canary report` from their dumped ConfigMaps.

The routes, their JSON and their HTML are the static mode's (same ids: `report_id(rollout)`),
so the live page and the webhooks' links work unchanged. A record is read as `canary report`
reads it (`read_record_configmap`: the head and its chunks, unpacked in the "packing" pool,
within the record store's size budget); rendering runs in this object's own thread, never on
the event loop. Both are cached by (head ConfigMap, resourceVersion): every save rewrites the
head, so an unchanged record is fetched (the head only) but not read or rendered again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from canary.core.records import EndEntry, Entry, RecordError, StartEntry
from canary.kubernetes.record_store import ConfigMapApi, read_record_configmap
from canary.notify.webhooks import report_id
from canary.reports import build_report
from canary.reports.pages import Format, RecordSummary, add_report_routes, render

__all__ = ["ClusterReports", "register_cluster_routes"]

_CACHE_ITEMS = 64
_CONCURRENT_GETS = 8


@dataclass(frozen=True, slots=True)
class _Record:
    summary: RecordSummary
    entries: tuple[Entry, ...]


def _summarize(ref: str, entries: list[Entry]) -> _Record:
    """The record and its summary. Raises RecordError."""
    start = entries[0] if entries else None
    if not isinstance(start, StartEntry):
        raise RecordError(f"record ConfigMap {ref}: does not begin with a start entry")
    end = entries[-1]
    summary = RecordSummary(
        id=report_id(start.rollout),
        path=Path(ref),  # "namespace/configmap": where it is, as `canary report` needs it
        rollout=start.rollout,
        target=start.target,
        primary_version=start.primary_version,
        canary_version=start.canary_version,
        started_at=start.at,
        outcome=end.outcome if isinstance(end, EndEntry) else "running",
    )
    return _Record(summary, tuple(entries))


def _render(record: _Record, fmt: Format) -> str:
    dicts = [entry.model_dump(mode="json", by_alias=True) for entry in record.entries]
    return render(build_report(dicts, allow_incomplete=True), fmt)


class ClusterReports:
    """Finds, reads and renders the records named by `refs()` ("namespace/configmap")."""

    def __init__(self, api: ConfigMapApi, refs: Callable[[], Iterable[str]]) -> None:
        self._api = api
        self._refs = refs
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="canary-cluster-report")
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        self._pages: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._gets = asyncio.Semaphore(_CONCURRENT_GETS)

    async def _read(self, ref: str) -> tuple[str, _Record] | None:
        """(resourceVersion, record), or None when it is missing or unreadable (the index
        skips it; the controller counts and shows its own record errors)."""
        namespace, _, name = ref.partition("/")
        try:
            async with self._gets:
                configmap = await self._api.get_configmap(namespace, name)
        except Exception:  # NotFound, forbidden, unreachable: no report to list
            return None
        version = str((configmap.get("metadata") or {}).get("resourceVersion") or "")
        key = (ref, version)
        if (cached := self._records.get(key)) is not None:
            self._records.move_to_end(key)
            return version, cached
        try:
            # the head and its chunks, unpacked off the loop within one bounded budget
            async with self._gets:
                entries = await read_record_configmap(self._api, configmap, gaps=True)
            record = _summarize(ref, entries)
        except RecordError:
            return None
        for old in [k for k in self._records if k[0] == ref]:
            del self._records[old]
        self._records[key] = record
        while len(self._records) > _CACHE_ITEMS:
            self._records.popitem(last=False)
        return version, record

    async def scan(self) -> list[RecordSummary]:
        refs = sorted({ref for ref in self._refs() if "/" in ref})
        found = await asyncio.gather(*(self._read(ref) for ref in refs))
        summaries = [record.summary for got in found if got is not None for record in [got[1]]]
        summaries.sort(key=lambda s: (s.started_at, s.rollout), reverse=True)
        return summaries

    async def page(self, wanted: str, fmt: Format) -> str | None:
        """The report `wanted` (a report id, or a target's for its newest) in `fmt`; None
        when no known record has that id."""
        for ref in sorted({ref for ref in self._refs() if "/" in ref}):
            got = await self._read(ref)
            if got is None:
                continue
            version, record = got
            if wanted not in (record.summary.id, report_id(record.summary.target)):
                continue
            key = (ref, version, fmt)
            if (text := self._pages.get(key)) is None:
                loop = asyncio.get_running_loop()
                text = await loop.run_in_executor(self._thread, _render, record, fmt)
                self._pages[key] = text
                while len(self._pages) > _CACHE_ITEMS:
                    self._pages.popitem(last=False)
            return text
        return None

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def register_cluster_routes(
    app: web.Application,
    *,
    api: ConfigMapApi,
    refs: Callable[[], Iterable[str]],
    prefix: str = "/reports",
) -> None:
    """Serve `{prefix}/` and `{prefix}/{id}` as canary.reports.pages does, from ConfigMaps."""
    reports = ClusterReports(api, refs)

    async def close(_: web.Application) -> None:
        reports.close()

    app.on_cleanup.append(close)

    add_report_routes(app, prefix, reports.scan, reports.page)
