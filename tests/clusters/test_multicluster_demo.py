"""`canary demo --failover` end to end: the outage and failback, timed, and nothing left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from canary.core.records import read_record


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("failback", ["manual", "auto"])
def test_failover_demo_moves_traffic_within_the_bound_and_back(
    tmp_path: Path, failback: str
) -> None:
    """The demo exits 0, prints each move's time within its printed bound, records both moves (failback by hand or after M healthy seconds), and stops every child."""
    flags = ["--auto-failback", "--healthy-seconds", "1"] if failback == "auto" else []
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "canary",
            "demo",
            "--failover",
            "--record-dir",
            str(tmp_path),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    moved = re.search(r"every client on the standby after ([\d.]+)s \(bound: .* = ([\d.]+)s\)", out)
    assert moved is not None, out
    assert float(moved.group(1)) <= float(moved.group(2))
    assert re.search(r"first client back on the primary after [\d.]+s", out), out
    (record,) = tmp_path.glob("failover-*.jsonl")
    moves = [(e.direction, e.who) for e in read_record(record) if e.kind == "failover"]  # type: ignore[union-attr]
    assert moves[0] == ("to-standby", "controller") and moves[1][0] == "to-primary"
    assert (moves[1][1] == "controller") == (failback == "auto")
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert len(pids) >= 4  # PowerDNS, two services, the restarted primary
    assert [p for p in pids if _alive(p)] == []


def test_failover_demo_rejects_bad_flags_by_name() -> None:
    """A bad value exits 2 naming the flag."""
    result = subprocess.run(
        [sys.executable, "-m", "canary", "demo", "--failover", "--failures", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--failures must be within 1..20, got 0" in result.stderr


def test_failover_demo_stops_every_child_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM during the demo exits 143 and leaves none of the PIDs it printed running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "canary", "demo", "--failover", "--record-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "clusters: ... (pid N) ... PowerDNS pid M ..."
        pids = [int(p) for p in re.findall(r"pid (\d+)", first)]
        assert len(pids) == 3, first
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, out + err
    assert [p for p in pids if _alive(p)] == []
