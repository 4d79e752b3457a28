"""Many rollouts in one process: one task each, stopped cleanly together.

Used by static targets (`canary run`) and the demo. Stopping (SIGTERM/SIGINT,
`Controller.stop()`): ticking stops, every task is cancelled and awaited, weights stay where
they are, and each record gets a note saying the controller stopped (no `end` entry: the
rollout is not over).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable
from typing import Any

from canary.core.rollout import Command, RolloutStatus
from canary.runner.runner import CommandResult, RolloutRunner, UnknownRollout
from canary.runner.telemetry import Telemetry

__all__ = ["Controller", "run_until_signalled"]

log = logging.getLogger("canary.runner.controller")


class Controller:
    """Runs many rollouts, one task each, and stops them all cleanly."""

    def __init__(
        self, runners: Iterable[RolloutRunner], *, telemetry: Telemetry | None = None
    ) -> None:
        self.runners: dict[str, RolloutRunner] = {}
        self.telemetry = telemetry or Telemetry()
        for runner in runners:
            if runner.name in self.runners:
                raise ValueError(f"two rollouts are named {runner.name!r}")
            if runner.telemetry is None:
                runner.telemetry = self.telemetry
            self.runners[runner.name] = runner
        self._tasks: dict[str, asyncio.Task[RolloutStatus]] = {}
        self._stop_requested = False  # a stop() that came before the tasks existed
        self.started = asyncio.Event()

    async def run(self) -> dict[str, RolloutStatus]:
        """Run every rollout to its end, or until stop(). Returns each one's last status."""
        self._tasks = {
            name: asyncio.create_task(runner.run(), name=f"rollout:{name}")
            for name, runner in self.runners.items()
        }
        self.started.set()
        if self._stop_requested:
            self.stop()
        try:
            await asyncio.wait(self._tasks.values())
        finally:
            await self._cancel_all()
        for name, task in self._tasks.items():
            if task.cancelled():
                self.runners[name].stopped = True  # also when cancelled before it began
            elif task.exception() is not None:
                log.error("%s: the rollout task crashed", name, exc_info=task.exception())
        return {name: runner.status for name, runner in self.runners.items()}

    def stop(self) -> None:
        """Stop ticking: cancel every rollout task (run() awaits them)."""
        self._stop_requested = True
        for task in self._tasks.values():
            task.cancel()

    async def _cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def runner(self, name: str) -> RolloutRunner:
        try:
            return self.runners[name]
        except KeyError:
            raise UnknownRollout(name) from None

    async def command(self, name: str, command: Command) -> CommandResult:
        runner = self.runner(name)
        task = self._tasks.get(name)
        if task is None or task.done():
            return CommandResult(False, runner.status.phase.value, "the rollout is not running")
        return await runner.command(command)

    def states(self) -> list[dict[str, Any]]:
        return [runner.state() for runner in self.runners.values()]


async def run_until_signalled(
    controller: Controller, *, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
) -> dict[str, RolloutStatus]:
    """Run the controller; SIGTERM/SIGINT stop it cleanly instead of killing the process."""
    loop = asyncio.get_running_loop()
    installed = list(signals)
    for sig in installed:
        loop.add_signal_handler(sig, controller.stop)
    try:
        return await controller.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
