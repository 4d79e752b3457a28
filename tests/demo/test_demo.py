"""The demo: its sample service, its load generator, and `canary demo` end to end.

Everything runs for real on 127.0.0.1: the service as its own process (sys.executable), the
load generator against it, and the whole demo as `python -m canary demo` with real HAProxy
and Prometheus. Every process a test starts is stopped by PID, and checked gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from analysis import ArmCounts, Decision, MetricResult, Verdict
from canary.core.records import EndEntry, Entry, NoteEntry, TickEntry, TransitionEntry, read_record
from canary.demo.loadgen import LoadGenerator, SplitStats
from canary.demo.progress import decisive_reason, format_duration, format_tick
from canary.demo.service import VERSION_HEADER, ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{url}: not up after {deadline_s}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes, but only its parent can tell: check /proc.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def start_service(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "canary.demo.service", "--port", str(port), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


@pytest.fixture
def canary_service() -> Iterator[int]:
    proc, port = start_service("--version", "canary", "--error-rate", "0.2", "--seed", "7")
    yield port
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not pid_alive(proc.pid)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus exposition text (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:]+)\{(.*)\} (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if found == labels:
            return float(match.group(3))
    return 0.0


# --- the sample service ---------------------------------------------------------------


def test_service_names_its_version_and_exports_counters_and_histogram(canary_service: int) -> None:
    """Each answer carries the version header; /metrics counts requests by code and latency."""
    codes = []
    for _ in range(40):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{canary_service}/", timeout=5) as r:
                assert r.headers[VERSION_HEADER] == "canary"
                codes.append(r.status)
        except urllib.error.HTTPError as err:
            assert err.headers[VERSION_HEADER] == "canary"
            codes.append(err.code)
    text = scrape(canary_service)
    ok = sample(text, "http_requests_total", code="200", version="canary")
    bad = sample(text, "http_requests_total", code="500", version="canary")
    assert (ok, bad) == (codes.count(200), codes.count(500))
    assert 0 < bad < 40  # error rate 0.2: some, not all
    assert sample(text, "http_request_duration_seconds_count", version="canary") == 40
    assert sample(text, "http_request_duration_seconds_bucket", le="+Inf", version="canary") == 40
    # Prometheus' default buckets, so the analysis sees the usual `le` bounds.
    assert 'le="0.005"' in text and 'le="10.0"' in text


def test_service_rejects_bad_flags_naming_them() -> None:
    """A bad error rate or version exits 2 with a message naming the flag."""
    for args, flag in (
        (["--version", "canary", "--error-rate", "1.5"], "--error-rate"),
        (["--version", "beta"], "--version"),
        (["--version", "canary", "--latency-ms", "-1"], "--latency-ms"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "canary.demo.service", "--port", "1", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2
        assert flag in out.stderr


def test_service_latency_is_log_normal_around_the_median() -> None:
    """With a fixed seed, half the drawn latencies fall below latency_ms."""

    settings = ServiceSettings(version="primary", latency_ms=40.0, latency_jitter=0.5)
    rng = random.Random(3)
    draws = sorted(settings.draw_latency_s(rng) for _ in range(4001))
    assert draws[2000] == pytest.approx(0.040, rel=0.05)
    assert draws[0] > 0


# --- the load generator ---------------------------------------------------------------


def test_loadgen_refuses_anything_but_loopback() -> None:
    """Traffic goes to loopback only; other hosts are refused up front, naming the host."""
    with pytest.raises(ValueError, match=r"example\.com"):
        LoadGenerator("http://example.com/")
    with pytest.raises(ValueError, match=r"10\.0\.0\.1"):
        LoadGenerator("http://10.0.0.1:8080/")
    with pytest.raises(ValueError, match="rate"):
        LoadGenerator("http://127.0.0.1:1/", rate=0)
    LoadGenerator("http://localhost:1/")


async def test_loadgen_counts_match_the_services_own_counters(canary_service: int) -> None:
    """What the load generator counted per version and status is what the service exported."""
    gen = LoadGenerator(f"http://127.0.0.1:{canary_service}/", rate=200)
    task = asyncio.create_task(gen.run())
    await asyncio.sleep(1.5)
    gen.stop()
    await task
    stats = gen.stats()
    assert stats.failed == 0 and stats.dropped == 0
    assert stats.primary == 0 and stats.canary_share == 1.0
    assert 200 <= stats.completed <= 400  # ~1.5 s at 200/s, open loop
    text = await asyncio.to_thread(scrape, canary_service)
    assert stats.canary - stats.canary_errors == sample(
        text, "http_requests_total", code="200", version="canary"
    )
    assert stats.canary_errors == sample(text, "http_requests_total", code="500", version="canary")


async def test_loadgen_counts_unreachable_targets_as_failed() -> None:
    """A closed port yields failures with no version, never a crash or a made-up split."""
    gen = LoadGenerator(f"http://127.0.0.1:{free_port()}/", rate=50)
    task = asyncio.create_task(gen.run())
    await asyncio.sleep(0.5)
    gen.stop()
    await task
    stats = gen.stats()
    assert stats.failed > 0 and stats.completed == 0
    assert stats.canary_share is None
    assert gen.last_failure is not None


# --- `canary demo` end to end ---------------------------------------------------------

# Short steps and a little more traffic than the default, so each run takes well under a
# minute; everything else (HAProxy, Prometheus, the analysis, the controller) is the real one.
FAST = ["--rate", "300", "--steps", "25,50", "--step-seconds", "3", "--max-step-seconds", "120"]
DEMO = [sys.executable, "-m", "canary", "demo"]


def child_pids(output: str) -> dict[str, int]:
    """The PIDs the demo printed for the processes it started."""
    match = re.search(r"processes \(pid\): (.*)", output)
    assert match, f"the demo did not print its processes:\n{output}"
    pids = {name: int(pid) for name, pid in re.findall(r"([\w-]+) (\d+)", match.group(1))}
    assert set(pids) == {"service-primary", "service-canary", "haproxy", "prometheus"}
    return pids


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (HAProxy's workers share the master's group)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def assert_all_stopped(pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        assert not pid_alive(pid), f"{name} (pid {pid}) outlived the demo"
        assert not group_members(pid), f"{name}'s process group {pid} outlived the demo"


def run_demo(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    """Run `python -m canary demo` to its end; returns (exit status, output, record dir)."""
    record_dir = tmp_path / "records"
    out = subprocess.run(
        [*DEMO, *FAST, "--record-dir", str(record_dir), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return out.returncode, out.stdout + out.stderr, record_dir


def read_only_record(record_dir: Path) -> list[Entry]:
    records = list(record_dir.glob("*.jsonl"))
    assert len(records) == 1, records
    return read_record(records[0])


def assert_split_follows_weights(entries: list[Entry]) -> set[int]:
    """Every tick's split measured at the load generator (since its weight took) is within
    3 points of the weight set. Returns the weights that were checked."""
    checked = set()
    for entry in entries:
        if isinstance(entry, TickEntry) and entry.observed_canary_share is not None:
            share = 100 * entry.observed_canary_share
            assert abs(share - entry.weight_set) <= 3.0, (
                f"at {entry.elapsed_s:.1f}s weight {entry.weight_set}% but {share:.1f}% measured"
            )
            checked.add(entry.weight_set)
    return checked


def test_demo_promotes_a_healthy_canary(tmp_path: Path) -> None:
    """Same errors and latency: promoted, exit 0, split within 3 points at every step,
    no process left, and the report command the demo prints renders the report."""
    code, output, record_dir = run_demo(tmp_path)
    assert code == 0, output
    assert "outcome:  PROMOTED" in output
    assert_all_stopped(child_pids(output))
    entries = read_only_record(record_dir)
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.outcome == "promoted", end
    assert assert_split_follows_weights(entries) >= {25, 50}
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    assert ticks[-1].verdict is not None and ticks[-1].verdict.decision == "pass"
    assert ticks[-1].canary is not None and ticks[-1].canary.requests > 0
    # the planner's advice: from the demo's rate at the start, then from what it observed
    # (unless the analysis passed before its counts could stand in for the guesses, at 10 s)
    assert re.search(r"^  planner: time to pass at 25% \(assumed 300 req/s", output, re.M), output
    advice = [e for e in entries if isinstance(e, NoteEntry) and e.plan]
    assert advice and advice[0].plan["elapsed_s"] == 0.0 and entries[0].plan  # type: ignore[union-attr]
    passed_at = next(t.elapsed_s for t in ticks if t.verdict and t.verdict.decision == "pass")
    observed = [a for a in advice if a.plan["elapsed_s"]]
    assert observed or passed_at < 12, [a.message for a in advice]
    if observed:
        assert "planner: time to pass at 25% (observed over" in output

    # The demo's last line says how to open the report; run exactly that.
    match = re.search(r"^report:\s+(.*?)\s+\(", output, re.MULTILINE)
    assert match, output
    argv = shlex.split(match.group(1))
    assert argv[1:] == ["report", "demo", "--record-dir", "records"]
    report = subprocess.run(
        [sys.executable, "-m", "canary", *argv[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    html = Path(tmp_path, report.stdout.strip()).read_text()
    assert re.search(r"<title>[^<]*\bpromoted\b[^<]*</title>", html), html[:500]
    assert "<svg" in html


def test_demo_rolls_back_a_canary_with_more_errors(tmp_path: Path) -> None:
    """5 points more errors on the canary: rolled back, exit 1, weight back to 0, no process left."""
    code, output, record_dir = run_demo(tmp_path, "--canary-error-rate", "0.05")
    assert code == 1, output
    assert "outcome:  ROLLED BACK" in output
    assert_all_stopped(child_pids(output))
    entries = read_only_record(record_dir)
    end = entries[-1]
    assert isinstance(end, EndEntry) and end.outcome == "rolled_back", end
    assert "errors" in end.reason
    assert assert_split_follows_weights(entries)
    last = [e for e in entries if isinstance(e, TransitionEntry)][-1]
    assert (last.to_phase, last.weight) == ("Failed", 0)
    fail = [e for e in entries if isinstance(e, TickEntry) and e.verdict is not None][-1]
    assert fail.verdict is not None and fail.verdict.decision == "fail"


JSON_ROLLBACK = ("--canary-error-rate", "0.05", "--log-format", "json")


def test_demo_logs_the_controllers_events_as_json_lines(tmp_path: Path) -> None:
    """`--log-format json`: the progress lines stay on stdout; stderr is the controller's
    events, every line one JSON object, the rollback's transitions naming the rollout, its
    phase and the decision."""
    out = subprocess.run(
        [*DEMO, *FAST, "--record-dir", str(tmp_path / "records"), *JSON_ROLLBACK],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "outcome:  ROLLED BACK" in out.stdout
    assert_all_stopped(child_pids(out.stdout))
    events = [json.loads(line) for line in out.stderr.splitlines()]
    assert events and all({"timestamp", "level", "logger", "message"} <= set(e) for e in events)
    back = [
        e for e in events if e["logger"] == "canary.runner" and "-> RollingBack" in e["message"]
    ]
    assert back and back[0]["rollout"] == "demo" and back[0]["phase"] == "RollingBack"
    assert back[0]["decision"] == "fail" and back[0]["level"] == "info"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_every_child_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    """Ctrl-C or SIGTERM mid-rollout: exit 128+signal, and every process it started is gone."""
    proc = subprocess.Popen(
        [*DEMO, *FAST, "--step-seconds", "30", "--record-dir", str(tmp_path / "records")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"\s+\d+\.\d+s\s+Progressing", line):
                break  # the rollout is under way
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + rest
    assert proc.returncode == 128 + signum, output
    assert_all_stopped(child_pids(output))
    entries = read_only_record(tmp_path / "records")
    assert not any(isinstance(e, EndEntry) for e in entries)  # interrupted, not over
    assert isinstance(entries[-1], NoteEntry) and "stopped" in entries[-1].message


def test_demo_rejects_bad_flags_naming_them(tmp_path: Path) -> None:
    """Bad steps, rates or record directory exit 2 before anything starts, naming the flag."""
    for args, flag in (
        (["--steps", "50,25"], "--steps"),
        (["--canary-error-rate", "2"], "--canary-error-rate"),
        (["--step-seconds", "10", "--max-step-seconds", "5"], "--max-step-seconds"),
    ):
        out = subprocess.run(
            [*DEMO, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2, out
        assert flag in out.stderr
        assert not (tmp_path / "canary-records").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = subprocess.run(
        [*DEMO, "--record-dir", str(blocker / "records")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert "--record-dir" in out.stderr and "cannot create it" in out.stderr
    assert "processes (pid)" not in out.stdout  # refused before starting anything


# --- progress lines -------------------------------------------------------------------


def _metric(name: str, decision: Decision, reason: str) -> MetricResult:
    return MetricResult(
        name=name,
        decision=decision,
        critical=True,
        test="t",
        tolerance=1.0,
        alpha=0.01,
        reason=reason,
    )


def test_progress_line_shows_weight_split_arms_and_the_deciding_reason() -> None:
    """One tick line: weight set next to the measured split, per-arm rates, the failing
    metric's reason shortened to its summary."""
    verdict = Verdict(
        decision=Decision.FAIL,
        reasons=["errors: bad — details", "latency_p50: fine — details"],
        metrics={
            "latency_p50": _metric("latency_p50", Decision.PASS, "latency_p50: fine — x"),
            "errors": _metric("errors", Decision.FAIL, "errors: canary 5% vs 0.5% — e=200"),
        },
        elapsed_s=12.0,
    )
    tick = TickEntry(
        at=0.0,
        rollout="demo@1",
        elapsed_s=12.0,
        phase="Progressing",
        step=1,
        weight_set=25,
        weight_read=25,
        primary=ArmCounts(requests=900, errors=9),
        canary=ArmCounts(requests=300, errors=15),
        verdict=verdict,
    )
    split = SplitStats(
        since=0.0,
        until=1.0,
        completed=1200,
        primary=901,
        canary=299,
        primary_errors=9,
        canary_errors=15,
        failed=0,
        dropped=0,
    )
    line = format_tick(tick, steps=3, split=split)
    assert "step 2/3" in line and "weight  25%" in line
    assert "measured  24.9% of  1200" in line
    assert "primary    900 req  1.00% err" in line and "canary    300 req  5.00% err" in line
    assert line.endswith("fail: errors: canary 5% vs 0.5%")
    assert decisive_reason(verdict) == "errors: canary 5% vs 0.5%"


def test_progress_line_says_why_there_is_no_data() -> None:
    """A tick without metrics shows the provider's reason instead of counts."""
    tick = TickEntry(
        at=0.0,
        rollout="demo@1",
        elapsed_s=1.0,
        phase="Progressing",
        step=0,
        weight_set=10,
        weight_read=10,
        primary=None,
        canary=None,
        no_data_reason="empty result: no series",
    )
    line = format_tick(tick, steps=3, split=None)
    assert "measured   -" in line and "primary      - req" in line
    assert line.endswith("no data: empty result: no series")
    assert (format_duration(58.34), format_duration(102)) == ("58.3s", "1m42s")
