"""Reports never show a secret a record holds, and the Markdown report cannot carry markup.

Records written before redaction existed (or by another writer) may hold a Prometheus URL
with credentials in the start entry's config and in "no data" reasons: every format masks
them on the way in. Record text (reasons, notes, who) is escaped in Markdown as it is in HTML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.report_records import Scenario, simulate

from canary.reports import build_report, render_html, render_json, render_markdown
from canary.reports.pages import load_report

SECRET_URL = "http://prom-user:s3cret@127.0.0.1:9090"


@pytest.fixture(scope="module")
def entries() -> list[dict[str, Any]]:
    return simulate(Scenario(seed=11, canary_error_rate=0.01, manual_pause_at_tick=3))


def _with_secrets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [dict(e) for e in entries]
    out[0] = {
        **out[0],
        "config": {
            **out[0].get("config", {}),
            "metrics": {"url": SECRET_URL, "api_key": "k-123"},
            "webhook": "https://hooks.example/x?token=t0k3n",
        },
    }
    ticks = [i for i, e in enumerate(out) if e["kind"] == "tick"]
    out[ticks[2]] = {
        **out[ticks[2]],
        "primary": None,
        "canary": None,
        "verdict": None,
        "no_data_reason": f"prometheus unreachable at {SECRET_URL}: ConnectionError",
    }
    out.insert(
        ticks[3],
        {**out[ticks[3]], "kind": "note", "level": "warning", "message": f"retrying {SECRET_URL}"},
    )
    return out


def test_old_records_with_secrets_render_without_them(
    entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A record holding credentials, an API key and a token gives HTML, JSON and Markdown
    (and `load_report` from a file) that show none of them, but still show the URL's host."""
    record = _with_secrets(entries)
    path = tmp_path / "app.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in record), encoding="utf-8")
    for report in (build_report(record), load_report(path)):
        for text in (render_html(report), render_json(report), render_markdown(report)):
            for secret in ("s3cret", "prom-user", "k-123", "t0k3n"):
                assert secret not in text
        assert "127.0.0.1:9090" in render_html(report)
        assert any(
            "prometheus unreachable at http://***@127.0.0.1:9090" in n.message for n in report.notes
        )


def test_markdown_escapes_html_from_the_record(entries: list[dict[str, Any]]) -> None:
    """A `<script>` in a note, an `<img onerror>` in a manual reason, a link in `who` and a
    backtick in the rollout id reach Markdown as inert text."""
    hostile = [dict(e) for e in entries]
    manual = next(i for i, e in enumerate(hostile) if e["kind"] == "manual")
    hostile[manual] = {
        **hostile[manual],
        "who": "[click](javascript:alert(1))",
        "reason": '<img src=x onerror="alert(1)">',
    }
    hostile.insert(
        manual + 1,
        {
            **hostile[manual],
            "kind": "note",
            "level": "info",
            "message": "<script>alert(1)</script>",
        },
    )
    text = render_markdown(build_report(hostile))
    assert "<script>" not in text and "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert '&lt;img src=x onerror="alert(1)"&gt;' in text
    assert "[click](" not in text and "\\[click\\](javascript:alert(1))" in text
