"""Process pools for tests: every process a test starts is stopped by PID at teardown."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

from canary.demo.procs import ManagedProcess, TcpReady

SUPPORT_SERVERS = Path(__file__).parent / "servers.py"


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
