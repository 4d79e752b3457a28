"""`canary report` and the server's /reports/ pages, over record files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.report_records import Scenario, simulate

from canary.cli.report import main
from canary.notify.webhooks import report_id
from canary.reports.pages import (
    RecordNotFound,
    load_report,
    register_routes,
    resolve_record,
    scan_records,
)

PROMOTED = Scenario(seed=11, canary_error_rate=0.01)
ROLLED_BACK = Scenario(seed=12, canary_error_rate=0.014)


def _write(path: Path, entries: list[dict[str, Any]], *, torn_tail: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(e) + "\n" for e in entries)
    if torn_tail:
        text += '{"schema":1,"kind":"tick","at":'  # the writer died mid-line
    path.write_text(text, encoding="utf-8")
    return path


def _shift(entries: list[dict[str, Any]], seconds: float, rollout: str) -> list[dict[str, Any]]:
    return [{**e, "at": e["at"] + seconds, "rollout": rollout} for e in entries]


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three rollouts of demo/app (older promoted, newer rolled back, newest still running)
    and one of another target, under whatever file names."""
    root = tmp_path_factory.mktemp("records")
    promoted, rolled_back = simulate(PROMOTED), simulate(ROLLED_BACK)
    _write(root / "a.jsonl", _shift(promoted, 0, "demo/app@aaa"))
    _write(root / "nested" / "b.jsonl", _shift(rolled_back, 3600, "demo/app@bbb"))
    running = simulate(Scenario(seed=15, canary_error_rate=0.01, truncate_after_tick=5))
    _write(root / "c.jsonl", _shift(running, 7200, "demo/app@ccc"), torn_tail=True)
    other = [{**e, "target": "shop/cart"} if e["kind"] == "start" else e for e in promoted]
    _write(root / "d.jsonl", _shift(other, 60, "shop/cart@ddd"))
    (root / "failover.jsonl").write_text(
        '{"schema":1,"kind":"failover","at":1,"rollout":"x","direction":"to-standby",'
        '"who":"controller","reason":"down"}\n'
    )
    (root / "empty.jsonl").write_text("")
    return root


# --- finding records -----------------------------------------------------------------------


def test_scan_lists_rollouts_newest_first_with_outcomes(record_dir: Path) -> None:
    """Only rollout records (first line a start entry) are listed, newest first, with the
    outcome from their last line."""
    summaries = scan_records(record_dir)
    assert [(s.rollout, s.outcome) for s in summaries] == [
        ("demo/app@ccc", "running"),
        ("demo/app@bbb", "rolled_back"),
        ("shop/cart@ddd", "promoted"),
        ("demo/app@aaa", "promoted"),
    ]
    assert summaries[1].id == report_id("demo/app@bbb") == "demo_app_bbb"


def test_name_resolves_to_the_newest_record_of_a_target(record_dir: Path) -> None:
    """A target name means its newest rollout; a rollout or report id means that one."""
    assert resolve_record("demo/app", record_dir=record_dir) == record_dir / "c.jsonl"
    assert resolve_record("demo/app@aaa", record_dir=record_dir) == record_dir / "a.jsonl"
    assert resolve_record("demo_app_bbb", record_dir=record_dir) == (
        record_dir / "nested" / "b.jsonl"
    )
    path = str(record_dir / "d.jsonl")
    assert resolve_record(path, record_dir=Path("/nonexistent")) == Path(path)


def test_unknown_names_are_clear_errors(record_dir: Path, tmp_path: Path) -> None:
    """An unknown name lists the targets that do have records; a missing directory says
    to use --record-dir; a missing file is named."""
    with pytest.raises(
        RecordNotFound, match=r"no record for 'web' in .*targets with records: demo/app, shop/cart"
    ):
        resolve_record("web", record_dir=record_dir)
    with pytest.raises(RecordNotFound, match="does not exist \\(use --record-dir\\)"):
        resolve_record("web", record_dir=tmp_path / "nope")
    with pytest.raises(RecordNotFound, match=r"missing\.jsonl: no such record file"):
        resolve_record(str(tmp_path / "missing.jsonl"), record_dir=record_dir)


def test_torn_last_line_still_gives_an_incomplete_report(record_dir: Path) -> None:
    """A record whose writer died mid-line renders up to its last whole entry."""
    report = load_report(record_dir / "c.jsonl")
    assert report.tick_count == 5 and not report.complete
    assert report.incomplete_reason is not None
    assert report.incomplete_reason.startswith("record ends at tick 5 without an end entry")


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_writes_html_next_to_the_record(
    record_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """By default the HTML goes next to the record and its path is printed."""
    record = _write(tmp_path / "r.jsonl", simulate(ROLLED_BACK))
    assert main([str(record)]) == 0
    out = tmp_path / "r.html"
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "<title>Canary report: demo/app v1.5.0 rolled back</title>" in page


@pytest.mark.parametrize(
    ("fmt", "marker"), [("md", "### Canary demo/app"), ("json", '"report_schema": 1')]
)
def test_cli_formats_to_stdout(
    record_dir: Path, fmt: str, marker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format md|json with -o - prints the report."""
    assert main(["demo/app@bbb", "--format", fmt, "-o", "-", "--record-dir", str(record_dir)]) == 0
    assert marker in capsys.readouterr().out


def test_cli_warns_about_an_incomplete_record(
    record_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running rollout's report is written, with a warning on stderr."""
    out = tmp_path / "x" / "report.html"
    assert main(["demo/app", "-o", str(out), "--record-dir", str(record_dir)]) == 0
    captured = capsys.readouterr()
    assert "warning: record ends at tick 5 without an end entry" in captured.err
    assert 'id="incomplete"' in out.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["web"], "no record for 'web'"),
        (["{dir}/empty.jsonl"], "empty.jsonl: the record is empty"),
        (["{dir}/failover.jsonl"], "failover.jsonl: record has no start entry"),
    ],
)
def test_cli_errors_are_one_line_not_tracebacks(
    record_dir: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing, empty and headless records exit 1 with one line naming the problem."""
    argv = [a.format(dir=record_dir) for a in args] + ["--record-dir", str(record_dir)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("canary report: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_canary_report_command_runs(record_dir: Path, tmp_path: Path) -> None:
    """`canary report` through the main CLI renders a record in a child process."""
    out = tmp_path / "cli.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "canary",
            "report",
            "demo/app@aaa",
            "--format",
            "md",
            "-o",
            str(out),
            "--record-dir",
            str(record_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert out.read_text().startswith("### Canary demo/app: ✅ promoted")


# --- HTTP ------------------------------------------------------------------------------------


@pytest.fixture
async def reports_server(record_dir: Path) -> AsyncIterator[str]:
    app = web.Application()
    register_routes(app, record_dir=record_dir)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_reports_index_lists_recent_rollouts(reports_server: str) -> None:
    """/reports/ is an HTML index, newest first, linking each report with its outcome."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{reports_server}/reports/") as response:
            assert response.status == 200 and response.content_type == "text/html"
            page = await response.text()
        async with session.get(f"{reports_server}/reports?format=json") as response:
            assert response.status == 200  # /reports redirects to /reports/
            listed = (await response.json())["reports"]
    order = [page.index(f'href="{i}"') for i in ("demo_app_ccc", "demo_app_bbb", "demo_app_aaa")]
    assert order == sorted(order)
    assert '<td class="rolled_back">rolled back</td>' in page
    assert [r["outcome"] for r in listed] == ["running", "rolled_back", "promoted", "promoted"]


async def test_report_page_is_served_in_each_format(reports_server: str) -> None:
    """/reports/{id} serves the HTML report, and Markdown or JSON on request."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{reports_server}/reports/demo_app_bbb") as response:
            assert response.status == 200 and response.content_type == "text/html"
            assert "rolled back" in await response.text()
        async with session.get(f"{reports_server}/reports/demo_app_bbb?format=json") as response:
            data = await response.json()
            assert data["rollout"] == "demo/app@bbb" and data["report_schema"] == 1
        async with session.get(f"{reports_server}/reports/demo_app_aaa?format=md") as response:
            assert response.content_type == "text/markdown"
            assert "promoted" in await response.text()


async def test_report_errors_are_http_errors_with_reasons(reports_server: str) -> None:
    """Unknown ids are 404 and a bad format 400, each with a message."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{reports_server}/reports/nope") as response:
            assert response.status == 404
            assert "no report 'nope'" in await response.text()
        async with session.get(f"{reports_server}/reports/demo_app_aaa?format=pdf") as response:
            assert response.status == 400
            assert "format must be one of html, md, json" in await response.text()
