"""Runs the failover machine: probe, step, persist, act — one loop per primary/standby pair.

The decisions live in canary/failover.py (pure). This module only does the I/O around them:
- probes both sides every `probe_interval_s` (canary/health.py);
- persists `FailoverState` *before* acting on it, atomically (write + rename), so that a restart
  during an outage resumes on the standby: no early failback, no weight flip;
- while failed over, re-asserts the standby's 100% on every round (level-triggered, like a
  Kubernetes controller), so a router that was unreachable at the moment of failover is
  corrected on the next round;
- records every move and every manual command (who, when, why) as FailoverEntry lines.

While on the primary, weights belong to the rollout controller; this loop touches them only
at the moment of failback, when it restores the steady-state split.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from canary.core.failover import (
    AbortRollout,
    Action,
    FailoverCommand,
    FailoverPolicy,
    FailoverState,
    Mode,
    Outcome,
    Probe,
    Record,
    Refused,
    RevertStandbyCanary,
    SetWeights,
    step,
)
from canary.core.records import FailoverEntry, NoteEntry, dump_entry
from canary.executors import run_blocking
from canary.routers import RouterError, TrafficRouter, set_and_verify
from canary.runner.clock import MonotonicWallClock

__all__ = ["FailoverController", "FailoverRefused", "load_state", "save_state"]

log = logging.getLogger(__name__)


class FailoverRefused(Exception):
    """A manual command the machine refused; the message says why."""


def load_state(path: Path) -> FailoverState:
    """The persisted state, or the initial one if there is none yet."""
    if not path.exists():
        return FailoverState()
    return FailoverState.model_validate_json(path.read_text(encoding="utf-8"))


def save_state(path: Path, state: FailoverState) -> None:
    """Atomic: a crash leaves the old state or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(state.model_dump_json(), encoding="utf-8")
    os.replace(tmp, path)


class FailoverController:
    def __init__(
        self,
        *,
        name: str,
        policy: FailoverPolicy,
        probe: Callable[[], Awaitable[Probe]],
        router: TrafficRouter,
        state_path: Path,
        record_path: Path,
        steady_canary_percent: int = 0,
        probe_interval_s: float = 5.0,
        rollout_active: Callable[[], bool] = lambda: False,
        on_abort_rollout: Callable[[str], Awaitable[None]] | None = None,
        on_revert_standby: Callable[[str], Awaitable[None]] | None = None,
        on_entry: Callable[[FailoverEntry | NoteEntry], Awaitable[None]] | None = None,
        on_state: Callable[[FailoverState], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._probe = probe
        self.router = router
        self.state_path = state_path
        self.record_path = record_path
        self.steady_canary_percent = steady_canary_percent
        self.probe_interval_s = probe_interval_s
        self._rollout_active = rollout_active
        self._on_abort_rollout = on_abort_rollout
        self._on_revert_standby = on_revert_standby
        # Told of every record entry, e.g. to send it as a Kubernetes Event.
        self._on_entry = on_entry
        # Told of every persisted state, e.g. to mirror it where a restarted pod finds it.
        self._on_state = on_state
        self._clock = clock or MonotonicWallClock()  # hysteresis never jumps with the wall clock
        self._lock = asyncio.Lock()  # probes and manual commands never interleave
        self.state = load_state(state_path)
        self.last_probe: Probe | None = None
        self.moves: list[tuple[float, Mode]] = []  # (time, mode) of every weight move applied

    async def run(self) -> None:
        """Probe until cancelled. Cancellation leaves weights and state as they are."""
        while True:
            try:
                probe = await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken prober is a lost probe, not a dead loop
                log.warning("%s: probe failed: %s", self.name, exc)
                probe = Probe(primary_healthy=None, standby_healthy=None, detail=str(exc))
            self.last_probe = probe
            async with self._lock:
                await self._advance(probe)
                if self.state.mode is Mode.STANDBY:
                    await self._reassert_standby()
            await asyncio.sleep(self.probe_interval_s)

    async def command(self, command: FailoverCommand) -> FailoverState:
        """A manual failover or failback. Raises FailoverRefused when the machine refuses."""
        async with self._lock:
            outcome = await self._advance(command)
        refused = [a for a in outcome.actions if isinstance(a, Refused)]
        if refused:
            await self._append(
                NoteEntry(
                    at=self._clock(),
                    rollout=self.name,
                    level="warning",
                    message=f"{command.who}: {refused[0].reason}",
                )
            )
            raise FailoverRefused(refused[0].reason)
        return self.state

    async def _advance(self, event: Probe | FailoverCommand) -> Outcome:
        now = self._clock()
        outcome = step(self.policy, self.state, event, now, rollout_active=self._rollout_active())
        if outcome.state != self.state:
            await run_blocking("state", save_state, self.state_path, outcome.state)
            self.state = outcome.state
            if self._on_state is not None:
                try:
                    await self._on_state(outcome.state)
                except Exception:  # the file is the store of record; a mirror may lag
                    log.exception("%s: mirroring the failover state failed", self.name)
        for action in outcome.actions:
            await self._execute(action, now)
        return outcome

    async def _execute(self, action: Action, now: float) -> None:
        match action:
            case SetWeights(mode=mode):
                percent = 100 if mode is Mode.STANDBY else self.steady_canary_percent
                try:
                    await set_and_verify(self.router, percent)
                    self.moves.append((self._clock(), mode))
                except RouterError as exc:
                    # The state already says where traffic belongs; the next round re-asserts it.
                    await self._append(
                        NoteEntry(
                            at=now,
                            rollout=self.name,
                            level="warning",
                            message=f"could not set {percent}% to the standby: {exc}",
                        )
                    )
            case AbortRollout(reason=reason):
                if self._on_abort_rollout is not None:
                    await self._on_abort_rollout(reason)
            case RevertStandbyCanary(reason=reason):
                if self._on_revert_standby is not None:
                    await self._on_revert_standby(reason)
            case Record(direction=None, who=who, reason=reason, warning=warning):
                await self._append(
                    NoteEntry(
                        at=now,
                        rollout=self.name,
                        level="warning" if warning else "info",
                        message=f"{who}: {reason}",
                    )
                )
            case Record(direction=str(direction), who=who, reason=reason, forced=forced):
                await self._append(
                    FailoverEntry(
                        at=now,
                        rollout=self.name,
                        direction=direction,
                        who=who,
                        reason=reason,
                        forced=forced,
                    )
                )
            case Refused():
                pass  # surfaced by command()

    async def _reassert_standby(self) -> None:
        try:
            if await self.router.get_weight() != 100:
                await set_and_verify(self.router, 100)
                self.moves.append((self._clock(), Mode.STANDBY))
        except RouterError as exc:
            log.warning("%s: standby weight not confirmed: %s", self.name, exc)

    async def _append(self, entry: FailoverEntry | NoteEntry) -> None:
        line = dump_entry(entry) + "\n"

        def write() -> None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            with self.record_path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()

        await run_blocking("state", write)
        if self._on_entry is not None:
            try:
                await self._on_entry(entry)
            except Exception:  # Events explain; they must never stop a failover
                log.exception("%s: on_entry hook failed", self.name)


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel a controller task and wait for it."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def describe(state: FailoverState) -> str:
    return json.dumps(state.model_dump(mode="json"), separators=(",", ":"))
