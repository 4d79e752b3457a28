"""A low-traffic canary decides in minutes with `canary loadtest`, and not without it.

Two identical stacks run side by side on 127.0.0.1, each with real processes: the demo
service as primary and canary, HAProxy in front, Prometheus scraping both, and 1 req/s of
"real" traffic through HAProxy. Each is rolled out by `python -m canary run --config` with
one 50 % step and a step deadline. In one, the config has a `rollout` gate webhook to
`python -m canary loadtest` whose metadata asks for 50 req/s through the same HAProxy (the
entry point) for 30 s: the controller calls it every tick, which keeps one load job running,
and the planner's advice counts the load from that metadata (no `generated_rps`). The
healthy canary is promoted there; in the other, 0.5 canary req/s cannot reach the
analysis' 200-sample minimum before the deadline, so the step ends in a rollback by
deadline: 60 s there (0.5 req/s would need ~7 min for those samples alone, and the planner
says ~30 min), 120 s with the load, so the test lasts about as long as the loaded rollout. Once the rollout ends the calls stop and the job ends with its 30 s duration; the
report's timeline shows the load test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from canary.core.records import EndEntry, NoteEntry, read_record
from canary.demo.procs import HttpReady, ManagedProcess, free_port
from canary.demo.stack import BACKEND, ServiceSpec, Stack, StackSettings

ROOT = Path(__file__).resolve().parents[2]
READY_S = 90.0  # starting Python with aiohttp on a busy 2-core CI machine can take 15 s
REAL_RPS = 1.0
GENERATED_RPS = 50
STEP_DEADLINE_S = 120  # with the load
UNLOADED_DEADLINE_S = 60
# Production defaults but for the demo's looser error tolerance and one latency quantile:
# the planner's estimate at 51 req/s and 50 % is ~40 s to pass, at 1 req/s over half an hour.
ANALYSIS = {
    "quantiles": [0.5],
    "errors": {"tolerance": 1.0, "abs_tolerance": 0.02},
    "latency": {"tolerance": 1.0, "abs_tolerance": 0.05},
}


def _config(stack: Stack, directory: Path, deadline_s: int, **extra: Any) -> Path:
    assert stack.prometheus is not None
    config = directory / "rollout.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "router": {"kind": "haproxy", "socket": str(stack.socket_path), "backend": BACKEND},
                "metrics": {
                    "kind": "prometheus",
                    "url": stack.prometheus.url,
                    "queries": {"selector": 'job="canary"'},
                },
                "steps": [50],
                "min_step_s": 5,
                "max_step_s": deadline_s,
                "no_data_deadline_s": 60,
                "tick_s": 1,
                "analysis": ANALYSIS,
                "expected_rps": REAL_RPS,
                "expected_error_rate": 0.005,
                "record_dir": str(directory / "records"),
                **extra,
            }
        )
    )
    return config


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _get_json(url: str) -> Any:
    return json.loads(_get_text(url))


async def _rollout(config: Path, log: Path, deadline_s: int) -> int:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canary", "run", "--config", str(config),
            "--listen", f"127.0.0.1:{free_port()}",
            # the load tester's rollout hook is on loopback, refused unless named
            "--allow-webhook-host", "127.0.0.1",
            cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            return await asyncio.wait_for(process.wait(), timeout=deadline_s + 90)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def _record(directory: Path) -> Path:
    (record,) = (directory / "records").glob("app-*.jsonl")
    return record


def _end(directory: Path) -> tuple[EndEntry, list[str]]:
    """The record's end, and the planner's advice said during the rollout."""
    entries = read_record(_record(directory))
    end = entries[-1]
    assert isinstance(end, EndEntry), end
    advice = [
        e.message for e in entries if isinstance(e, NoteEntry) and "time to pass" in e.message
    ]
    return end, advice


def _report(record: Path, fmt: str) -> str:
    """`canary report RECORD --format FMT`, as a user runs it."""
    out = record.with_suffix(f".{fmt}")
    done = subprocess.run(
        [sys.executable, "-m", "canary", "report", str(record), "--format", fmt, "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out.read_text()


@pytest.mark.slow
@pytest.mark.timeout(360)
async def test_low_traffic_canary_passes_with_generated_load_and_not_without(
    sockdir: Path,
) -> None:
    """At 1 req/s a healthy canary is rolled back at its step deadline (not shown safe); with
    a rollout hook driving 50 req/s from `canary loadtest` through HAProxy the same canary is
    promoted before its own (twice as long), the load tester's /jobs and /metrics show the load it sent,
    and the report's timeline shows the load test."""
    spec = ServiceSpec(error_rate=0.005, latency_ms=20.0, latency_jitter=0.3, seed=3)
    settings = StackSettings(primary=spec, canary=spec, rate=REAL_RPS)
    with_dir, without_dir = sockdir / "with", sockdir / "without"
    port = free_port()
    loadtest_url = f"http://127.0.0.1:{port}"
    loadtest = ManagedProcess(
        [
            sys.executable, "-m", "canary", "loadtest", "--listen", f"127.0.0.1:{port}",
            "--allow-cidr", "127.0.0.1/32", "--max-rps", "100",
        ],
        log_path=sockdir / "loadtest.log",
        ready=HttpReady(f"{loadtest_url}/healthz"),
        name="loadtest",
        cwd=ROOT,
        ready_timeout=READY_S,
    )  # fmt: skip
    async with (
        Stack(settings, workdir=with_dir) as with_load,
        Stack(settings, workdir=without_dir) as without_load,
        loadtest,
    ):
        assert with_load.haproxy is not None
        await asyncio.gather(with_load.wait_for_metrics(), without_load.wait_for_metrics())
        frontend = f"{with_load.haproxy.url}/"
        # The rollout hook drives the load tester each tick; no generated_rps: the planner
        # reads the rate from this metadata.
        hook = {
            "type": "rollout",
            "url": f"{loadtest_url}/",
            "metadata": {"url": frontend, "rps": str(GENERATED_RPS), "duration": "30s"},
        }
        rollouts = asyncio.gather(
            _rollout(
                _config(with_load, with_dir, STEP_DEADLINE_S, webhooks=[hook]),
                with_dir / "run.log",
                STEP_DEADLINE_S,
            ),
            _rollout(
                _config(without_load, without_dir, UNLOADED_DEADLINE_S),
                without_dir / "run.log",
                UNLOADED_DEADLINE_S,
            ),
        )
        jobs_seen: list[Any] = []

        async def watch_jobs() -> None:
            while True:
                jobs_seen.append(await asyncio.to_thread(_get_json, f"{loadtest_url}/jobs"))
                await asyncio.sleep(2.0)

        watcher = asyncio.create_task(watch_jobs())
        try:
            codes = await rollouts
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        # The hook's calls stopped with the loaded rollout; the job runs out its 30 s.
        jobs_after = await asyncio.to_thread(_get_json, f"{loadtest_url}/jobs")
        for _ in range(45):
            if jobs_after == {"jobs": []}:
                break
            await asyncio.sleep(1.0)
            jobs_after = await asyncio.to_thread(_get_json, f"{loadtest_url}/jobs")
        metrics = await asyncio.to_thread(_get_text, f"{loadtest_url}/metrics")

    (with_end, with_advice), (without_end, without_advice) = _end(with_dir), _end(without_dir)
    logs = (with_dir / "run.log").read_text()[-3000:], (without_dir / "run.log").read_text()[-3000:]
    assert codes == [0, 1], logs
    assert with_end.outcome == "promoted" and with_end.duration_s < STEP_DEADLINE_S, with_end
    assert without_end.outcome == "rolled_back", without_end
    assert f"no pass within max_step_s ({UNLOADED_DEADLINE_S}s)" in without_end.reason
    # The planner warned at the start without the load and named what generated load would
    # do; with the rollout hook asking for it, the first estimate counted it and fit the step.
    assert "of generated load at the entry point (canary loadtest)" in without_advice[0]
    assert "longer than the 60 s step" in without_advice[0], without_advice[0]
    loaded = f"{GENERATED_RPS} req/s generated at the entry point by canary loadtest"
    assert loaded in with_advice[0], with_advice[0]
    assert "fits the 2.0 min step" in with_advice[0], with_advice[0]
    print(f"promoted after {with_end.duration_s:.0f} s with the load; {with_advice[0]}")
    print(f"rolled back after {without_end.duration_s:.0f} s without; {without_advice[0]}")
    # One job however many calls (the controller's, one a tick while Progressing), at the
    # asked rate, nearly all of it answered ok; none left once the rollout was over.
    running = [seen["jobs"] for seen in jobs_seen if seen["jobs"]]
    assert running and all(len(jobs) == 1 for jobs in running), jobs_seen[-3:]
    job = running[-1][0]
    assert (job["namespace"], job["name"], job["url"]) == ("", "app", frontend), job
    assert job["rps"] == GENERATED_RPS and job["phase"] == "Progressing", job
    assert job["calls"] >= with_end.duration_s / 3, (job["calls"], with_end.duration_s)
    assert jobs_after == {"jobs": []}, jobs_after
    ok = next(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("canary_loadtest_requests_total{") and 'outcome="ok"' in line
    )
    assert ok >= GENERATED_RPS * with_end.duration_s * 0.8, (ok, with_end.duration_s)
    # The load stops with its duration, not with the rollout's run: at most 30 s (and a
    # tick) of it after the end.
    assert ok <= GENERATED_RPS * (with_end.duration_s + 30 + 5), (ok, with_end.duration_s)

    # The record and the reports show the load test as such: the hook's answer names it.
    host = frontend.split("//", 1)[1].rstrip("/")
    load = f"load test: {GENERATED_RPS} req/s to {host} for 30s"
    html = _report(_record(with_dir), "html")
    assert f"{load}, open (HTTP 200)" in html, html[-3000:]
    markdown = _report(_record(with_dir), "md")
    assert f"gate rollout: open ({load}; HTTP 200)" in markdown, markdown[-3000:]
    assert "load test" not in _report(_record(without_dir), "md")
