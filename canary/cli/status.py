"""`canary status` as kubectl users expect: a table, `-o json|yaml|wide`, `--watch`, `--wait`.

main.py (a `canary run` server) and kubernetes.py (a cluster) each fetch the rollouts their
own way and hand `show(args, fetch)` a function that returns them as `Row`s (or an exit
status when it cannot); everything users see is drawn here, with rich.

- plain: one table row per rollout (name, phase, step i/n, weight set/read, decision, time at
  step), the planner's advice under a running one; `-o wide` adds the last decision's
  per-metric summary, the rollout id and record, and the message.
- `-o json|yaml`: the full objects, keys sorted (the server's /rollouts states; in a cluster
  each Deployment's namespace, name and parsed status annotation).
- `--watch`: the same rollouts as panels redrawn every `--interval` seconds (rich's Live):
  step, weight set and read back, each metric's decision and bounds from the last verdict,
  time at step, advice. Ctrl-C or SIGTERM ends it with status 0.
- `--wait promoted|done NAME`: polls until the rollout is over. Exit statuses below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from canary.cli.common import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_STOPPED

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_TIMEOUT",
    "Row",
    "add_status_flags",
    "from_server",
    "parse_timeout",
    "render_frame",
    "render_list",
    "render_panel",
    "render_table",
    "show",
]

EXIT_TIMEOUT = 3  # --wait: the timeout passed first
EXIT_CODES_HELP = (
    "Exit status: 0 shown (with --wait: the state was reached), 1 with --wait: the rollout "
    "ended otherwise (rolled back or aborted), 2 bad usage, 3 the controller or cluster could "
    "not be reached, or with --wait the --timeout passed (or Ctrl-C/SIGTERM came) first, "
    "4 no such rollout."
)
OVER = ("Succeeded", "Failed")

# fetch() -> the rollouts, or an exit status after printing why it could not get them
Fetch = Callable[[], "list[Row] | int"]


@dataclass
class Row:
    """One rollout as `canary status` shows it, whichever target it came from."""

    namespace: str
    name: str
    phase: str  # Progressing, Paused, ..., or "-" when there is no rollout yet
    raw: dict[str, Any]  # the full object for -o json|yaml
    step: int | None = None  # index
    steps: list[int] = field(default_factory=list)
    weight: int | None = None
    weight_read: int | None = None
    weight_verified: bool = False
    last_decision: str | None = None
    outcome: str | None = None
    message: str = ""
    advice: str = ""
    gates: dict[str, str] = field(default_factory=dict)  # gate kind -> its last answer
    step_started_at: float | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollout_id: str = ""
    record: str = ""
    revision: str = ""
    note: str = ""  # why there is nothing else to show (idle, invalid annotations, ...)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def over(self) -> bool:
        return self.phase in OVER


def from_server(state: dict[str, Any]) -> Row:
    """A `canary run` /rollouts state."""
    status = state.get("status") or {}
    phase = str(state.get("phase") or "-")
    weight_read = state.get("weight_read")  # the last tick's read
    if phase in OVER:  # no tick reads the router after the end: the verified weight is the read
        weight_read = state.get("weight") if state.get("weight_verified") else None
    return Row(
        namespace=str(state.get("namespace") or ""),
        name=str(state["name"]),
        phase=phase,
        raw=state,
        step=state.get("step"),
        steps=list(state.get("steps") or []),
        weight=state.get("weight"),
        weight_read=weight_read,
        weight_verified=bool(state.get("weight_verified")),
        last_decision=state.get("last_decision"),
        outcome=status.get("outcome"),
        message=str(state.get("message") or ""),
        advice=str(state.get("advice") or ""),
        gates={str(k): str(v) for k, v in (status.get("gate_answers") or {}).items()},
        step_started_at=status.get("step_started_at"),
        metrics=dict(state.get("metrics") or {}),
        rollout_id=str(state.get("rollout") or ""),
        record=str(state.get("record") or ""),
        revision=str(status.get("revision") or ""),
    )


# ---- flags ------------------------------------------------------------------------------


def add_status_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=("json", "yaml", "wide"),
        help="json or yaml: the full objects (keys sorted); wide: more columns",
    )
    parser.add_argument("--json", action="store_true", help="the same as -o json")
    parser.add_argument(
        "-w", "--watch", action="store_true", help="a live view, redrawn (Ctrl-C ends it)"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often --watch and --wait read the rollouts (default 2)",
    )
    parser.add_argument(
        "--wait",
        choices=("promoted", "done"),
        help="with NAME: wait until the rollout is promoted (exit 0; 1 if it is rolled back "
        "or aborted instead), or until it is over whatever the outcome (exit 0)",
    )
    parser.add_argument(
        "--timeout",
        default="10m",
        metavar="DURATION",
        help="how long --wait waits: 90s, 10m, 1h (default 10m); exit 3 when it passes",
    )


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_timeout(text: str) -> float:
    """'90', '90s', '10m', '1h', '1h30m' -> seconds. Raises ValueError."""
    text = text.strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh]?)", text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"--timeout must be a duration such as 90s, 10m or 1h, got {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


# ---- drawing ----------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _step(row: Row) -> str:
    if row.step is None:
        return "-"
    return f"{row.step + 1}/{len(row.steps)}" if row.steps else f"{row.step + 1}"


def _weight(row: Row) -> str:
    if row.weight is None:
        return "-"
    read = "?" if row.weight_read is None else f"{row.weight_read}%"
    mark = "" if row.weight_verified else " (unverified)"
    return f"{row.weight}% / {read}{mark}"


def _at_step(row: Row, now: float) -> str:
    if row.step_started_at is None or row.over:
        return "-"
    return _ago(now - row.step_started_at)


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3g}"


def _metric_line(name: str, metric: dict[str, Any]) -> str:
    return (
        f"{name} {metric.get('decision', '-')} "
        f"{_num(metric.get('estimate'))} [{_num(metric.get('lower'))}, {_num(metric.get('upper'))}]"
    )


_PHASE_STYLE = {
    "Succeeded": "green",
    "Failed": "red",
    "RollingBack": "red",
    "Paused": "yellow",
    "Progressing": "cyan",
    "Promoting": "green",
}


def render_table(rows: list[Row], *, wide: bool = False, now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "PHASE", "STEP", "WEIGHT SET/READ", "DECISION", "AT STEP"):
        table.add_column(column, no_wrap=True)
    if wide:
        for column in ("METRICS", "ROLLOUT", "RECORD", "MESSAGE"):
            table.add_column(column)
    for row in rows:
        cells: list[str | Text] = [
            row.key,
            Text(row.phase if not row.note else row.note, style=_PHASE_STYLE.get(row.phase, "")),
            _step(row),
            _weight(row),
            row.last_decision or "-",
            _at_step(row, now),
        ]
        if wide:
            cells += [
                "; ".join(_metric_line(n, m) for n, m in row.metrics.items()) or "-",
                row.rollout_id or "-",
                row.record or "-",
                row.message or "-",
            ]
            if row.gates:
                cells[-1] = f"{cells[-1]}; gates: {_gates(row)}"
        table.add_row(*cells)
    return table


def _gates(row: Row) -> str:
    return ", ".join(f"{kind} {answer}" for kind, answer in sorted(row.gates.items()))


def render_list(rows: list[Row], *, wide: bool = False, now: float | None = None) -> Group:
    """The table, then the planner's advice on each running rollout (a line each: too long
    for a column)."""
    advice = [
        Text(f"{row.key}: {row.advice}", style="dim") for row in rows if row.advice and not row.over
    ]
    return Group(render_table(rows, wide=wide, now=now), *advice)


def render_panel(row: Row, now: float) -> Panel:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("phase", Text(row.phase, style=_PHASE_STYLE.get(row.phase, "")))
    if row.note:
        head.add_row("state", row.note)
    head.add_row("step", f"{_step(row)}  (steps {', '.join(f'{s}%' for s in row.steps) or '-'})")
    head.add_row("weight set/read", _weight(row))
    head.add_row("at step", _at_step(row, now))
    head.add_row("decision", row.last_decision or "-")
    if row.message:
        head.add_row("message", row.message)
    if row.gates:
        head.add_row("gates", _gates(row))
    parts: list[Any] = [head]
    if row.metrics:
        metrics = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("METRIC", "DECISION", "ESTIMATE", "LOWER", "UPPER", "SCALE"):
            metrics.add_column(column)
        for name, metric in row.metrics.items():
            decision = str(metric.get("decision", "-"))
            style = {"fail": "red", "pass": "green"}.get(decision, "")
            metrics.add_row(
                name + ("" if metric.get("critical", True) else " (not critical)"),
                Text(decision, style=style),
                _num(metric.get("estimate")),
                _num(metric.get("lower")),
                _num(metric.get("upper")),
                str(metric.get("scale") or "ratio"),
            )
        parts.append(metrics)
    if row.advice and not row.over:
        parts.append(Text(f"advice: {row.advice}", style="dim"))
    return Panel(Group(*parts), title=row.key, title_align="left")


def render_frame(rows: list[Row], *, now: float | None = None, error: str = "") -> Group:
    """One --watch frame: a panel per rollout, and when the last read failed, why."""
    now = time.time() if now is None else now
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    parts: list[Any] = [Text(f"canary status  {stamp}  ({len(rows)} rollouts)", style="bold")]
    if error:
        parts.append(Text(f"last read failed: {error}", style="red"))
    parts += [render_panel(row, now) for row in rows] or [Text("no rollouts")]
    return Group(*parts)


# ---- the command ------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM during --watch or --wait."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises _Stop meanwhile (signals go to the main thread only: elsewhere, as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dump(rows: list[Row], output: str) -> str:
    data = {"rollouts": [row.raw for row in rows]}
    if output == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=True, default_flow_style=False))
    return json.dumps(data, indent=2, sort_keys=True)


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped: whole lines, as kubectl (no wrapping at 80 columns)
        console.width = 1000
    return console


def show(args: argparse.Namespace, fetch: Fetch, console: Console | None = None) -> int:
    """`canary status` once the target is known: fetch() reads the rollouts."""
    console = console or _console()
    output = "json" if getattr(args, "json", False) else getattr(args, "output", None)
    wait = getattr(args, "wait", None)
    watch = getattr(args, "watch", False)
    interval = float(getattr(args, "interval", 2.0) or 2.0)
    if interval <= 0:
        print("canary status: error: --interval must be above 0", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if wait:
        if not args.name:
            print("canary status: error: --wait needs a rollout NAME", file=sys.stderr)
            return EXIT_BAD_CONFIG
        try:
            timeout = parse_timeout(args.timeout)
        except ValueError as exc:
            print(f"canary status: error: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        return _wait(fetch, wait, timeout, interval, console)
    if watch:
        if output in ("json", "yaml"):
            print("canary status: error: --watch draws a live view: not with -o json|yaml",
                  file=sys.stderr)  # fmt: skip
            return EXIT_BAD_CONFIG
        return _watch(fetch, interval, console)
    rows = fetch()
    if isinstance(rows, int):
        return rows
    if output in ("json", "yaml"):
        print(_dump(rows, output))
        return EXIT_OK
    if not rows:
        console.print("no rollouts")
        return EXIT_OK
    console.print(render_list(rows, wide=output == "wide"))
    return EXIT_OK


def _watch(fetch: Fetch, interval: float, console: Console) -> int:
    """Redrawn in place on a terminal (rich's Live); piped, each frame follows the last (as
    `kubectl get -w` appends), since Live draws nothing until it stops there."""
    rows: list[Row] = []
    live = Live(console=console, auto_refresh=False, transient=False)
    try:
        with _sigterm_stops(), live if console.is_terminal else contextlib.nullcontext():
            while True:
                got = fetch()
                error = f"exit status {got}" if isinstance(got, int) else ""
                rows = rows if isinstance(got, int) else got
                frame = render_frame(rows, error=error)
                if console.is_terminal:
                    live.update(frame, refresh=True)
                else:
                    console.print(frame)
                    console.file.flush()
                time.sleep(interval)
    except (KeyboardInterrupt, _Stop):
        return EXIT_OK


def _wait(fetch: Fetch, goal: str, timeout: float, interval: float, console: Console) -> int:
    """Poll one rollout until it is over (or promoted) or the timeout passes."""
    deadline = time.monotonic() + timeout
    last = ""
    try:
        with _sigterm_stops():
            while True:
                got = fetch()
                if isinstance(got, int):
                    if got not in (EXIT_STOPPED,):  # unknown rollout, bad kubeconfig: final
                        return got
                elif got:
                    row = got[0]
                    seen = f"{row.key}: {row.phase} step {_step(row)} weight {_weight(row)}"
                    if seen != last:
                        console.print(seen)
                        last = seen
                    if row.over:
                        promoted = row.phase == "Succeeded" and row.outcome in (None, "promoted")
                        outcome = row.outcome or row.phase
                        if goal == "done" or promoted:
                            console.print(f"{row.key}: {outcome}")
                            return EXIT_OK
                        console.print(f"{row.key}: {outcome}, not promoted")
                        return EXIT_FAILED
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    console.print(f"canary status: timed out waiting for {goal}", style="red")
                    return EXIT_TIMEOUT
                time.sleep(min(interval, remaining))
    except (KeyboardInterrupt, _Stop):
        return EXIT_TIMEOUT
