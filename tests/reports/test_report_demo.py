"""Reports of records written by the real `canary demo` (HAProxy, Prometheus, controller).

The records in tests/reports/data/ were produced by
`python -m canary.demo --rate 300 --steps 25,50 --step-seconds 3 --max-step-seconds 60`
(and `--canary-error-rate 0.03` for the rollback), kept gzipped so this test does not rerun
the demo (tests/demo/test_demo.py does, and renders its report through the CLI).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
from support.report_records import external_references

from canary.cli.report import main
from canary.reports import build_report, render_html, render_json, render_markdown

DATA = Path(__file__).parent / "data"


def _lines(name: str) -> list[str]:
    return gzip.decompress((DATA / name).read_bytes()).decode("utf-8").splitlines()


@pytest.mark.parametrize(
    ("name", "outcome", "decision"),
    [
        ("report_demo_promoted.jsonl.gz", "promoted", "pass"),
        ("report_demo_rolled_back.jsonl.gz", "rolled_back", "fail"),
    ],
)
def test_demo_record_report(name: str, outcome: str, decision: str) -> None:
    """A demo record renders in every format: the outcome and deciding verdict are the
    record's, final counts match the last tick, and the HTML is self-contained with charts."""
    entries: list[dict[str, Any]] = [json.loads(line) for line in _lines(name)]
    report = build_report(entries)
    end, ticks = entries[-1], [e for e in entries if e["kind"] == "tick"]
    assert report.outcome == end["outcome"] == outcome and report.complete
    assert report.duration_s == end["duration_s"] and report.tick_count == len(ticks)
    assert report.decided.by == "analysis" and report.decided.metric is not None
    first = next(t for t in ticks if t["verdict"] and t["verdict"]["decision"] == decision)
    recorded = first["verdict"]["metrics"][report.decided.metric.name]
    assert recorded["decision"] == decision
    assert report.decided.elapsed_s == first["elapsed_s"]
    key = "e_value_fail" if decision == "fail" else "e_value_pass"
    assert report.decided.metric.e_value == recorded[key]
    last = next(t for t in reversed(ticks) if t["canary"] is not None)
    assert report.final_canary is not None
    assert report.final_canary.requests == last["canary"]["requests"]
    assert report.final_canary.errors == last["canary"]["errors"]

    page = render_html(report)
    assert external_references(page) == []
    assert len(re.findall(r'<figure id="chart-', page)) >= 5
    assert f"{round(last['canary']['requests']):,} / {round(last['canary']['errors']):,}" in page
    text = render_markdown(report)
    assert text.startswith(f"### Canary {entries[0]['target']}: ")
    assert json.loads(render_json(report))["decided"]["elapsed_s"] == first["elapsed_s"]


def test_cli_renders_a_demo_record_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`canary report RECORD` on a demo record writes the HTML next to it."""
    record = tmp_path / "demo-20261122T044609Z.jsonl"
    record.write_text("\n".join(_lines("report_demo_rolled_back.jsonl.gz")) + "\n")
    assert main([str(record)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == tmp_path / "demo-20261122T044609Z.html"
    assert "<title>Canary report: demo v2" in out.read_text()
