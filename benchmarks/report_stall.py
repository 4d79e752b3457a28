"""Do report requests delay a rollout's ticks? The largest gap between ticks while N clients
ask at once for N different large reports (issue 11, point 10).

One process, one event loop, as in `canary run`: a RolloutRunner ticking every --tick-s
(fake router and metrics; its record appended to a file through the default thread pool, as
in production) and the /reports/ routes of canary.reports.pages on a real aiohttp server. After
a baseline of ticks, --requests clients each GET a different record's HTML report at once.
Printed: the largest gap between consecutive ticks before and during the burst, the burst's
duration and the answers' status codes.

    PYTHONPATH=. python benchmarks/report_stall.py [--mode processes|threads|legacy]
        [--ticks 1000] [--requests 8] [--tick-s 0.2]

--mode: `processes` (the default of register_routes), `threads` (its processes=False), or
`legacy`: the routes as they were before, rendering through asyncio.to_thread in the default
pool that the rollouts' own I/O also uses.

The records are one simulated rollout (tests/support/report_records.py) of --ticks ticks,
about 4.9 KB each, copied under --requests targets.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aiohttp
from aiohttp import web
from support.report_load import ticking_runner, wait_for_ticks, write_large_records

from canary.reports.pages import load_report, register_routes, render, scan_records
from canary.server.app import Server


def _legacy_routes(app: web.Application, record_dir: Path) -> None:
    """/reports/{id} as it was: scan and render through asyncio.to_thread."""

    async def one(request: web.Request) -> web.Response:
        wanted = request.match_info["id"]

        def build() -> str:
            match = next(s for s in scan_records(record_dir) if s.id == wanted)
            return render(load_report(match.path), "html")

        return web.Response(text=await asyncio.to_thread(build), content_type="text/html")

    app.router.add_get("/reports/{id}", one)


async def measure(
    record_dir: Path, ids: list[str], *, tick_s: float, mode: str
) -> dict[str, object]:
    runner, ticks = ticking_runner(record_dir, tick_s=tick_s)
    app = web.Application()
    if mode == "legacy":
        _legacy_routes(app, record_dir)
    else:
        register_routes(app, record_dir=record_dir, processes=mode == "processes")
    task = asyncio.create_task(runner.run())
    try:
        async with Server(app) as server, aiohttp.ClientSession() as session:
            await wait_for_ticks(ticks, 10)
            baseline_from = ticks.times[-10]

            async def get(report: str) -> int:
                async with session.get(
                    f"{server.url}/reports/{report}", timeout=aiohttp.ClientTimeout(total=600)
                ) as response:
                    await response.read()
                    return response.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(get(report) for report in ids))
            finished = time.monotonic()
            await wait_for_ticks(ticks, 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {
        "mode": mode,
        "tick_s": tick_s,
        "requests": len(ids),
        "baseline_max_gap_s": round(ticks.max_gap(baseline_from, started), 3),
        "burst_max_gap_s": round(ticks.max_gap(started, finished), 3),
        "burst_s": round(finished - started, 2),
        "statuses": dict(collections.Counter(statuses)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("processes", "threads", "legacy"), default="processes")
    parser.add_argument("--ticks", type=int, default=1000, help="ticks per record")
    parser.add_argument("--requests", type=int, default=8, help="concurrent report requests")
    parser.add_argument("--tick-s", type=float, default=0.2, help="the rollout's tick")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        record_dir = Path(tmp) / "records"
        ids = write_large_records(record_dir, count=args.requests, ticks=args.ticks)
        size = (record_dir / "load-0.jsonl").stat().st_size
        result = asyncio.run(measure(record_dir, ids, tick_s=args.tick_s, mode=args.mode))
    result = {"record_mb": round(size / 2**20, 2), "cpus": os.cpu_count(), **result}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
