"""The /reports/ routes under load: rendering stays off the controller's path.

A rollout ticks in the same event loop as the routes (as in `canary run`), its record
appended through the default thread pool. Large reports render in the routes' own worker
processes, so ticks keep their cadence however many clients ask; past the bound the answer is
503 with Retry-After, a record too large for a page is 413, and a page already rendered for
the same file contents comes from the cache. The timings of this are in
benchmarks/report_stall.py; the bounds here are behavioural.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support.report_load import ticking_runner, wait_for_ticks, write_large_records

from canary.reports.pages import REPORT_PAGES, ReportPages, register_routes
from canary.server.app import Server

TICK_S = 0.25
SLACK_S = 0.3


@pytest.fixture(scope="module")
def large_records(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Nine records of 300 simulated ticks (about 1.3 MiB each), nine report ids."""
    record_dir = tmp_path_factory.mktemp("large") / "records"
    return record_dir, write_large_records(record_dir, count=9, ticks=300)


@pytest.fixture
async def served(large_records: tuple[Path, list[str]]) -> AsyncIterator[tuple[str, ReportPages]]:
    record_dir, _ = large_records
    app = web.Application()
    register_routes(app, record_dir=record_dir)
    async with Server(app) as server:
        yield server.url, app[REPORT_PAGES]


async def test_ticks_keep_their_cadence_while_eight_large_reports_render(
    large_records: tuple[Path, list[str]], served: tuple[str, ReportPages], tmp_path: Path
) -> None:
    """Eight concurrent requests for eight large reports: every gap between ticks stays below
    twice the tick (plus slack), the ninth concurrent request is 503 with Retry-After, and
    the eight are answered in full."""
    _, ids = large_records
    url, pages = served
    runner, ticks = ticking_runner(tmp_path, tick_s=TICK_S)
    task = asyncio.create_task(runner.run())
    try:
        await wait_for_ticks(ticks, 3)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def get(report: str) -> tuple[int, str, str | None]:
                async with session.get(f"{url}/reports/{report}") as response:
                    text = await response.text()
                    return response.status, text, response.headers.get("Retry-After")

            started = asyncio.get_running_loop().time()
            eight = [asyncio.create_task(get(report)) for report in ids[:8]]
            async with asyncio.timeout(30):
                while pages.pending < 8:  # noqa: ASYNC110 - the routes expose no event
                    await asyncio.sleep(0.01)
            status, text, retry_after = await get(ids[8])
            assert status == 503, text
            assert retry_after is not None and int(retry_after) >= 1
            assert "try again" in text
            answers = await asyncio.gather(*eight)
            finished = asyncio.get_running_loop().time()
        await wait_for_ticks(ticks, 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [status for status, _, _ in answers] == [200] * 8
    assert all(text.rstrip().endswith("</html>") for _, text, _ in answers)
    gap = ticks.max_gap(started, finished)
    assert gap < 2 * TICK_S + SLACK_S, f"a tick waited {gap:.2f}s behind the reports"


async def test_a_rendered_page_is_cached_until_its_record_changes(
    large_records: tuple[Path, list[str]], served: tuple[str, ReportPages]
) -> None:
    """Three concurrent requests for one page render it once; asking again renders nothing;
    once the record grows, the page is rendered anew."""
    record_dir, ids = large_records
    url, pages = served
    async with aiohttp.ClientSession() as session:

        async def get() -> str:
            async with session.get(f"{url}/reports/{ids[0]}?format=md") as response:
                assert response.status == 200
                return await response.text()

        first = await asyncio.gather(get(), get(), get())
        assert pages.renders_done == 1 and len(set(first)) == 1
        assert await get() == first[0] and pages.renders_done == 1
        record = record_dir / "load-0.jsonl"
        last = record.read_text(encoding="utf-8").splitlines(keepends=True)[-1]
        with record.open("a", encoding="utf-8") as handle:
            handle.write(last)  # the same tick again: the file is newer and longer
        await get()
        assert pages.renders_done == 2


async def test_a_record_too_large_for_a_page_is_refused(
    large_records: tuple[Path, list[str]],
) -> None:
    """A record above the size limit is 413 with a message that says how to render it."""
    record_dir, ids = large_records
    app = web.Application()
    register_routes(app, record_dir=record_dir, max_record_bytes=1_000_000)
    async with Server(app) as server, aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/reports/{ids[0]}") as response:
            assert response.status == 413
            text = await response.text()
    assert "MiB, more than the 1 MiB a page renders" in text and "canary report" in text
    assert app[REPORT_PAGES].renders_done == 0
