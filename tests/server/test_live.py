"""The live view (canary.server.live) in a real headless Chromium.

- The page while a real rollout runs: `canary demo` (real HAProxy, Prometheus, services and
  load generator) prints the page's address; the DOM lists the rollout with its charts and
  report link, a later load shows more ticks (the page follows the rollout), and a screenshot
  is not blank. `CANARY_UPDATE_SCREENSHOT=1` also writes it to docs/live-view.png.
- The page honours the server's token (static mode's guard): the shell is public and holds no
  secret; without the token the page asks for one and shows no rollout; with `#token=` it
  does, and the token never appears in what the server sends.
Chromium and the demo are started by the test and stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from canary.core.rollout import Command
from canary.runner import CommandResult
from canary.runner.telemetry import Telemetry
from canary.server.app import Server, make_app
from canary.server.auth import TokenAccess
from canary.server.live import live_page, register_live

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="chromium is not installed (scripts/setup --all)"
)
TOKEN = "live-view-token-0123456789abcdef"
# Everything that could reach the network is off; the page needs none of it.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


async def chromium(args: list[str], *, profile: Path, timeout_s: float = 90) -> str:
    """Run chromium (its own process group) and return its stdout; killed by PID on timeout."""
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"chromium did not finish within {timeout_s}s") from None
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def dump_dom(url: str, profile: Path, *, budget_ms: int = 4000) -> str:
    """The DOM after the page's script ran (and polled) for `budget_ms` of virtual time."""
    return await chromium(
        [f"--virtual-time-budget={budget_ms}", "--dump-dom", url], profile=profile
    )


def sections(dom: str) -> dict[str, dict[str, str]]:
    """Each rollout section's data attributes, by name."""
    found = {}
    for tag in re.findall(r'<section class="rollout"[^>]*>', dom):
        attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', tag))
        found[attrs["name"]] = attrs
    return found


def form_tag(dom: str) -> str:
    match = re.search(r'<form id="token-form"[^>]*>', dom)
    assert match is not None
    return match.group(0)


# ---- a real rollout: the demo ----------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`canary demo` running a slow rollout; yields the live view's address and its output."""
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "canary",
                "demo",
                "--steps",
                "10,50",
                "--step-seconds",
                "30",
                "--rate",
                "100",
                "--record-dir",
                str(tmp_path / "records"),
            ],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        url = None
        while url is None and time.monotonic() < deadline:
            assert process.poll() is None, out.read_text()[-3000:]
            match = re.search(r"^live view: (http://127\.0\.0\.1:\d+/)", out.read_text(), re.M)
            url = match.group(1) if match else None
            time.sleep(0.2)
        assert url is not None, f"the demo printed no live view address:\n{out.read_text()}"
        yield url, out
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the demo stops its own servers by PID
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def ticks_seen(url: str, at_least: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            async with session.get(f"{url}rollouts?history=1") as response:
                states = (await response.json())["rollouts"]
            if states and len(states[0].get("history", [])) >= at_least:
                return
            await asyncio.sleep(0.2)
    raise AssertionError(f"the demo made fewer than {at_least} ticks")


@needs_chromium
async def test_the_page_follows_a_real_rollout(demo: tuple[str, Path], tmp_path: Path) -> None:
    """The demo's live view lists the running rollout with its charts and report link, shows
    more ticks on a later load, and renders a non-blank screenshot."""
    url, out = demo
    await ticks_seen(url, 3)
    first = await dump_dom(url, tmp_path / "p1")
    rollouts = sections(first)
    assert list(rollouts) == ["demo"], first[-3000:]
    assert rollouts["demo"]["phase"] == "Progressing"
    points_before = int(rollouts["demo"]["points"])
    assert points_before >= 3
    for chart in ("weights-demo", "requests-demo", "errors-demo", "metric-demo-errors"):
        assert f'id="{chart}"' in first, chart
    assert re.search(r'<polyline class="series" data-series="read back"', first)
    assert re.search(r'<tr data-metric="errors"><td>errors</td><td class="(continue|pass)">', first)
    # the report link and the recent-rollouts table (from /reports/?format=json)
    assert re.search(r'<a href="reports/demo_\d{8}T\d{6}Z" class="report-link"', first)
    assert '<table id="recent">' in first and "running" in first
    assert 'id="problem" role="alert"></p>' in first  # no error shown

    await ticks_seen(url, points_before + 3)
    second = await dump_dom(url, tmp_path / "p2")
    assert int(sections(second)["demo"]["points"]) >= points_before + 3

    shot = tmp_path / "live-view.png"
    await chromium(
        [
            "--virtual-time-budget=4000",
            "--window-size=1280,1300",
            f"--screenshot={shot}",
            url,
        ],
        profile=tmp_path / "p3",
    )
    with Image.open(shot) as image:
        gray = image.convert("L")
        assert image.size == (1280, 1300)
        histogram = gray.histogram()
        # not blank: no one shade covers the page, and the charts' lines are there
        assert max(histogram) < 0.9 * sum(histogram)
        assert len([n for n in histogram if n > 0]) > 40
    if os.environ.get("CANARY_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "live-view.png")
    assert "live view: " in out.read_text()


# ---- authentication: the server's own token ----------------------------------------------


@dataclass
class _Source:
    """One rollout's state as a runner gives it, with two ticks of history."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    telemetry: Telemetry = field(default_factory=Telemetry)

    def states(self) -> list[dict[str, Any]]:
        tick = {
            "rollout": "checkout@r2",
            "step": 0,
            "weight_set": 10,
            "weight_read": 10,
            "primary": [900.0, 9.0],
            "canary": [100.0, 1.0],
            "metrics": {"errors": [1.0, 0.2, 3.0, "continue"]},
        }
        return [
            {
                "name": "checkout",
                "rollout": "checkout@r2",
                "phase": "Progressing",
                "step": 0,
                "steps": [10, 50],
                "weight": 10,
                "weight_read": 10,
                "message": "continue",
                "metrics": {"errors": {"decision": "continue", "estimate": 1.0}},
                "history": [
                    {**tick, "at": 1000.0, "elapsed_s": 0.0},
                    {**tick, "at": 1010.0, "elapsed_s": 10.0, "primary": [1800.0, 18.0]},
                ],
            }
        ]

    async def command(self, name: str, command: Command) -> CommandResult:
        return CommandResult(False, "Progressing", "not in this test")


@pytest.fixture
async def guarded() -> AsyncIterator[str]:
    source = _Source()
    source.started.set()
    app = make_app(source, access=TokenAccess(TOKEN), extensions=[register_live])
    async with Server(app) as server:
        yield server.url


async def test_the_shell_is_public_and_holds_no_data_nor_secret(guarded: str) -> None:
    """The page is served without a token, self-contained (no outside address), with a CSP
    that allows no other origin; the data routes still need the token, and /rollouts leaves
    the history out unless asked."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{guarded}/") as response:
            assert response.status == 200
            page = await response.text()
            assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
        async with session.get(f"{guarded}/rollouts?history=1") as response:
            assert response.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{guarded}/rollouts", headers=auth) as response:
            assert "history" not in (await response.json())["rollouts"][0]
        async with session.get(f"{guarded}/rollouts?history=1", headers=auth) as response:
            assert len((await response.json())["rollouts"][0]["history"]) == 2
        async with session.post(f"{guarded}/", json={}) as response:
            assert response.status == 405  # the shell is a page, nothing else
    assert page == live_page()
    assert TOKEN not in page and "checkout" not in page
    # no address outside this server: only the SVG namespace, which is a name, not a request
    outside = [u for u in re.findall(r"https?://[^\s\"'`]+", page) if "www.w3.org" not in u]
    assert outside == []
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


@needs_chromium
async def test_the_page_needs_the_token_and_uses_it(guarded: str, tmp_path: Path) -> None:
    """Without a token the page shows no rollout and asks for one; with `#token=` (kept in
    the tab, out of the address) it lists the rollout and draws its charts."""
    without = await dump_dom(f"{guarded}/", tmp_path / "a", budget_ms=2000)
    assert sections(without) == {}
    assert "This server needs a token" in without
    assert "hidden" not in form_tag(without)  # the token field is shown

    with_token = await dump_dom(f"{guarded}/#token={TOKEN}", tmp_path / "b", budget_ms=2000)
    assert sections(with_token)["checkout"]["points"] == "2"
    assert 'id="requests-checkout"' in with_token
    assert "hidden" in form_tag(with_token)
    assert TOKEN not in with_token  # not in the DOM (nor left in the address)
