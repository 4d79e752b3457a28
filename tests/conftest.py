"""Shared fixtures: the server binaries, a work directory, and process pools that never leak.

Every process a test starts through `procs` / `module_procs` is stopped by PID at teardown,
even when the test fails; at the end of the session a check fails the run if any process
started through them is still alive. Missing binaries fail loudly rather than skip: CI
installs them (scripts/setup --all), and a skipped real-server test proves nothing.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from canary.procs import ManagedProcess, TcpReady, find_binary

SUPPORT_SERVERS = Path(__file__).parent / "support" / "servers.py"


class ProcessPool:
    """Starts ManagedProcesses (synchronously) and stops them all, newest first."""

    started: ClassVar[list[ManagedProcess]] = []  # every process any pool ever started

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.processes: list[ManagedProcess] = []

    def start(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process)
        ProcessPool.started.append(process)
        return process.start_sync()

    def python(self, name: str, *args: object, port: int | None = None) -> ManagedProcess:
        """Run a Python script or `-m module` with this interpreter, ready on `port`."""
        return self.start(
            ManagedProcess(
                [sys.executable, *map(str, args)],
                log_path=self.logdir / f"{name}.log",
                ready=TcpReady(port) if port is not None else None,
                name=name,
            )
        )

    def support_server(self, kind: str, port: int, *args: str) -> ManagedProcess:
        """One of tests/support/servers.py's servers (name, exporter) on 127.0.0.1:port."""
        return self.python(f"{kind}-{port}", SUPPORT_SERVERS, kind, port, *args, port=port)

    def stop(self, process: ManagedProcess) -> None:
        process.stop_sync()

    def stop_all(self) -> None:
        errors = []
        for process in reversed(self.processes):
            try:
                process.stop_sync()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{process!r}: {exc}")
        self.processes.clear()
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """At the end of the session, fail if a pool-started process is still alive."""
    yield
    alive = [p for p in ProcessPool.started if p.pid is not None and p.returncode is None]
    if alive:
        for process in alive:
            process.stop_sync()
        pytest.fail(f"processes left running after the tests: {alive}")


@pytest.fixture(scope="session")
def haproxy_binary() -> str:
    try:
        return find_binary("haproxy", fallbacks=("/usr/sbin/haproxy",))
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    try:
        return find_binary("prometheus", fallbacks=("/usr/bin/prometheus",))
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A per-test directory for configs, sockets, state files and logs."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is limited to 107 bytes; tmp_path is long)."""
    path = Path(tempfile.mkdtemp(prefix="cnry-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_sockdir() -> Iterator[Path]:
    """Like sockdir, shared by a module's tests."""
    path = Path(tempfile.mkdtemp(prefix="cnry-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessPool]:
    """Processes for one test, stopped by PID at teardown."""
    pool = ProcessPool(tmp_path / "logs")
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessPool]:
    """Processes shared by a module's tests, stopped by PID when the module is done."""
    pool = ProcessPool(tmp_path_factory.mktemp("module-logs"))
    try:
        yield pool
    finally:
        pool.stop_all()
