"""`canary status` drawing (canary.cli.status) through rich's recording Console: the --watch
frame with each metric's decision and bounds, the -o wide table, --watch ended by Ctrl-C and by
SIGTERM with status 0, and the server target's -o json parsed back."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import time
from typing import Any

import pytest
from rich.console import Console

import canary.cli.main as cli
from canary.cli.main import build_parser, main
from canary.cli.status import Row, from_server, parse_timeout, render_frame, render_list, show

NOW = 1_800_000_000.0


def _state(**changes: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "name": "app",
        "rollout": "app-20260101T000000",
        "record": "records/app-20260101T000000.jsonl",
        "phase": "Progressing",
        "step": 1,
        "steps": [10, 50],
        "weight": 50,
        "weight_verified": True,
        "weight_read": 48,
        "last_decision": "continue",
        "reason": "",
        "message": "analysing at 50%",
        "advice": "time to pass at 50%: a good canary needs 2.0 min",
        "stopped": False,
        "status": {"stage": "Progressing", "revision": "b", "step_started_at": NOW - 125},
        "metrics": {
            "errors": {
                "decision": "pass",
                "estimate": 0.93,
                "lower": 0.412,
                "upper": 1.38,
                "scale": "ratio",
                "critical": True,
            },
            "latency_p99": {
                "decision": "continue",
                "estimate": 1.07,
                "lower": 0.8,
                "upper": None,
                "scale": "ratio",
                "critical": False,
            },
        },
    }
    state.update(changes)
    return state


def _text(renderable: Any, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_a_watch_frame_shows_step_weights_metrics_time_and_advice() -> None:
    text = _text(render_frame([from_server(_state())], now=NOW))
    lines = [line.rstrip() for line in text.splitlines()]
    assert "(1 rollouts)" in lines[0]
    assert any(line.startswith("╭─ app ") for line in lines)
    body = "\n".join(lines)
    assert "│ step             2/2  (steps 10%, 50%)" in body
    assert "│ weight set/read  50% / 48%" in body
    assert "│ at step          2m05s" in body
    assert "│ decision         continue" in body
    metric_rows = [line.split() for line in lines if "errors" in line or "latency_p99" in line]
    assert metric_rows[0][1:7] == ["errors", "pass", "0.93", "0.412", "1.38", "ratio"]
    assert metric_rows[1][1:6] == ["latency_p99", "(not", "critical)", "continue", "1.07"]
    assert metric_rows[1][6:8] == ["0.8", "-"]
    assert "advice: time to pass at 50%: a good canary needs 2.0 min" in body


def test_an_ended_rollout_shows_no_time_at_step_nor_advice() -> None:
    """Nor the last tick's read from before the promotion (seen in a real run: 100% / 50%)."""
    ended = _state(
        phase="Succeeded", weight=100, status={"stage": "Succeeded", "outcome": "promoted"}
    )
    text = _text(render_frame([from_server(ended)], now=NOW))
    assert "Succeeded" in text and "advice" not in text
    assert "│ at step          -" in text
    assert "│ weight set/read  100% / 100%" in text


def test_wide_adds_metrics_rollout_record_and_message() -> None:
    text = _text(render_list([from_server(_state())], wide=True, now=NOW), width=300)
    header, row = text.splitlines()[:2]
    assert header.split() == [
        *("NAME", "PHASE", "STEP", "WEIGHT", "SET/READ", "DECISION", "AT", "STEP"),
        *("METRICS", "ROLLOUT", "RECORD", "MESSAGE"),
    ]
    assert "errors pass 0.93 [0.412, 1.38]; latency_p99 continue 1.07 [0.8, -]" in row
    assert "app-20260101T000000" in row and row.rstrip().endswith("analysing at 50%")
    assert text.splitlines()[-1] == "app: time to pass at 50%: a good canary needs 2.0 min"


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["status", "--server", "http://127.0.0.1:1", *argv])


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_watch_redraws_until_ctrl_c_or_sigterm_then_exits_0(stop: str) -> None:
    """Each read is drawn again (the weight read back moves on); the third read is
    interrupted, and the view ends with status 0."""
    reads: list[int] = []

    def fetch() -> list[Row] | int:
        reads.append(1)
        if len(reads) == 3:
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
            raise KeyboardInterrupt
        return [from_server(_state(weight_read=40 + len(reads)))]

    console = Console(record=True, width=120, force_terminal=True, color_system=None)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert show(_args("-w", "--interval", "0.05"), fetch, console=console) == 0
    assert time.monotonic() - started < 3
    assert signal.getsignal(signal.SIGTERM) == before  # put back
    text = console.export_text()
    assert "50% / 41%" in text and "50% / 42%" in text and len(reads) == 3


def test_watch_keeps_the_last_rollouts_when_a_read_fails() -> None:
    answers: list[list[Row] | int] = [[from_server(_state())], 3]

    def fetch() -> list[Row] | int:
        if not answers:
            raise KeyboardInterrupt
        return answers.pop(0)

    console = Console(record=True, width=120, force_terminal=True, color_system=None)
    assert show(_args("-w", "--interval", "0.01"), fetch, console=console) == 0
    text = console.export_text()
    first, failed = text.split("last read failed: exit status 3", 1)
    assert "╭─ app " in first and "╭─ app " in failed  # still drawn after the failed read


def test_server_output_json_is_the_full_states_sorted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    states = [_state(), _state(name="web", metrics={})]
    monkeypatch.setattr(cli, "_request", lambda *a: (200, {"rollouts": states}))
    assert main(["status", "--server", "http://127.0.0.1:1", "-o", "json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"rollouts": states}
    first = json.loads(out)["rollouts"][0]
    assert list(first) == sorted(first)
    assert main(["status", "--server", "http://127.0.0.1:1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rollouts": states}


@pytest.mark.parametrize(
    ("ends", "goal", "code"),
    [
        ("promoted", "promoted", 0),
        ("rolled_back", "promoted", 1),
        ("rolled_back", "done", 0),
    ],
)
def test_server_wait_follows_the_rollout(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ends: str,
    goal: str,
    code: int,
) -> None:
    """Progressing, then unreachable for a read (retried), then over."""
    phase = "Succeeded" if ends == "promoted" else "Failed"
    answers: list[tuple[int, Any] | None] = [
        (200, _state()),
        None,
        (200, _state(phase=phase, status={"stage": phase, "outcome": ends})),
    ]
    monkeypatch.setattr(cli, "_request", lambda *a: answers.pop(0))
    argv = ["status", "app", "--server", "http://127.0.0.1:1", "--wait", goal, "--interval", "0.01"]
    assert main(argv) == code
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "app: Progressing step 2/2 weight 50% / 48%"
    assert out[-1].startswith(f"app: {ends}") and not answers


def test_timeouts_parse_like_kubectls() -> None:
    assert parse_timeout("90") == 90 and parse_timeout("90s") == 90
    assert parse_timeout("10m") == 600 and parse_timeout("1h30m") == 5400
    for bad in ("", "soon", "10 m", "-1s", "m"):
        with pytest.raises(ValueError):
            parse_timeout(bad)


def test_watch_piped_prints_each_frame_as_it_comes() -> None:
    """Not a terminal (a pipe, a log): every frame is printed when read, one after the other,
    rather than only when the view ends."""
    seen: list[str] = []
    console = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    assert not console.is_terminal

    def fetch() -> list[Row] | int:
        seen.append(console.export_text(clear=False))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return [from_server(_state(weight_read=40 + len(seen)))]

    assert show(_args("-w", "--interval", "0.01"), fetch, console=console) == 0
    assert "50% / 41%" in seen[1] and "50% / 42%" in seen[2] and "50% / 41%" in seen[2]
