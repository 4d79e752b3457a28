"""The hostile-HTTP table: every route of a static-mode server, asked as an attacker would.

    python -m benchmarks.hostile_http            # prints the Markdown table

What runs: the real server (canary.server.app with the static token guard and the
/reports routes) around the real Controller and RolloutRunners, one rollout per command
route (`app-promote`, `app-abort`, ...), each on an in-memory router with a metric source
that has no data, so every rollout holds at its first step while the table is made. Nothing
leaves 127.0.0.1; one request per cell (a few dozen in all).

Columns: no credentials; a wrong bearer token; the right token; a cross-origin form post
(what a hostile page in a browser can send: `Content-Type: application/x-www-form-urlencoded`,
`Origin: http://evil.example`, no token, since a browser has none to add); and the same
form post carrying the right token (to show the Origin check holds on its own). For the
GET routes the last two are cross-origin GETs. After the table, the script checks that no
rollout moved for any request but a right-token one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import aiohttp

from analysis import AnalysisConfig, Analyzer
from canary.core.rollout import RolloutSpec
from canary.metrics.prometheus import MetricsResult, NoData
from canary.reports.pages import register_routes
from canary.runner import Controller, RolloutRunner
from canary.server.app import COMMANDS, Server, make_app
from canary.server.auth import TokenAccess, create_token_file

EVIL = "http://evil.example"
COLUMNS = (
    "no credentials",
    "wrong token",
    "right token",
    "cross-origin form post",
    "cross-origin form post + right token",
)


class MemoryRouter:
    name = "memory"

    def __init__(self) -> None:
        self.weight = 0
        self.sets: list[int] = []

    async def set_weight(self, canary_percent: int) -> None:
        self.sets.append(canary_percent)
        self.weight = canary_percent

    async def get_weight(self) -> int:
        return self.weight


class NoMetrics:
    async def fetch(self, *, since: float, now: float) -> MetricsResult:
        return NoData("the table needs no data: the rollout holds")


def _runner(name: str, record_dir: Path) -> tuple[RolloutRunner, MemoryRouter]:
    router = MemoryRouter()
    spec = RolloutSpec(steps=(5, 50), min_step_s=3600, max_step_s=None, no_data_deadline_s=3600)
    runner = RolloutRunner(
        name=name,
        spec=spec,
        router=router,
        metrics=NoMetrics(),
        record_path=record_dir / f"{name}.jsonl",
        tick_s=0.2,
        analyzer_factory=lambda: Analyzer(AnalysisConfig()),
        canary_version="v2",
    )
    return runner, router


async def table(record_dir: Path) -> tuple[str, list[str]]:
    token = create_token_file(record_dir / "canary.token")
    pairs = {verb: _runner(f"app-{verb}", record_dir) for verb in COMMANDS}
    controller = Controller([runner for runner, _ in pairs.values()])
    app = make_app(
        controller,
        access=TokenAccess(token),
        extensions=[lambda a: register_routes(a, record_dir=record_dir)],
    )
    routes: list[tuple[str, str]] = [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/rollouts"),
        ("GET", "/rollouts/app-pause"),
        ("GET", "/reports/"),
        ("GET", "/reports/app-pause"),
    ]
    # Commands last, in an order that keeps every rollout alive until its own row.
    routes += [("POST", f"/rollouts/app-{verb}/{verb}") for verb in COMMANDS]
    problems: list[str] = []
    lines = [
        "| route | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    task = asyncio.create_task(controller.run())
    try:
        async with Server(app) as server, aiohttp.ClientSession() as http:
            await asyncio.wait_for(controller.started.wait(), 30)
            for _ in range(300):  # every rollout at its first step before the table
                if all(router.weight == 5 for _, router in pairs.values()):
                    break
                await asyncio.sleep(0.05)
            # app-resume is paused first, so that its row's resume has something to resume.
            async with http.post(
                f"{server.url}/rollouts/app-resume/pause",
                json={"who": "table", "reason": "set up the resume row"},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                if response.status != 200:
                    problems.append(f"pausing app-resume answered {response.status}")
            await asyncio.sleep(0.3)
            for method, path in routes:
                row = []
                for column in COLUMNS:
                    headers: dict[str, str] = {}
                    if column == "wrong token":
                        headers["Authorization"] = "Bearer " + "x" * len(token)
                    if "right token" in column:
                        headers["Authorization"] = f"Bearer {token}"
                    data: str | None = None
                    json_body: dict[str, str] | None = None
                    if column.startswith("cross-origin"):
                        headers["Origin"] = EVIL
                        if method == "POST":
                            headers["Content-Type"] = "application/x-www-form-urlencoded"
                            data = "who=attacker&reason=csrf"
                    elif method == "POST":
                        json_body = {"who": "table", "reason": column}
                    before = [len(r.sets) for _, r in pairs.values()]
                    async with http.request(
                        method, server.url + path, headers=headers, data=data, json=json_body
                    ) as response:
                        await response.read()
                        row.append(str(response.status))
                    await asyncio.sleep(0.3)  # a command is applied by the rollout task
                    moved = [len(r.sets) for _, r in pairs.values()] != before
                    if moved and column != "right token":
                        problems.append(f"{method} {path} ({column}) moved a rollout")
                lines.append(f"| `{method} {path}` | " + " | ".join(row) + " |")
    finally:
        controller.stop()
        await asyncio.wait_for(task, 30)
    return "\n".join(lines), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="canary-hostile-") as tmp:
        text, problems = asyncio.run(table(Path(tmp)))
    print(text)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
