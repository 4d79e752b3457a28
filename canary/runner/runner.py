"""The controller loop: one asyncio task per rollout, around the pure machine in rollout.py.

Each `RolloutRunner` ticks every `tick_s`: it reads the weight back from the router, asks the
metrics provider for both arms' counts since the analysis began, feeds them to its own
Analyzer, hands the verdict (or "no data", or the router's error) to `rollout.step`, carries
out the actions it returns and appends the whole tick to the rollout's analysis record.
Everything that can go wrong at the edges (an unreachable router, a Prometheus without data,
a weight that does not read back) becomes an event for the pure machine, never a crash; the
machine decides whether to hold, retry or roll back.

Manual commands (from the HTTP server or the CLI) go through a queue into the runner's own
task, so the status is only ever changed in one place and each command gets an answer.

Stopping (SIGTERM/SIGINT, `Controller.stop()`): ticking stops, every task is cancelled and
awaited, weights stay where they are, and the record gets a note saying the controller
stopped (no `end` entry: the rollout is not over).

Resuming: with `status_path` set, the runner saves its `RolloutStatus` (atomically, before
carrying out any action) and a restarted runner continues the unfinished rollout: same record,
same step, no step taken twice, the weight re-asserted rather than moved. The analysis
evidence is not saved; it is rebuilt by replaying the record's ticks into a fresh Analyzer,
which gives back exactly the same evidence because the counts are cumulative from the start.

Record writes go through a small writer that appends and flushes one whole line at a time in
a worker thread, under a lock, so a crash or a cancellation leaves whole lines only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from analysis import Snapshot, Verdict
from canary.core.records import (
    EndEntry,
    ManualEntry,
    NoteEntry,
    StartEntry,
    TickEntry,
    TransitionEntry,
    dump_entry,
    read_record,
)
from canary.core.rollout import (
    Action,
    Command,
    Emit,
    Event,
    Finish,
    NewRevision,
    Phase,
    Promote,
    PromoteDone,
    RecordManual,
    RecordTransition,
    ResetAnalysis,
    RolloutSpec,
    RolloutStatus,
    ScaleCanary,
    SetWeight,
    Tick,
    WeightFailed,
    WeightVerified,
    step,
)
from canary.metrics.prometheus import ArmsCounts, MetricsProvider, NoData
from canary.routers.base import RouterError, TrafficRouter, set_and_verify

__all__ = [
    "AnalyzerLike",
    "CommandResult",
    "Controller",
    "RecordWriter",
    "RolloutRunner",
    "Telemetry",
    "TickReport",
    "UnknownRollout",
    "run_until_signalled",
]

log = logging.getLogger("canary.runner.runner")

# Bounds one event's chain of actions and answers; a real chain is a handful long.
_MAX_ACTIONS_PER_EVENT = 64
# TickEntry fields a tick hook may fill in.
_HOOK_FIELDS = frozenset({"observed_canary_share"})


class AnalyzerLike(Protocol):
    """What the runner needs of analysis.Analyzer."""

    def observe(self, snapshot: Snapshot, /) -> Verdict: ...


class UnknownRollout(KeyError):
    """No rollout of that name is run by this controller."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    accepted: bool
    phase: str
    message: str


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick saw and did: handed to observers (the demo prints live progress)."""

    name: str
    status: RolloutStatus
    entry: TickEntry
    actions: tuple[Action, ...]


class RecordWriter:
    """Appends entries to one JSON-lines record, a whole flushed line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # a cancelled await still lets its thread finish

    def _append(self, line: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()

    async def append(self, entry: Any) -> None:
        await asyncio.to_thread(self._append, dump_entry(entry))


class Telemetry:
    """The controller's own Prometheus metrics, on a dedicated registry for /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phase = Gauge(
            "canary_rollout_phase",
            "1 for the phase each rollout is in, 0 for the others",
            ["rollout", "phase"],
            registry=self.registry,
        )
        self.weight = Gauge(
            "canary_rollout_weight_percent",
            "Canary traffic share wanted, in percent",
            ["rollout"],
            registry=self.registry,
        )
        self.weight_read = Gauge(
            "canary_rollout_weight_read_percent",
            "Canary traffic share last read back from the router, in percent",
            ["rollout"],
            registry=self.registry,
        )
        self.step = Gauge(
            "canary_rollout_step", "Index of the current step", ["rollout"], registry=self.registry
        )
        self.decisions = Counter(
            "canary_analysis_decisions",
            "Analysis verdicts by decision (no_data when there were no metrics)",
            ["rollout", "decision"],
            registry=self.registry,
        )
        self.errors = Counter(
            "canary_errors",
            "Errors at the edges, by kind (router, metrics, analysis, promote, scale, record)",
            ["rollout", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "canary_rollout_duration_seconds",
            "Duration of finished rollouts by outcome",
            ["outcome"],
            buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")),
            registry=self.registry,
        )

    def show(self, name: str, status: RolloutStatus) -> None:
        for phase in Phase:
            self.phase.labels(name, phase.value).set(1.0 if status.phase is phase else 0.0)
        self.weight.labels(name).set(status.weight)
        self.step.labels(name).set(status.step)


def _default_analyzer() -> AnalyzerLike:
    from analysis import AnalysisConfig, Analyzer

    return Analyzer(AnalysisConfig())


def _verdict_reason(verdict: Verdict) -> str:
    """The reasons of the metrics that carried the decision, else all of them."""
    deciding = [
        m.reason for m in verdict.metrics.values() if m.decision == verdict.decision and m.reason
    ]
    return "; ".join(deciding or verdict.reasons)


@dataclass
class _Pending:
    command: Command
    answer: asyncio.Future[CommandResult]


@dataclass
class RolloutRunner:
    """Runs one rollout to its end (or until cancelled).

    `promoter` copies the template to the primary on promotion (None: nothing to copy, as for
    static targets); `scaler` scales the canary up or down (None: nothing to scale).
    `tick_hook(name, status)` returns extra TickEntry fields (the demo's measured split, as
    `observed_canary_share`); `observers` are called with a TickReport after every tick.
    """

    name: str
    spec: RolloutSpec
    router: TrafficRouter
    metrics: MetricsProvider
    record_path: Path
    tick_s: float = 10.0
    analyzer_factory: Callable[[], AnalyzerLike] = _default_analyzer
    revision: str = ""
    primary_version: str = ""
    canary_version: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    # The planner's estimate at start (StartEntry.plan), e.g. {"expected_fail_s": ...}.
    plan: Mapping[str, float | None] = field(default_factory=dict)
    promoter: Callable[[str], Awaitable[None]] | None = None
    scaler: Callable[[bool], Awaitable[None]] | None = None
    tick_hook: Callable[[str, RolloutStatus], Mapping[str, Any]] | None = None
    observers: list[Callable[[TickReport], None]] = field(default_factory=list)
    # called with every entry once it is in the record (canary.notify.webhooks.Notifier.on_entry)
    entry_observers: list[Callable[[Any], object]] = field(default_factory=list)
    telemetry: Telemetry | None = None
    router_timeout_s: float = 10.0
    clock: Callable[[], float] = time.time
    # Where the status is saved (before every action) so a restarted runner resumes the same
    # rollout: same record, same step, evidence replayed from the record. None: no saving.
    status_path: Path | None = None
    resume_saved: bool = True  # False: start a new rollout even if a saved one is unfinished

    def __post_init__(self) -> None:
        if self.tick_s <= 0:
            raise ValueError(f"tick_s must be positive, got {self.tick_s}")
        self.status = RolloutStatus()
        self.stopped = False  # cancelled before the rollout ended
        self.last_tick: TickEntry | None = None
        self._writer = RecordWriter(self.record_path)
        self._commands: asyncio.Queue[_Pending] = asyncio.Queue()
        self._analyzer: AnalyzerLike | None = None
        self._rollout_id = ""
        self._started_at = 0.0

    # ---- public -------------------------------------------------------------------------

    @property
    def rollout_id(self) -> str:
        return self._rollout_id

    async def command(self, command: Command) -> CommandResult:
        """Hand a manual command to the runner's task and wait for its answer."""
        answer: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        await self._commands.put(_Pending(command, answer))
        return await answer

    def state(self) -> dict[str, Any]:
        """The current state as JSON-able data (for /rollouts)."""
        status = self.status
        data: dict[str, Any] = {
            "name": self.name,
            "rollout": self._rollout_id,
            "record": str(self.record_path),
            "phase": status.phase.value,
            "step": status.step,
            "steps": list(self.spec.steps),
            "weight": status.weight,
            "weight_verified": status.weight_verified,
            "last_decision": status.last_decision,
            "reason": status.reason,
            "message": status.message,
            "stopped": self.stopped,
            "status": status.model_dump(mode="json", exclude_defaults=True),
        }
        if self.last_tick is not None:
            data["weight_read"] = self.last_tick.weight_read
            data["elapsed_s"] = self.last_tick.elapsed_s
        return data

    async def run(self) -> RolloutStatus:
        """Run the rollout to its end. Cancel to stop it: weights stay where they are."""
        self._started_at = self.clock()
        revision = (
            self.revision
            or self.canary_version
            or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._started_at))
        )
        self._rollout_id = f"{self.name}@{revision}"
        try:
            if not await self._resume():
                start = StartEntry(
                    at=self._started_at,
                    rollout=self._rollout_id,
                    target=self.name,
                    primary_version=self.primary_version,
                    canary_version=self.canary_version,
                    steps=list(self.spec.steps),
                    config={**self.config, "rollout": self.spec.model_dump(mode="json")},
                    plan=dict(self.plan),
                )
                await self._writer.append(start)
                self._observe(start)  # observers learn the target's name from it
                await self._feed(NewRevision(revision, "rollout started"))
            while not self.status.done:
                await self._wait_or_command()
                if self.status.done:
                    break
                await self._tick()
        except asyncio.CancelledError:
            self.stopped = True
            await self._stopped_note()
            raise
        except Exception as exc:
            # A bug, not an edge error (those are events): say so in the record, then crash.
            await self._note("warning", f"controller error, rollout abandoned as it was: {exc!r}")
            raise
        finally:
            self._refuse_pending_commands()
        return self.status

    def _refuse_pending_commands(self) -> None:
        """Commands that will never be handled get an answer instead of hanging."""
        while not self._commands.empty():
            pending = self._commands.get_nowait()
            if not pending.answer.done():
                pending.answer.set_result(
                    CommandResult(False, self.status.phase.value, "the rollout is not running")
                )

    # ---- the loop ---------------------------------------------------------------------

    async def _wait_or_command(self) -> None:
        """Sleep until the next tick, handling any manual command that arrives meanwhile."""
        deadline = asyncio.get_running_loop().time() + self.tick_s
        while not self.status.done:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    pending = await self._commands.get()
            except TimeoutError:
                return
            before = self.status
            actions = await self._feed(pending.command)
            refused = any(isinstance(a, RecordManual) and not a.accepted for a in actions)
            message = next(
                (a.message for a in actions if isinstance(a, Emit) and refused),
                self.status.reason if self.status is not before else "",
            )
            if not pending.answer.done():
                pending.answer.set_result(
                    CommandResult(not refused, self.status.phase.value, message)
                )

    async def _tick(self) -> None:
        now = self.clock()
        weight_read: int | None = None
        router_error: str | None = None
        try:
            async with asyncio.timeout(self.router_timeout_s):
                weight_read = await self.router.get_weight()
        except (RouterError, TimeoutError) as exc:
            router_error = str(exc) or type(exc).__name__
            self._count_error("router")
        if weight_read is not None and self.telemetry is not None:
            self.telemetry.weight_read.labels(self.name).set(weight_read)

        since = self.status.analysis_started_at or now
        elapsed = max(0.0, now - since)
        counts, verdict, no_data = await self._analyse(since, now, elapsed)
        decision = verdict.decision if verdict is not None else None
        reason = _verdict_reason(verdict) if verdict is not None else (no_data or "")
        if self.telemetry is not None:
            label = decision.value if decision is not None else "no_data"
            self.telemetry.decisions.labels(self.name, label).inc()

        # The tick is what was observed, in the state it was observed in; the transitions it
        # causes follow it in the record (so an end entry stays last).
        extra = self._hook_fields()
        entry = TickEntry(
            at=now,
            rollout=self._rollout_id,
            elapsed_s=elapsed,
            phase=self.status.phase.value,
            step=self.status.step,
            weight_set=self.status.weight,
            weight_read=weight_read,
            primary=counts.primary if counts is not None else None,
            canary=counts.canary if counts is not None else None,
            no_data_reason=no_data,
            verdict=verdict,
            **extra,
        )
        self.last_tick = entry
        log.debug(
            "%s: tick %s at %d%% (read %s): %s",
            self.name,
            entry.phase,
            entry.weight_set,
            weight_read if router_error is None else router_error,
            decision.value if decision is not None else f"no data ({no_data})",
        )
        await self._write(entry)
        actions = await self._feed(Tick(decision, reason, weight_read, router_error))
        report = TickReport(self.name, self.status, entry, actions)
        for observer in self.observers:
            try:
                observer(report)
            except Exception:  # an observer's bug must not stop a rollout
                log.exception("%s: tick observer failed", self.name)

    async def _analyse(
        self, since: float, now: float, elapsed: float
    ) -> tuple[ArmsCounts | None, Verdict | None, str | None]:
        try:
            result = await self.metrics.fetch(since=since, now=now)
        except Exception as exc:  # the protocol says NoData, but a bug is data here too
            log.exception("%s: metrics provider raised", self.name)
            result = NoData(f"metrics provider error: {exc!r}")
        if isinstance(result, NoData):
            self._count_error("metrics")
            return None, None, result.reason
        if self._analyzer is None:
            self._analyzer = self.analyzer_factory()
        try:
            verdict = self._analyzer.observe(
                Snapshot(elapsed_s=elapsed, primary=result.primary, canary=result.canary)
            )
        except (ValueError, ArithmeticError) as exc:
            log.exception("%s: analysis rejected the counts", self.name)
            self._count_error("analysis")
            return result, None, f"analysis error: {exc}"
        return result, verdict, None

    def _hook_fields(self) -> dict[str, Any]:
        if self.tick_hook is None:
            return {}
        try:
            fields = dict(self.tick_hook(self.name, self.status))
        except Exception:
            log.exception("%s: tick hook failed", self.name)
            return {}
        unknown = set(fields) - _HOOK_FIELDS
        if unknown:
            raise ValueError(
                f"tick_hook returned unknown TickEntry fields {sorted(unknown)}; "
                f"allowed: {sorted(_HOOK_FIELDS)}"
            )
        return fields

    # ---- the machine and its actions --------------------------------------------------

    async def _feed(self, event: Event) -> tuple[Action, ...]:
        """Step the machine with `event`, carry out its actions, and feed their answers back.
        Returns every action taken, in order."""
        done: list[Action] = []
        queue: deque[Event] = deque([event])
        while queue:
            outcome = step(self.spec, self.status, queue.popleft(), self.clock())
            changed = outcome.status != self.status
            self.status = outcome.status
            if self.telemetry is not None:
                self.telemetry.show(self.name, self.status)
            if changed:
                await self._save()  # before any action: a crash mid-action resumes safely
            for action in outcome.actions:
                done.append(action)
                if len(done) > _MAX_ACTIONS_PER_EVENT:
                    raise RuntimeError(f"{self.name}: runaway action chain: {done[-8:]}")
                answer = await self._do(action)
                if answer is not None:
                    queue.append(answer)
        return tuple(done)

    async def _do(self, action: Action) -> Event | None:
        now = self.clock()
        match action:
            case SetWeight(weight):
                try:
                    async with asyncio.timeout(self.router_timeout_s):
                        await set_and_verify(self.router, weight)
                except (RouterError, TimeoutError) as exc:
                    self._count_error("router")
                    return WeightFailed(weight, str(exc) or type(exc).__name__)
                return WeightVerified(weight)
            case Promote(revision):
                if self.promoter is None:
                    return PromoteDone(ok=True)
                try:
                    await self.promoter(revision)
                except Exception as exc:
                    log.exception("%s: promotion failed", self.name)
                    self._count_error("promote")
                    return PromoteDone(ok=False, error=str(exc) or type(exc).__name__)
                return PromoteDone(ok=True)
            case ScaleCanary(up):
                if self.scaler is not None:
                    try:
                        await self.scaler(up)
                    except Exception as exc:
                        log.exception("%s: scaling the canary failed", self.name)
                        self._count_error("scale")
                        await self._note(
                            "warning", f"scaling the canary {'up' if up else 'down'} failed: {exc}"
                        )
            case ResetAnalysis():
                self._analyzer = None  # a fresh one at the next observation
            case RecordTransition(before, after, index, weight, reason):
                log.info("%s: %s -> %s at %d%%: %s", self.name, before, after, weight, reason)
                await self._write(
                    TransitionEntry(
                        at=now,
                        rollout=self._rollout_id,
                        from_phase=before,
                        to_phase=after,
                        step=index,
                        weight=weight,
                        reason=reason,
                    )
                )
            case RecordManual(command, who, reason, accepted):
                text = reason if accepted else f"refused: {reason}".rstrip(": ")
                await self._write(
                    ManualEntry(
                        at=now, rollout=self._rollout_id, command=command, who=who, reason=text
                    )
                )
            case Emit(level, message):
                (log.warning if level == "warning" else log.info)("%s: %s", self.name, message)
                await self._note(level, message)
            case Finish(outcome, reason):
                duration = max(0.0, now - self._started_at)
                if self.telemetry is not None:
                    self.telemetry.duration.labels(outcome).observe(duration)
                await self._write(
                    EndEntry(
                        at=now,
                        rollout=self._rollout_id,
                        outcome=outcome,
                        reason=reason,
                        duration_s=duration,
                    )
                )
        return None

    # ---- saved status and resuming -------------------------------------------------------

    def _save_blocking(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash leaves the old status or the new one

    async def _save(self) -> None:
        if self.status_path is None:
            return
        saved = {
            "rollout": self._rollout_id,
            "record": str(self.record_path),
            "started_at": self._started_at,
            "status": json.loads(self.status.to_json()),
        }
        try:
            await asyncio.to_thread(
                self._save_blocking, self.status_path, json.dumps(saved, separators=(",", ":"))
            )
        except OSError as exc:
            log.error("%s: cannot save the status to %s: %s", self.name, self.status_path, exc)
            self._count_error("status")

    def _load_blocking(self) -> tuple[dict[str, Any], list[Any]] | None:
        if self.status_path is None or not self.resume_saved or not self.status_path.exists():
            return None
        saved = json.loads(self.status_path.read_text(encoding="utf-8"))
        status = RolloutStatus.model_validate(saved["status"])
        if not status.active:
            return None  # over (or never started): the next run is a new rollout
        record = Path(saved["record"])
        return saved, read_record(record)

    async def _resume(self) -> bool:
        """Continue a saved, unfinished rollout: same record, same step, evidence replayed.
        False when there is nothing to resume (or it cannot be read: then say so and start)."""
        try:
            loaded = await asyncio.to_thread(self._load_blocking)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: cannot resume from %s: %s", self.name, self.status_path, exc)
            return False
        if loaded is None:
            return False
        saved, entries = loaded
        self.status = RolloutStatus.model_validate(saved["status"])
        self._rollout_id = str(saved["rollout"])
        self.record_path = Path(saved["record"])
        self._writer = RecordWriter(self.record_path)
        self._started_at = float(
            saved.get("started_at") or self.status.started_at or self._started_at
        )
        replayed = self._replay_record(entries)
        status = self.status
        await self._note(
            "info",
            f"resumed during {status.phase.value} at step {status.step} ({status.weight}% wanted); "
            f"{replayed} ticks of evidence replayed into a fresh analysis",
        )
        if self.telemetry is not None:
            self.telemetry.show(self.name, status)
        return True

    def _replay_record(self, entries: list[Any]) -> int:
        """Feed the record's ticks since the analysis began to a fresh Analyzer: counts are
        cumulative from that start, so the evidence comes back exactly as it was."""
        since = self.status.analysis_started_at
        self._analyzer = self.analyzer_factory()
        replayed = 0
        for entry in entries:
            if (
                isinstance(entry, TickEntry)
                and entry.rollout == self._rollout_id
                and since is not None
                and entry.at >= since
                and entry.primary is not None
                and entry.canary is not None
            ):
                self._analyzer.observe(
                    Snapshot(elapsed_s=entry.elapsed_s, primary=entry.primary, canary=entry.canary)
                )
                replayed += 1
        return replayed

    # ---- record -----------------------------------------------------------------------

    async def _write(self, entry: Any) -> None:
        try:
            await self._writer.append(entry)
        except OSError as exc:  # a full disk must not strand traffic mid-rollout
            log.error("%s: cannot append to %s: %s", self.name, self.record_path, exc)
            self._count_error("record")
        self._observe(entry)

    def _observe(self, entry: Any) -> None:
        for observe in self.entry_observers:
            try:
                observe(entry)
            except Exception:  # a notification must never stop a rollout
                log.exception("%s: an entry observer failed", self.name)

    async def _note(self, level: str, message: str) -> None:
        await self._write(
            NoteEntry(
                at=self.clock(),
                rollout=self._rollout_id,
                level="warning" if level == "warning" else "info",
                message=message,
            )
        )

    async def _stopped_note(self) -> None:
        status = self.status
        message = (
            f"controller stopped during {status.phase.value} at step {status.step} "
            f"({status.weight}% wanted); weights left as they are"
        )
        log.info("%s: %s", self.name, message)
        await self._note("warning", message)

    def _count_error(self, kind: str) -> None:
        if self.telemetry is not None:
            self.telemetry.errors.labels(self.name, kind).inc()


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
