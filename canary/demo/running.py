"""How a demo runs as a command: in a scratch directory, stopped cleanly by Ctrl-C or SIGTERM.

Both demos (`canary demo` and `canary demo --failover`) start real servers, so an interrupt
must unwind through every `finally` that stops them, and a setup error must leave the
configs and logs behind for the user to read. One helper does that for both.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from canary.core.logs import json_logging

__all__ = ["EXIT_SETUP", "complain", "run_in_workdir", "say"]

EXIT_SETUP = 2  # interrupted: 128 + signal number


def say(line: str) -> None:
    """One line of the demo's output, shown at once (it may be piped into a CI log)."""
    print(line, flush=True)


def complain(line: str, *, level: int = logging.ERROR) -> None:
    """A line on stderr: printed, or with --log-format json one JSON event, so that every
    stderr line is JSON then."""
    if json_logging():
        logging.getLogger("canary.demo").log(level, line)
    else:
        print(line, file=sys.stderr, flush=True)


async def _until_signalled(
    demo: Callable[[], Awaitable[int]], *, stopping: str, stopped: str | None
) -> int:
    """Run the demo as a task that SIGINT/SIGTERM cancel, so every `finally` runs."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted: list[int] = []

    def on_signal(signum: int) -> None:
        if not interrupted:
            say(f"\n{signal.Signals(signum).name}: {stopping} ...")
            task.cancel()
        interrupted.append(signum)  # later signals: already stopping, let cleanup finish

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await demo()
    except asyncio.CancelledError:
        if interrupted:
            if stopped is not None:
                say(stopped)
            return 128 + interrupted[0]
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run_in_workdir(
    demo: Callable[[Path], Awaitable[int]],
    *,
    program: str,
    prefix: str,
    keep_workdir: bool,
    errors: tuple[type[Exception], ...],
    stopping: str,
    stopped: str | None = None,
) -> int:
    """Run `demo(workdir)` in a new temporary directory and return its exit status.

    `errors` (a server that would not start, a busy port, ...) print one line and exit
    EXIT_SETUP; the directory is kept then, or when asked, and removed otherwise.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    code = EXIT_SETUP
    try:
        code = asyncio.run(
            _until_signalled(lambda: demo(workdir), stopping=stopping, stopped=stopped)
        )
    except errors as exc:
        complain(f"{program}: error: {exc}")
        code = EXIT_SETUP
    finally:
        if keep_workdir or code == EXIT_SETUP:
            complain(f"configs and logs kept in {workdir}", level=logging.INFO)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code
