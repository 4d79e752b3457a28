"""ManagedProcess: real child processes started, probed, and stopped by PID, sync and async.

The children are small Python programs run with sys.executable, plus HAProxy, Prometheus and
PowerDNS for the subclasses that render their configs. Each test checks the PIDs are gone
afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from canary.demo.procs import (
    HAProxyConfig,
    HAProxyProcess,
    ManagedProcess,
    PowerDNSProcess,
    ProcessError,
    ProcessNotReady,
    ProcessStateError,
    PrometheusProcess,
    TcpReady,
    UnixSocketReady,
    free_port,
    free_udp_tcp_port,
    render_prometheus_config,
)

LISTEN = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
time.sleep(600)
"""

STUBBORN = """
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
time.sleep(600)
"""

WITH_GRANDCHILD = """
import socket, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(child.pid))
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """True once no process has this PID (reaped, not a zombie of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.02)
    return False


def python(code: str, *args: object, log: Path, port: int, **kwargs: float) -> ManagedProcess:
    return ManagedProcess(
        [sys.executable, "-c", code, *map(str, args)],
        log_path=log,
        ready=TcpReady(port),
        **kwargs,  # type: ignore[arg-type]
    )


def test_sync_start_waits_for_readiness_and_stop_reaps(tmp_path: Path) -> None:
    """start_sync returns once the port accepts; stop_sync leaves no process behind."""
    port = free_port()
    with python(LISTEN, port, log=tmp_path / "l.log", port=port) as proc:
        assert proc.running
        assert TcpReady(port).probe()
        pid = proc.pid
        assert pid is not None
    assert proc.returncode == -signal.SIGTERM
    assert gone(pid)


async def test_async_start_waits_for_readiness_and_stop_reaps(tmp_path: Path) -> None:
    """The async context manager starts, probes and stops by PID the same way."""
    port = free_port()
    async with python(LISTEN, port, log=tmp_path / "l.log", port=port) as proc:
        assert await TcpReady(port).probe_async()
        pid = proc.pid
        assert pid is not None
    assert proc.returncode == -signal.SIGTERM
    assert gone(pid)
    assert "listening" in proc.log_tail()  # stdout went to the log


async def test_sigterm_ignored_means_sigkill_after_grace(tmp_path: Path) -> None:
    """A child that ignores SIGTERM is killed after the grace period, and reaped."""
    port = free_port()
    proc = python(STUBBORN, port, log=tmp_path / "s.log", port=port, stop_grace=0.3)
    await proc.start()
    pid = proc.pid
    assert pid is not None
    await proc.stop()
    assert proc.returncode == -signal.SIGKILL
    assert gone(pid)


def test_stop_kills_what_the_child_left_in_its_group(tmp_path: Path) -> None:
    """Grandchildren (like HAProxy's workers) go with the process group at stop."""
    port, pidfile = free_port(), tmp_path / "grandchild.pid"
    with python(WITH_GRANDCHILD, port, pidfile, log=tmp_path / "g.log", port=port):
        grandchild = int(pidfile.read_text())
        assert not gone(grandchild)
    assert wait_gone(grandchild), f"grandchild {grandchild} survived"


async def test_readiness_timeout_raises_with_the_log_tail(tmp_path: Path) -> None:
    """Not ready in time: ProcessNotReady with what it waited for and the log's last lines."""
    port = free_port()
    code = "import sys, time; print('booting: still loading plugins', flush=True); time.sleep(600)"
    # 2 s, not less: the child must have printed before the timeout, even on a busy machine.
    proc = python(code, log=tmp_path / "t.log", port=port, ready_timeout=2.0)
    with pytest.raises(ProcessNotReady) as caught:
        await proc.start()
    message = str(caught.value)
    assert "not ready after 2s" in message
    assert f"TCP connect to 127.0.0.1:{port}" in message
    assert "booting: still loading plugins" in message
    assert proc.pid is not None and gone(proc.pid)  # stopped on the way out


def test_exit_before_ready_raises_with_status_and_log_tail(tmp_path: Path) -> None:
    """A child that dies first: ProcessNotReady with its exit status and its stderr."""
    code = "import sys; print('config error: no such file', file=sys.stderr); sys.exit(3)"
    proc = python(code, log=tmp_path / "e.log", port=free_port())
    with pytest.raises(ProcessNotReady, match="exited with status 3") as caught:
        proc.start_sync()
    assert "config error: no such file" in str(caught.value)


def test_starting_twice_is_refused(tmp_path: Path) -> None:
    """A ManagedProcess runs once; a second start is ProcessStateError, not a second child."""
    port = free_port()
    with python(LISTEN, port, log=tmp_path / "l.log", port=port) as proc:
        with pytest.raises(ProcessStateError, match="already started"):
            proc.start_sync()


def test_unix_socket_readiness(sockdir: Path) -> None:
    """UnixSocketReady is false for a missing path and true once something listens."""
    path = sockdir / "ready.sock"
    ready = UnixSocketReady(path)
    assert not ready.probe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        assert not ready.probe()  # bound but not listening
        listener.listen()
        assert ready.probe()


def test_haproxy_that_cannot_bind_fails_with_its_own_words(
    tmp_path: Path, sockdir: Path, haproxy_binary: str
) -> None:
    """HAProxy on a port already taken exits before ready; the error quotes HAProxy."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = HAProxyConfig(
            frontend_port=port,
            primary_addr="127.0.0.1:1",
            canary_addr="127.0.0.1:2",
            socket_path=sockdir / "admin.sock",
            state_file=tmp_path / "state",
        )
        haproxy = HAProxyProcess(config, workdir=tmp_path, binary=haproxy_binary)
        with pytest.raises(ProcessNotReady, match="exited with status") as caught:
            haproxy.start_sync()
        assert "cannot bind socket" in str(caught.value)
    assert haproxy.pid is not None and wait_gone(haproxy.pid)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("primary_weight", 300),
        ("canary_weight", -1),
        ("canary_addr", "localhost"),
        ("mode", "udp"),
        ("backend", "my app"),
        ("canary_server", "primary"),
        ("socket_path", Path("/tmp") / ("x" * 120)),
    ],
)
def test_bad_haproxy_config_names_the_field(field: str, value: object, tmp_path: Path) -> None:
    """HAProxyConfig refuses bad values with the field's name in the message."""
    args: dict[str, object] = {
        "frontend_port": 1,
        "primary_addr": "127.0.0.1:1",
        "canary_addr": "127.0.0.1:2",
        "socket_path": tmp_path / "s",
        "state_file": tmp_path / "st",
        field: value,
    }
    with pytest.raises(ValueError, match=field):
        HAProxyConfig(**args)  # type: ignore[arg-type]


def test_prometheus_config_scrapes_the_targets_at_the_interval() -> None:
    """The rendered Prometheus config lists the targets and the scrape interval in ms."""
    text = render_prometheus_config(["127.0.0.1:9100", "127.0.0.1:9101"], scrape_interval_s=0.5)
    assert 'targets: ["127.0.0.1:9100", "127.0.0.1:9101"]' in text
    assert "scrape_interval: 500ms" in text
    with pytest.raises(ValueError, match="scrape_interval_s must be positive"):
        render_prometheus_config([], scrape_interval_s=0)


def test_free_port_is_bindable_on_loopback() -> None:
    """free_port gives a port that can be bound on 127.0.0.1 right away."""
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_prometheus_reload_switches_targets(tmp_path: Path, prometheus_binary: str) -> None:
    """PrometheusProcess.reload rewrites the config and Prometheus loads the new targets."""
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    async with PrometheusProcess([first], workdir=tmp_path, binary=prometheus_binary) as prometheus:
        before = await loaded_config(prometheus.url)
        await prometheus.reload([second])
        after = await loaded_config(prometheus.url)
    assert first in before and second not in before
    assert second in after and first not in after
    assert prometheus.pid is not None and gone(prometheus.pid)


async def loaded_config(url: str) -> str:
    """The configuration Prometheus runs with now, as it reports it."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/v1/status/config") as resp:
            body = await resp.json()
    return str(body["data"]["yaml"])


def test_free_udp_tcp_port_is_bindable_for_both_on_loopback() -> None:
    """free_udp_tcp_port gives a port that binds on 127.0.0.1 for UDP and for TCP."""
    port = free_udp_tcp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", port))
        tcp.bind(("127.0.0.1", port))


async def test_powerdns_serves_its_api_creates_zones_and_stops_by_pid(tmp_path: Path) -> None:
    """PowerDNSProcess starts on its own sqlite database, lists a created zone, refuses it twice."""
    async with PowerDNSProcess(workdir=tmp_path, api_key="k") as pdns:
        await pdns.create_zone("procs.test.")
        async with aiohttp.ClientSession(headers={"X-API-Key": "k"}) as session:
            url = f"{pdns.api_url}/api/v1/servers/localhost/zones"
            async with session.get(url) as resp:
                zones = [zone["name"] for zone in await resp.json()]
        with pytest.raises(ProcessError, match=r"refused the zone procs\.test\.: HTTP 409"):
            await pdns.create_zone("procs.test.")
    assert zones == ["procs.test."]
    assert "enable-lua-records=yes" in (tmp_path / "pdns.conf").read_text()
    assert pdns.pid is not None and gone(pdns.pid)


def test_powerdns_without_its_schema_names_the_file(tmp_path: Path) -> None:
    """A missing gsqlite3 schema file is an error naming it, before anything is started."""
    missing = tmp_path / "no-schema.sql"
    pdns = PowerDNSProcess(workdir=tmp_path / "pdns", api_key="k", schema=missing)
    with pytest.raises(ProcessError, match=str(missing)):
        pdns.start_sync()
    assert pdns.pid is None
