"""Shared fixtures: the server binaries, a work directory, and process pools that never leak.

Every process a test starts through `procs` / `module_procs` is stopped by PID at teardown,
even when the test fails; at the end of the session a check fails the run if any process
started through them is still alive. Missing binaries fail loudly rather than skip: CI
installs them (scripts/setup --all), and a skipped real-server test proves nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.pool import ProcessPool

from canary.demo.procs import find_binary


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """scripts/test's two workers: each test module runs in one worker, so its module-scoped
    servers start once; every control-plane test (tests/cluster/) runs in the same worker, so
    one cluster (session-scoped) serves them all. (xdist's own `xdist_group` marks cannot do
    this under pytest 9: they rename nodeids through an attribute pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/cluster/"):
                return "control-plane"
            return nodeid.split("::", 1)[0]

    return ByModule(config, log)


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
