"""Supervision for the servers canary runs on loopback: HAProxy, Prometheus, PowerDNS, services.

Tests, the demo and the benchmarks all start real servers, and every one of them must be
stopped, by PID, however the run ends. One class does it for both worlds: `ManagedProcess`
is an async context manager (asyncio.create_subprocess_exec, for the demo and async tests)
and a sync one (subprocess.Popen, for session-scoped pytest fixtures). Both share the same
readiness probes, log capture and stop policy, so a fix lands in one place.

Why these choices:
- Each child gets its own session (start_new_session), so Ctrl-C at a terminal does not
  reach it behind our back and a whole process group (HAProxy's master and workers) can be
  killed by the PID we started.
- Output goes to a log file, not a pipe: a pipe nobody reads fills up and stalls the server.
  When a server fails to come up, the error carries the log's tail, which says why.
- Stop is SIGTERM, a grace period, then SIGKILL to the group; the child is always reaped.

Exception tree::

    ProcessError               a supervised process misbehaved
    ├── ProcessNotReady        not ready in time, or exited before ready (log tail included)
    └── ProcessStateError      start twice, reload before start, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from canary.routers.base import Match
from canary.routers.haproxy import ab_rule

__all__ = [
    "POWERDNS_SQLITE3_SCHEMA",
    "HAProxyConfig",
    "HAProxyProcess",
    "HttpReady",
    "ManagedProcess",
    "MasterCliReady",
    "PowerDNSProcess",
    "ProcessError",
    "ProcessNotReady",
    "ProcessStateError",
    "PrometheusProcess",
    "Readiness",
    "TcpReady",
    "UnixSocketReady",
    "find_binary",
    "free_port",
    "free_udp_tcp_port",
    "render_haproxy_config",
    "render_powerdns_config",
    "render_prometheus_config",
]

LOOPBACK = "127.0.0.1"


class ProcessError(RuntimeError):
    """A supervised process misbehaved."""


class ProcessNotReady(ProcessError):
    """The process did not become ready (timeout, or it exited first)."""


class ProcessStateError(ProcessError):
    """An operation that makes no sense in the process' current state."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def free_udp_tcp_port() -> int:
    """A port on 127.0.0.1 free for both UDP and TCP (a DNS server listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port = int(udp.getsockname()[1])
        with socket.socket() as tcp:
            try:
                tcp.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise ProcessError(f"no port free for both UDP and TCP on {LOOPBACK}")


def find_binary(name: str, *, fallbacks: Sequence[str] = ()) -> str:
    """Path of an executable on PATH (or at one of `fallbacks`), else a clear error."""
    import shutil

    found = shutil.which(name)
    if found:
        return found
    for candidate in fallbacks:
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        f"{name} not found on PATH or at {', '.join(fallbacks) or '(no fallbacks)'}; "
        "run scripts/setup to install it"
    )


# --- readiness probes ---------------------------------------------------------------------


class Readiness(Protocol):
    """How to tell that a server is ready to serve. Probes must be quick and never raise."""

    def describe(self) -> str: ...

    def probe(self) -> bool: ...

    async def probe_async(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class TcpReady:
    """Ready once a TCP connect to host:port succeeds."""

    port: int
    host: str = LOOPBACK

    def describe(self) -> str:
        return f"TCP connect to {self.host}:{self.port}"

    def probe(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    async def probe_async(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout=0.5
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


@dataclass(frozen=True, slots=True)
class HttpReady:
    """Ready once GET url answers 200 (e.g. Prometheus' /-/ready)."""

    url: str

    def describe(self) -> str:
        return f"HTTP 200 from GET {self.url}"

    def probe(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    async def probe_async(self) -> bool:
        # urllib is synchronous; a probe is short, but the loop must not block on it.
        return await asyncio.to_thread(self.probe)


@dataclass(frozen=True, slots=True)
class UnixSocketReady:
    """Ready once a unix socket at `path` accepts a connection."""

    path: Path

    def describe(self) -> str:
        return f"unix socket {self.path} accepting"

    def probe(self) -> bool:
        if not self.path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(str(self.path))
            except OSError:
                return False
        return True

    async def probe_async(self) -> bool:
        if not self.path.exists():
            return False
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), timeout=0.5
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


@dataclass(frozen=True, slots=True)
class MasterCliReady:
    """Ready once HAProxy's master CLI (-S) answers `show proc`.

    A worker can serve before its master has entered the loop that handles SIGUSR2; a
    reload signalled in that window is lost. An answer on the master CLI proves the loop.
    """

    path: Path

    def describe(self) -> str:
        return f"HAProxy master CLI {self.path} answering 'show proc'"

    def probe(self) -> bool:
        if not self.path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(self.path))
                sock.sendall(b"show proc\n")
                # The master CLI keeps the connection open after answering: stop at the answer.
                answer = b""
                while b"master" not in answer and (chunk := sock.recv(65536)):
                    answer += chunk
            except OSError:
                return False
        return b"master" in answer

    async def probe_async(self) -> bool:
        if not self.path.exists():
            return False
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_unix_connection(str(self.path))
                try:
                    writer.write(b"show proc\n")
                    await writer.drain()
                    answer = b""
                    while b"master" not in answer and (chunk := await reader.read(65536)):
                        answer += chunk
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False
        return b"master" in answer


# --- the supervised process ---------------------------------------------------------------


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


class ManagedProcess:
    """One child process, started, probed until ready, and stopped by PID.

    Use it as `async with ManagedProcess(...)` or `with ManagedProcess(...)`, or call
    start()/stop() (async) or start_sync()/stop_sync(). Do not mix the two worlds on one
    instance.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        ready: Readiness | None = None,
        ready_timeout: float = 15.0,
        stop_grace: float = 5.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv must name a program")
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self._aproc: asyncio.subprocess.Process | None = None
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int | None:
        if self._aproc is not None:
            return self._aproc.pid
        if self._popen is not None:
            return self._popen.pid
        return None

    @property
    def returncode(self) -> int | None:
        if self._aproc is not None:
            return self._aproc.returncode
        if self._popen is not None:
            return self._popen.poll()
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None and self.returncode is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the process wrote (stdout and stderr together)."""
        return _tail(self.log_path, lines)

    def _not_ready(self, why: str) -> ProcessNotReady:
        return ProcessNotReady(
            f"{self.name} (pid {self.pid}) {why}; argv: {' '.join(self.argv)}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def _open_log(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # async world

    async def start(self) -> Self:
        """Start the process and wait until ready; on failure it is stopped and raises."""
        if self.pid is not None:
            raise ProcessStateError(f"{self.name} was already started (pid {self.pid})")
        log_fd = self._open_log()
        try:
            self._aproc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def wait_ready(self, *, timeout_s: float | None = None) -> None:
        """Poll the readiness probe until it succeeds, the process exits, or time runs out."""
        if self.ready is None:
            return
        deadline = time.monotonic() + (self.ready_timeout if timeout_s is None else timeout_s)
        while True:
            if self.returncode is not None:
                raise self._not_ready(
                    f"exited with status {self.returncode} before {self.ready.describe()}"
                )
            if await self.ready.probe_async():
                return
            if time.monotonic() >= deadline:
                raise self._not_ready(
                    f"not ready after {self.ready_timeout:g}s (waiting for {self.ready.describe()})"
                )
            await asyncio.sleep(0.05)

    async def stop(self) -> int | None:
        """SIGTERM, wait up to stop_grace, then SIGKILL the group; always reaped."""
        proc = self._aproc
        if proc is None:
            return None
        try:
            if proc.returncode is None:
                _signal(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=self.stop_grace)
                except TimeoutError:
                    _kill_group(proc.pid)
                    await proc.wait()
        finally:
            # Anything left in the child's group (e.g. HAProxy workers) goes too, and so
            # does the child itself if this stop was cancelled half-way (Ctrl-C).
            _kill_group(proc.pid)
        return proc.returncode

    def signal(self, signum: int) -> None:
        """Send a signal to the process by PID (e.g. SIGUSR2 to reload HAProxy)."""
        if not self.running or self.pid is None:
            raise ProcessStateError(f"{self.name} is not running")
        _signal(self.pid, signum)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # sync world (pytest fixtures, scripts)

    def start_sync(self) -> Self:
        """Like start(), for code without an event loop."""
        if self.pid is not None:
            raise ProcessStateError(f"{self.name} was already started (pid {self.pid})")
        log_fd = self._open_log()
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        try:
            self.wait_ready_sync()
        except BaseException:
            self.stop_sync()
            raise
        return self

    def wait_ready_sync(self, *, timeout_s: float | None = None) -> None:
        if self.ready is None:
            return
        deadline = time.monotonic() + (self.ready_timeout if timeout_s is None else timeout_s)
        while True:
            if self.returncode is not None:
                raise self._not_ready(
                    f"exited with status {self.returncode} before {self.ready.describe()}"
                )
            if self.ready.probe():
                return
            if time.monotonic() >= deadline:
                raise self._not_ready(
                    f"not ready after {self.ready_timeout:g}s (waiting for {self.ready.describe()})"
                )
            time.sleep(0.05)

    def stop_sync(self) -> int | None:
        proc = self._popen
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait()
        finally:
            _kill_group(proc.pid)
        return proc.returncode

    def __enter__(self) -> Self:
        return self.start_sync()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _kill_group(pid: int) -> None:
    # The child is a session leader, so its PID is its process group's id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --- HAProxy -------------------------------------------------------------------------------


_HAPROXY_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, with its NUL


@dataclass(frozen=True, slots=True)
class HAProxyConfig:
    """One frontend on loopback, one backend of two servers: the shape canary splits.

    Weights are the initial ones; once the server-state file exists, a reload takes the
    weights from it instead (that is the file's whole point).
    """

    frontend_port: int
    primary_addr: str  # "127.0.0.1:8001"
    canary_addr: str
    socket_path: Path
    state_file: Path
    backend: str = "app"
    primary_server: str = "primary"
    canary_server: str = "canary"
    primary_weight: int = 100
    canary_weight: int = 0
    health_checks: bool = False
    mode: str = "http"
    # A/B: the backend's `use-server` rule for this match, looked up in this map file.
    ab_match: Match | None = None
    ab_map: Path | None = None
    # Session affinity: cookie persistence, the servers' cookies named after them.
    cookie: str | None = None

    def __post_init__(self) -> None:
        for field in ("primary_weight", "canary_weight"):
            value = getattr(self, field)
            if not 0 <= value <= 256:
                raise ValueError(f"HAProxyConfig.{field} must be within 0..256, got {value}")
        if self.mode not in ("http", "tcp"):
            raise ValueError(f"HAProxyConfig.mode must be 'http' or 'tcp', got {self.mode!r}")
        for field in ("backend", "primary_server", "canary_server"):
            if not _HAPROXY_NAME.match(getattr(self, field)):
                raise ValueError(
                    f"HAProxyConfig.{field} must be letters, digits, '-', '_', '.' or ':', "
                    f"got {getattr(self, field)!r}"
                )
        if self.primary_server == self.canary_server:
            raise ValueError(
                f"HAProxyConfig.primary_server and canary_server are both {self.primary_server!r}"
            )
        longest = self.master_socket_path  # the admin socket's path plus a suffix
        if len(os.fsencode(longest)) > _SUN_PATH_MAX:
            raise ValueError(
                f"HAProxyConfig.socket_path is too long: {longest} is "
                f"{len(os.fsencode(longest))} bytes, a unix socket path may have at most "
                f"{_SUN_PATH_MAX}"
            )
        for field in ("primary_addr", "canary_addr"):
            host, sep, port = getattr(self, field).rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(
                    f"HAProxyConfig.{field} must be host:port, got {getattr(self, field)!r}"
                )

    @property
    def master_socket_path(self) -> Path:
        """The master CLI socket (-S), next to the admin socket."""
        return Path(f"{self.socket_path}.master")


def render_haproxy_config(cfg: HAProxyConfig) -> str:
    """haproxy.cfg text for `cfg`.

    `balance roundrobin` because it follows weights request by request, so the measured
    split is close to the weight set; one thread keeps it exact and light on small machines.
    """
    check = " check inter 1s" if cfg.health_checks else ""
    ab = ""
    if cfg.ab_match is not None and cfg.ab_map is not None:
        ab = "\n    " + ab_rule(cfg.ab_match, cfg.ab_map, cfg.canary_server)
    primary_cookie = canary_cookie = ""
    if cfg.cookie is not None:
        ab += f"\n    cookie {cfg.cookie} insert indirect nocache"
        primary_cookie = f" cookie {cfg.primary_server}"
        canary_cookie = f" cookie {cfg.canary_server}"
    return f"""\
global
    nbthread 1
    stats socket {cfg.socket_path} mode 600 level admin expose-fd listeners
    server-state-file {cfg.state_file}

defaults
    mode {cfg.mode}
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    load-server-state-from-file global

frontend fe_{cfg.backend}
    bind {LOOPBACK}:{cfg.frontend_port}
    default_backend {cfg.backend}

backend {cfg.backend}
    balance roundrobin{ab}
    server {cfg.primary_server} {cfg.primary_addr} weight {cfg.primary_weight}{check}{primary_cookie}
    server {cfg.canary_server} {cfg.canary_addr} weight {cfg.canary_weight}{check}{canary_cookie}
"""


class HAProxyProcess(ManagedProcess):
    """HAProxy in master-worker mode (-W), so a reload keeps the PID we supervise.

    Reload: dump `show servers state` to the state file, send SIGUSR2 to the master, and
    wait until a new worker answers on the admin socket. Ready (at start and after each
    reload) also means the master CLI (-S) answers: a worker can serve before its master
    handles SIGUSR2, and a reload signalled then was lost (seen under load).
    """

    def __init__(
        self,
        cfg: HAProxyConfig,
        *,
        workdir: Path,
        binary: str | None = None,
        ready_timeout: float = 15.0,
    ) -> None:
        self.config = cfg
        self.config_path = Path(workdir) / "haproxy.cfg"
        haproxy = binary or find_binary("haproxy", fallbacks=("/usr/sbin/haproxy",))
        super().__init__(
            [haproxy, "-W", "-db", "-S", str(cfg.master_socket_path), "-f", str(self.config_path)],
            log_path=Path(workdir) / "haproxy.log",
            ready=_AllReady(
                (
                    TcpReady(cfg.frontend_port),
                    UnixSocketReady(cfg.socket_path),
                    MasterCliReady(cfg.master_socket_path),
                )
            ),
            ready_timeout=ready_timeout,
            name="haproxy",
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.config.frontend_port}/"

    def _write_config(self) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_haproxy_config(self.config))
        if self.config.ab_map is not None and not self.config.ab_map.exists():
            self.config.ab_map.touch()  # HAProxy refuses to start on a missing map file

    async def start(self) -> Self:
        # A config error shows up as "exited before ready" with HAProxy's own words in the tail.
        await asyncio.to_thread(self._write_config)
        return await super().start()

    def start_sync(self) -> Self:
        self._write_config()
        return super().start_sync()

    async def reload(self, *, save_state: bool = True) -> None:
        """Save weights to the state file, reload, and wait until the new worker answers.

        save_state=False reloads without saving first (a reload that forgets weights set
        since the last save: what the state file protects against).
        """
        from canary.routers.base import RouterError
        from canary.routers.haproxy import runtime_command, save_server_state

        if not self.running:
            raise ProcessStateError("haproxy is not running; start it before reloading")
        sock = self.config.socket_path
        old = _worker_pid(await runtime_command(sock, "show info"))
        if save_state:
            await save_server_state(sock, self.config.state_file)
        self.signal(signal.SIGUSR2)
        master = MasterCliReady(self.config.master_socket_path)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise self._not_ready(f"exited with status {self.returncode} during reload")
            try:
                new = _worker_pid(await runtime_command(sock, "show info"))
            except (RouterError, ProcessError):
                new = old  # the socket is briefly absent while the worker changes
            # The master re-executes itself on reload: wait for its loop too, or the next
            # reload's signal could be lost.
            if new != old and await master.probe_async():
                return
            await asyncio.sleep(0.05)
        raise self._not_ready(f"no new worker {self.ready_timeout:g}s after reload")


def _worker_pid(show_info: str) -> str:
    for line in show_info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Pid":
            return value.strip()
    raise ProcessError(f"no Pid in HAProxy's 'show info': {show_info[:200]!r}")


@dataclass(frozen=True, slots=True)
class _AllReady:
    parts: tuple[Readiness, ...]

    def describe(self) -> str:
        return " and ".join(p.describe() for p in self.parts)

    def probe(self) -> bool:
        return all(p.probe() for p in self.parts)

    async def probe_async(self) -> bool:
        for part in self.parts:
            if not await part.probe_async():
                return False
        return True


# --- Prometheus ----------------------------------------------------------------------------


def render_prometheus_config(
    targets: Sequence[str], *, scrape_interval_s: float = 1.0, job: str = "canary"
) -> str:
    """prometheus.yml scraping `targets` ("127.0.0.1:PORT") every `scrape_interval_s`."""
    if scrape_interval_s <= 0:
        raise ValueError(f"scrape_interval_s must be positive, got {scrape_interval_s}")
    interval = f"{int(scrape_interval_s * 1000)}ms"
    listed = ", ".join(f'"{t}"' for t in targets)
    return f"""\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: {job}
    scrape_interval: {interval}
    scrape_timeout: {interval}
    static_configs:
      - targets: [{listed}]
"""


class PrometheusProcess(ManagedProcess):
    """Prometheus on a free loopback port with its own TSDB; ready when /-/ready says so."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        workdir: Path,
        port: int | None = None,
        scrape_interval_s: float = 1.0,
        job: str = "canary",
        binary: str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.port = port or free_port()
        workdir = Path(workdir)
        self.config_path = workdir / "prometheus.yml"
        self.scrape_interval_s = scrape_interval_s
        self.job = job
        self._config_text = render_prometheus_config(
            targets, scrape_interval_s=scrape_interval_s, job=job
        )
        prometheus = binary or find_binary("prometheus", fallbacks=("/usr/bin/prometheus",))
        super().__init__(
            [
                prometheus,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            log_path=workdir / "prometheus.log",
            ready=HttpReady(f"http://{LOOPBACK}:{self.port}/-/ready"),
            ready_timeout=ready_timeout,
            name="prometheus",
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _write_config(self) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config_text)

    async def start(self) -> Self:
        await asyncio.to_thread(self._write_config)
        return await super().start()

    def start_sync(self) -> Self:
        self._write_config()
        return super().start_sync()

    async def reload(self, targets: Sequence[str]) -> None:
        """Scrape `targets` from now on: rewrite the config and POST /-/reload (lifecycle API)."""
        if not self.running:
            raise ProcessStateError("prometheus is not running; start it before reloading")
        self._config_text = render_prometheus_config(
            targets, scrape_interval_s=self.scrape_interval_s, job=self.job
        )
        await asyncio.to_thread(self._write_config)
        await asyncio.to_thread(self._post_reload)

    def _post_reload(self) -> None:
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ProcessError(f"prometheus refused the reload ({exc.code}): {detail}") from exc
        except OSError as exc:
            raise ProcessError(f"prometheus reload failed: {exc}\n{self.log_tail()}") from exc


# --- PowerDNS ------------------------------------------------------------------------------


POWERDNS_SQLITE3_SCHEMA = Path("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")


def render_powerdns_config(
    *, database: Path, dns_port: int, api_port: int, api_key: str, socket_dir: Path
) -> str:
    """pdns.conf text: gsqlite3 backend, HTTP API on loopback, LUA records, no caches.

    No caches: every answer is computed afresh, so the split clients see is pickwrandom's own.
    """
    settings = {
        "launch": "gsqlite3",
        "gsqlite3-database": str(database),
        "local-address": LOOPBACK,
        "local-port": str(dns_port),
        "api": "yes",
        "api-key": api_key,
        "webserver": "yes",
        "webserver-address": LOOPBACK,
        "webserver-port": str(api_port),
        "webserver-allow-from": "127.0.0.0/8",
        "enable-lua-records": "yes",
        "cache-ttl": "0",
        "query-cache-ttl": "0",
        "negquery-cache-ttl": "0",
        "zone-cache-refresh-interval": "0",
        "socket-dir": str(socket_dir),
        "guardian": "no",
        "daemon": "no",
        "disable-syslog": "yes",
        "write-pid": "no",
        "loglevel": "4",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class PowerDNSProcess(ManagedProcess):
    """pdns_server on free loopback ports with its own sqlite database; ready when the API
    port accepts connections. The database and config are written at start, not here."""

    def __init__(
        self,
        *,
        workdir: Path,
        api_key: str,
        binary: str | None = None,
        schema: Path = POWERDNS_SQLITE3_SCHEMA,
        ready_timeout: float = 20.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.api_key = api_key
        self.schema = schema
        self.dns_port = free_udp_tcp_port()
        self.api_port = free_port()
        self.database = self.workdir / "pdns.sqlite3"
        pdns_server = binary or find_binary("pdns_server", fallbacks=("/usr/sbin/pdns_server",))
        super().__init__(
            [pdns_server, f"--config-dir={self.workdir}"],
            log_path=self.workdir / "pdns.log",
            ready=TcpReady(self.api_port),
            ready_timeout=ready_timeout,
            name="pdns_server",
        )

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            schema = self.schema.read_text()
        except OSError as exc:
            raise ProcessError(
                f"the PowerDNS sqlite3 schema {self.schema} is unreadable ({exc}); "
                "install pdns-backend-sqlite3 (scripts/setup --dns)"
            ) from exc
        with contextlib.closing(sqlite3.connect(self.database)) as conn, conn:
            conn.executescript(schema)
        (self.workdir / "pdns.conf").write_text(
            render_powerdns_config(
                database=self.database,
                dns_port=self.dns_port,
                api_port=self.api_port,
                api_key=self.api_key,
                socket_dir=self.workdir,
            )
        )

    async def start(self) -> Self:
        await asyncio.to_thread(self._write_config)
        return await super().start()

    def start_sync(self) -> Self:
        self._write_config()
        return super().start_sync()

    def create_zone_sync(self, zone: str) -> None:
        """Create the Native zone `zone` ("example.test.") with an SOA and an NS record."""
        if not self.running:
            raise ProcessStateError("pdns_server is not running; start it before adding zones")
        soa = f"ns1.{zone} hostmaster.{zone} 1 10800 3600 604800 60"
        body = {
            "name": zone,
            "kind": "Native",
            "nameservers": [],
            "rrsets": [
                {
                    "name": zone,
                    "type": "SOA",
                    "ttl": 60,
                    "records": [{"content": soa, "disabled": False}],
                },
                {
                    "name": zone,
                    "type": "NS",
                    "ttl": 60,
                    "records": [{"content": f"ns1.{zone}", "disabled": False}],
                },
            ],
        }
        request = urllib.request.Request(
            f"{self.api_url}/api/v1/servers/localhost/zones",
            data=json.dumps(body).encode(),
            headers={"X-API-Key": self.api_key, "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                status, text = resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            raise ProcessError(f"PowerDNS API unreachable: {exc}\n{self.log_tail()}") from exc
        if status != 201:
            raise ProcessError(f"PowerDNS refused the zone {zone}: HTTP {status}: {text}")

    async def create_zone(self, zone: str) -> None:
        """Like create_zone_sync(), off the event loop (urllib is synchronous)."""
        await asyncio.to_thread(self.create_zone_sync, zone)


if sys.platform == "win32":  # pragma: no cover - process groups are POSIX
    raise ImportError("canary.demo.procs needs a POSIX system")
