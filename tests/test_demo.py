"""The demo: its sample service, its load generator, and `canary demo` end to end.

Everything runs for real on 127.0.0.1: the service as its own process (sys.executable), the
load generator against it, and the whole demo as `python -m canary demo` with real HAProxy
and Prometheus. Every process a test starts is stopped by PID, and checked gone.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from canary.demo.loadgen import LoadGenerator
from canary.demo.service import VERSION_HEADER, ServiceSettings

ROOT = Path(__file__).resolve().parent.parent


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
