"""The HTML report rendered by a real headless Chromium: DOM and screenshot."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from support.report_records import Scenario, simulate

from canary.reports import build_report, render_html

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="chromium is not installed (scripts/setup --all)"
)

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


def chromium(args: list[str], *, profile: Path, timeout_s: float = 90) -> str:
    """Run chromium with a throwaway profile; stop it (and its children) by PID on timeout."""
    process = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its renderer and GPU helpers share the group we kill
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"chromium did not finish within {timeout_s}s") from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, err[-2000:]
    return out


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    entries = simulate(Scenario(seed=12, canary_error_rate=0.014, failover_at_tick=2))
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html(build_report(entries)), encoding="utf-8")
    return path


def test_chromium_parses_the_report_with_title_and_charts(page: Path, tmp_path: Path) -> None:
    """Chromium's DOM of the page has the report title and every chart as an SVG with
    drawn series."""
    dom = chromium(["--dump-dom", page.as_uri()], profile=tmp_path / "profile")
    title = re.search(r"<title>(.*?)</title>", dom)
    assert title is not None and title.group(1) == "Canary report: demo/app v1.5.0 rolled back"
    charts = re.findall(r'<figure id="(chart-[\w-]+)">\s*<figcaption>', dom)
    assert {"chart-weight", "chart-errors", "chart-latency", "chart-evidence"} <= set(charts)
    assert dom.count("<svg") == len(charts) >= 5
    assert len(re.findall(r'<polyline class="series"', dom)) >= 8
    assert 'id="deciding-evidence"' in dom


def test_chromium_screenshot_shows_a_rendered_page(page: Path, tmp_path: Path) -> None:
    """A laptop-sized screenshot is a real picture: mostly page background, with the
    outcome banner's red and the arms' chart colours actually painted."""
    shot = tmp_path / "report.png"
    chromium(
        ["--window-size=1366,2000", f"--screenshot={shot}", page.as_uri()],
        profile=tmp_path / "profile",
    )
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1366, 2000)
        # every 4th pixel both ways: enough to see what is painted
        small = image.convert("RGB").resize((1366 // 4, 2000 // 4), Image.Resampling.NEAREST)
        colours = {rgb: n for n, rgb in small.getcolors(maxcolors=1 << 20) or []}
    total = sum(colours.values())
    assert len(colours) > 50, "a blank or single-colour screenshot"
    assert max(colours.values()) / total < 0.9, "one colour covers the page"

    def painted(target: tuple[int, int, int], tolerance: int = 40) -> int:
        return sum(
            n
            for c, n in colours.items()
            if all(abs(a - b) <= tolerance for a, b in zip(c, target, strict=True))
        )

    assert painted((0xC0, 0x39, 0x2B), 10) > 200  # the rolled-back banner
    assert painted((0x00, 0x72, 0xB2)) > 20  # primary's lines
    assert painted((0xD5, 0x5E, 0x00)) > 20  # canary's lines


def test_chromium_prints_the_report_to_a_few_pages(page: Path, tmp_path: Path) -> None:
    """Printing (print CSS) gives a real PDF of a few pages, not one page per chart."""
    pdf = tmp_path / "report.pdf"
    chromium(
        ["--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri()],
        profile=tmp_path / "profile",
    )
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    pages = len(re.findall(rb"/Type\s*/Page(?![s\w])", data))
    assert 1 <= pages <= 6, pages
