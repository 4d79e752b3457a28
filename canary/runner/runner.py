"""The one rollout runner: one asyncio task per rollout, around the pure machine.

Every mode (a static target, an annotated Deployment, a cross-cluster rollout) constructs
this class; what differs comes in through the seams in canary.runner.seams (router, metric
source, state store, record, workload, announcer). No subclass overrides its methods.

Each `RolloutRunner` ticks every `tick_s`: it reads the weight back from the router, asks the
metric source for both arms' counts since the analysis began, feeds them to its own Analyzer,
hands the verdict (or "no data", or the router's error) to `rollout.step`, carries out the
actions it returns and appends the whole tick to the rollout's record. Everything that can go
wrong at the edges (an unreachable router, a Prometheus without data, a weight that does not
read back, a record that cannot be written) becomes an event for the pure machine or a
counted, shown error, never a crash; the machine decides whether to hold, retry or roll back.

Manual commands (from the HTTP server, the CLI or a command annotation) go through a queue
into the runner's own task, so the status is only ever changed in one place and each command
gets an answer.

State and resuming: the status is saved through the StateStore whenever it changes, before
any of the actions that change carries out (write-ahead), so a runner killed between writing
a weight and saving its status cannot move the weight back on resume; a status that says
"done" is saved only after its actions (scale down, end entry, record), so a runner killed in
between finishes them again. A restarted runner continues the unfinished rollout the store
returns: same record, same step, the weight read back rather than moved. The analysis
evidence is not saved; it is rebuilt by replaying the record's ticks into a fresh Analyzer,
which gives back exactly the same evidence because the counts are cumulative from the start.

A new revision during a rollout (`supersede`) ends the record with outcome `superseded` and
starts a new record whose start entry says what it superseded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from analysis import AnalysisConfig, Snapshot, Verdict
from canary.core.advice import (
    ASSUMED_ERROR_RATE,
    RECHECK_S,
    Advice,
    LoadAt,
    assumed_advice,
    material,
    observed_advice,
    observed_due,
)
from canary.core.inputs import InputError, excerpt, pack_state, unpack_state
from canary.core.logs import bind_rollout, unbind_rollout
from canary.core.records import (
    EndEntry,
    Entry,
    ManualEntry,
    NoteEntry,
    StartEntry,
    TickEntry,
    TransitionEntry,
)
from canary.core.redact import redact, redact_text
from canary.core.rollout import (
    Action,
    CallGate,
    Command,
    Emit,
    Event,
    Finish,
    Gate,
    GateKind,
    NewRevision,
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
from canary.executors import run_blocking
from canary.metrics.base import ArmsCounts, CarriedCounts, MetricsProvider, NoData
from canary.routers.base import RouterError, TrafficRouter, match_router, set_and_verify
from canary.runner.clock import MonotonicWallClock
from canary.runner.files import FileRecord, FileRecords, FileStateStore
from canary.runner.history import TickHistory
from canary.runner.seams import (
    AnalysisRecord,
    Announcer,
    CarryingRecord,
    GateAsker,
    NotActing,
    NoWorkload,
    RecordOpener,
    RecordSink,
    RecordWriteError,
    ResumeError,
    SavedHead,
    SavedRollout,
    StateStore,
    StateWriteError,
    Workload,
)
from canary.runner.telemetry import Telemetry

__all__ = [
    "AnalyzerLike",
    "CommandResult",
    "RolloutRunner",
    "TickReport",
    "UnknownRollout",
    "next_tick_at",
]

log = logging.getLogger("canary.runner")

# Bounds one event's chain of actions and answers; a real chain is a handful long.
_MAX_ACTIONS_PER_EVENT = 64
# Ticks kept for the live page's charts (`state()["history"]`): the recent ones, and the
# older ones ever more thinly (canary.runner.history); all of them are in the record.
HISTORY_POINTS = 120
# TickEntry fields a tick hook may fill in.
_HOOK_FIELDS = frozenset({"observed_canary_share"})
# RolloutStatus fields a resume does not need at once (runner.volatile_save_s): compared with
# these values put in, so that a change in them alone is not a reason to save.
_VOLATILE_DEFAULTS: dict[str, Any] = {"last_data_at": None, "message": "", "last_decision": None}
_LASTING_FIELDS = tuple(f for f in RolloutStatus.model_fields if f not in _VOLATILE_DEFAULTS)


def same_but_volatile(saved: RolloutStatus, status: RolloutStatus) -> bool:
    """Whether the two statuses are equal with their volatile fields put aside: what
    `saved.model_copy(update=_VOLATILE_DEFAULTS) == status.model_copy(...)` says, without
    the two copies (asked every tick of every rollout: ~1% of the controller's CPU at 1,000
    rollouts, issue 13). The models are frozen, hold no private or extra values, and
    compare by their fields (tests/runner checks the two agree)."""
    if saved is status:
        return True
    a, b = saved.__dict__, status.__dict__
    for name in _LASTING_FIELDS:
        x, y = a[name], b[name]
        if x is not y and x != y:  # identity first, as the models' == does (a shared NaN)
            return False
    return True


_FINISH_REASONS = {"promoted": "Promoted", "rolled_back": "RolledBack"}
# The analysis state saved with the record (_analysis_state): ~7 KiB for the three default
# metrics; the record saves it only within an eighth of its object limit.
_ANALYSIS_VERSION = 1
MAX_ANALYSIS_CHARS = 128 << 10


class AnalyzerLike(Protocol):
    """What the runner needs of analysis.Analyzer."""

    def observe(self, snapshot: Snapshot, /) -> Verdict: ...


@runtime_checkable
class CarriedAnalysis(Protocol):
    """An analyzer whose state can be saved and taken up exactly (analysis.Analyzer)."""

    def carry(self) -> dict[str, Any]: ...

    def carry_on(self, state: object, /) -> None: ...


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


def _default_analyzer() -> AnalyzerLike:
    from analysis import AnalysisConfig, Analyzer

    return Analyzer(AnalysisConfig())


# What metric_results() gives for each metric, in LastTick.metrics' order after the name.
_METRIC_FIELDS = (
    "decision",
    "estimate",
    "lower",
    "upper",
    "scale",
    "critical",
    "fail_ratio",
    "tolerance",
)


@dataclass(frozen=True, slots=True)
class LastTick:
    """The last tick's figures that the runner's state() shows, without the tick's models."""

    weight_read: int | None
    elapsed_s: float
    metrics: tuple[tuple[Any, ...], ...] | None  # (name, *_METRIC_FIELDS) per metric

    @classmethod
    def of(cls, entry: TickEntry) -> LastTick:
        verdict = entry.verdict
        metrics = None
        if verdict is not None:
            metrics = tuple(
                (
                    name,
                    m.decision.value,
                    m.estimate,
                    m.lower,
                    m.upper,
                    m.scale,
                    m.critical,
                    m.fail_ratio,
                    m.tolerance,
                )
                for name, m in verdict.metrics.items()
            )
        return cls(entry.weight_read, entry.elapsed_s, metrics)


def next_tick_at(previous: float | None, now: float, period: float, *, first: float) -> float:
    """When the next tick is due: `first` after now for the first one, then one `period`
    after the last scheduled tick (a fixed rate: the ticks' own cost does not add up). A tick
    that ran past its slot is followed by the next slot on the same grid that is at least half
    a period away: no burst to catch up, no drift, and never two looks back to back (a look
    right after another sees too little traffic to say anything)."""
    if previous is None:
        return now + first
    due = previous + period
    if due >= now:
        return due
    due = previous + (math.floor((now - previous) / period) + 1) * period
    return due + period if due - now < period / 2 else due


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


MAX_RECHECK_S = 600.0  # the longest wait between two observed estimates of the planner


@dataclass
class RolloutRunner:
    """Runs one rollout to its end (or until cancelled).

    The seams (canary.runner.seams): `router`, `metrics`, `records` (opens the record; by
    default a JSON-lines file at `record_path`), `store` (persists the status; by default a
    JSON file at `status_path`, or nothing when that is None), `workload` (promotes and scales;
    by default nothing to deploy), `announcer` (hears of transitions; Kubernetes Events) and
    `guard` (called before every action that changes traffic; raises to stop the runner, as a
    controller that lost its Lease must). `tick_hook(name, status)` returns extra TickEntry
    fields (the demo's measured split, as `observed_canary_share`); `observers` are called
    with a TickReport after every tick; `entry_observers` with every record entry
    (notifications).
    """

    name: str
    spec: RolloutSpec
    router: TrafficRouter
    metrics: MetricsProvider
    record_path: Path = Path("/dev/null")
    tick_s: float = 10.0
    analyzer_factory: Callable[[], AnalyzerLike] = _default_analyzer
    revision: str = ""
    primary_version: str = ""
    canary_version: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    # The planner's advice (canary.core.advice), said at the start of every rollout and again
    # once counts are observed: the traffic expected at the entry point and the primary's
    # error rate for the estimate at the start (None: the first estimate waits for counts),
    # and the analysis settings to plan with (None: the analyzer's own `config`).
    expected_rps: float | None = None
    expected_error_rate: float = ASSUMED_ERROR_RATE
    # A load test run by a rollout hook (canary loadtest): req/s it adds, and where.
    generated_rps: float | None = None
    generated_at: LoadAt = "entry"
    analysis: AnalysisConfig | None = None
    advise: bool = True
    # Overrides of the start entry's plan, from a caller that knows more than the rates (the
    # demo knows the regression it injected): e.g. {"expected_fail_s": ...}.
    plan: Mapping[str, float | None] = field(default_factory=dict)
    workload: Workload = field(default_factory=NoWorkload)
    tick_hook: Callable[[str, RolloutStatus], Mapping[str, Any]] | None = None
    observers: list[Callable[[TickReport], None]] = field(default_factory=list)
    # called with every entry once it is in the record (canary.notify.webhooks.Notifier.on_entry)
    entry_observers: list[Callable[[Any], object]] = field(default_factory=list)
    telemetry: Telemetry | None = None
    router_timeout_s: float = 10.0
    # Timers run on this clock; the default never jumps when the wall clock is stepped.
    clock: Callable[[], float] = field(default_factory=MonotonicWallClock)
    # Where the status is saved (before every action) so a restarted runner resumes the same
    # rollout: same record, same step, evidence replayed from the record. None: no saving.
    # Used only when no `store` is given.
    status_path: Path | None = None
    resume_saved: bool = True  # False: start a new rollout even if a saved one is unfinished
    store: StateStore | None = None
    records: RecordOpener | None = None
    announcer: Announcer | None = None
    guard: Callable[[], None] | None = None
    # Who runs it, for the resume note ("resumed by pod-a"); "" for a single controller.
    identity: str = ""
    # Gate webhooks (canary.notify.gates) the machine asks for with CallGate; each call runs
    # in its own task (one per kind at a time) and its answer comes back as a Gate event.
    gates: GateAsker | None = None
    gate_timeout_s: float = 600.0  # a call (all its attempts) longer than this is a "no"
    # Extra fields for state() (a Deployment's namespace and name).
    labels: Mapping[str, str] = field(default_factory=dict)
    # A pause between looks longer than this (and than 3 ticks) is marked in the record.
    gap_noted_s: float = 5.0
    # A status that differs from the saved one only in what a resume does not need (the last
    # data time, the message, the last decision) is saved at most this often, for `canary
    # status` (Flagger's default analysis interval: a status a minute): in Kubernetes mode each
    # save is a PATCH of the Deployment and a watch event for every watcher (issue 13). A
    # resume takes the last data time from the record or the status, the newer: one of them
    # is written whenever both lag it by a quarter of the no-data deadline (_record_due).
    volatile_save_s: float = 60.0

    def __post_init__(self) -> None:
        if self.tick_s <= 0:
            raise ValueError(f"tick_s must be positive, got {self.tick_s}")
        self.status = RolloutStatus()
        self.stopped = False  # cancelled before the rollout ended
        # The last tick, as little of it as the live page and the status read: its verdict's
        # models were ~9 KiB a rollout held between ticks (issue 13's memory target).
        self.last_tick: LastTick | None = None
        # The current rollout's recent ticks, compact, for the live page (bounded).
        self.history = TickHistory(HISTORY_POINTS)
        self.record: RecordSink | None = None
        self.record_error = ""  # the last failure to write the record, "" once one succeeds
        self.status_error = ""  # why the status cannot be saved (the rollout holds meanwhile)
        self.unsaved = False  # the last event's change was not saved, so not carried out
        self._saved_status: RolloutStatus | None = None  # what the store holds, as far as known
        self._last_saved: SavedRollout | None = None
        # Manual commands and gate answers, handled in the runner's own task.
        self._commands: asyncio.Queue[_Pending | Gate] = asyncio.Queue()
        self._gate_calls: dict[str, asyncio.Task[None]] = {}
        self._analyzer: AnalyzerLike | None = None
        self._rollout_id = ""
        self._started_at = 0.0
        self._pending_revision: str | None = None
        self._prepared = False
        self._last_look: float | None = None  # monotonic time of the last tick
        self._next_tick: float | None = None  # loop time of the next scheduled tick
        self._resumable: SavedRollout | None = None
        self._resumed_entries: list[Entry] = []
        self._resumed_record: RecordSink | None = None
        # Read from the record's head on resume: where the record ends, and the analysis
        # taken up from it with its looks (or why not: the record is then read and replayed).
        self._resumed_head: tuple[SavedHead, AnalyzerLike | None, int] | None = None
        self._history_seed: Callable[[], tuple[Entry, ...]] | None = None  # SavedHead.recent
        self._analysis_refused = ""
        self._looks = 0  # snapshots the current analysis has observed
        self._finished: SavedRollout | None = None  # this revision's rollout, already over
        self._advice: Advice | None = None  # the planner's last advice said to users
        self._advice_checked_s: float | None = None  # analysis seconds of the last estimate
        self._advice_recheck_s = RECHECK_S  # doubles while the estimate holds (see below)
        self._planning: AnalysisConfig | None = None
        # When the first look comes, in periods after the start (see _wait_or_command; a
        # resume looks sooner: _resume).
        self._first_look = (0.5, 1.0)

    # ---- public -------------------------------------------------------------------------

    @property
    def rollout_id(self) -> str:
        return self._rollout_id

    @property
    def record_ref(self) -> str:
        return self.record.ref if self.record is not None else ""

    async def command(self, command: Command) -> CommandResult:
        """Hand a manual command to the runner's task and wait for its answer."""
        answer: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        await self._commands.put(_Pending(command, answer))
        return await answer

    def supersede(self, revision: str) -> None:
        """A new revision appeared mid-rollout: the next turn of the loop ends this record
        (outcome `superseded`) and starts the new revision's rollout."""
        if revision != self.status.revision:
            self._pending_revision = revision

    def state(self) -> dict[str, Any]:
        """The current state as JSON-able data (for /rollouts)."""
        status = self.status
        data: dict[str, Any] = {
            "name": self.name,
            "rollout": self._rollout_id,
            "record": self.record.label if self.record is not None else str(self.record_path),
            "phase": status.phase.value,
            "step": status.step,
            "steps": [] if self.spec.ab else list(self.spec.steps),  # A/B: no weight steps
            "weight": status.weight,
            "weight_verified": status.weight_verified,
            "last_decision": status.last_decision,
            "reason": status.reason,
            "message": status.message,
            # the planner's latest: how long a good canary needs to pass this step
            "advice": status.advice,
            "stopped": self.stopped,
            "status": status.model_dump(mode="json", exclude_defaults=True),
        }
        if self.last_tick is not None:
            data["weight_read"] = self.last_tick.weight_read
            data["elapsed_s"] = self.last_tick.elapsed_s
            if self.last_tick.metrics is not None:  # each metric's decision and bounds
                data["metrics"] = self.metric_results()
        if status.gate_answers:
            data["gates"] = dict(status.gate_answers)
        if len(self.history) and self.history.rollout == self._rollout_id:
            # the server leaves it out of /rollouts unless asked (?history=1)
            data["history"] = self.history.points()
        if self.record_error:
            data["record_error"] = self.record_error
        if self.status_error:
            data["status_error"] = self.status_error
        data.update(self.labels)
        return data

    def metric_results(self) -> dict[str, dict[str, Any]]:
        """Each metric's decision, estimate and bounds from the last verdict (`canary status`,
        the live page, the Kubernetes status annotation); {} before the first verdict."""
        metrics = self.last_tick.metrics if self.last_tick is not None else None
        if metrics is None:
            return {}
        return {m[0]: dict(zip(_METRIC_FIELDS, m[1:], strict=True)) for m in metrics}

    def _remember(self, entry: TickEntry) -> None:
        """Keep a compact copy of the tick for the live page; a new rollout starts afresh."""
        self.history.append(entry)

    def _seed_history(self, entries: Iterable[Entry]) -> None:
        """A resumed rollout's recorded ticks, for the live page: its charts carry on from
        them rather than starting empty after a restart or a shard move. Not a tick stamped
        later than now (another replica's clock ahead of ours): the charts' times only go
        forward."""
        now = self.clock()
        for entry in entries:
            if isinstance(entry, TickEntry) and entry.rollout == self._rollout_id:
                if entry.at < now:
                    self.history.append(entry)

    async def prepare(self) -> None:
        """Take the rollout's lock and read what a restart resumes, before anything moves:
        raises StateLocked (another controller runs it) or ResumeError (a saved rollout that
        cannot be read back). run() calls it; a supervisor may call it first to refuse to
        start. Idempotent."""
        if self._prepared:
            return
        if self.store is None and self.status_path is not None:
            self.store = FileStateStore(self.status_path, resume=self.resume_saved)
        if self.records is None:
            self.records = FileRecords(self.record_path)
        if self.store is not None:
            await self.store.acquire()
            try:
                self._resumable = await self.store.load()
                if self._resumable is not None and self._resumable.status.done:
                    # Over: the same revision is not rolled out again (a restart after the
                    # end, or `canary run` again); another revision starts a new rollout.
                    if self._resumable.status.revision == self._wanted_revision():
                        self._finished = self._resumable
                    self._resumable = None
                if self._resumable is not None:
                    self._resumed_entries = await self._read_saved_record(self._resumable)
            except (OSError, ValueError, KeyError, TypeError, ResumeError) as exc:
                await self.store.release()
                if isinstance(exc, ResumeError):
                    raise
                raise ResumeError(
                    f"{self.name}: cannot resume from {self.store}: {exc}; nothing was changed "
                    "(start a new rollout on purpose with --fresh)"
                ) from exc
        self._prepared = True

    async def _read_saved_record(self, saved: SavedRollout) -> list[Entry]:
        assert self.records is not None
        record = self.records(saved.rollout_id, ref=saved.record or None)
        self._resumed_record = record  # the same sink carries on (a ConfigMap keeps what it read)
        self._carry_with(record)
        if isinstance(record, AnalysisRecord):
            head = await record.read_head()
            if head is not None:
                taken = self._take_analysis(head.analysis, saved)
                if not isinstance(taken, str):
                    self._resumed_head = (head, *taken)
                    return []  # the analysis carries on: nothing to replay
                self._analysis_refused = taken
                log.info(
                    "%s: the analysis saved with the record is not taken up: %s", self.name, taken
                )
        try:
            return await record.read()
        except (OSError, ValueError, RecordWriteError) as exc:
            raise ResumeError(
                f"{self.name}: the saved rollout's record {record.label} cannot be read: "
                f"{exc}; nothing was changed (start a new rollout on purpose with --fresh)"
            ) from exc

    async def run(self) -> RolloutStatus:
        """Start (or resume) the rollout and run it to its end. Cancel to stop it: weights
        stay where they are."""
        bound = bind_rollout(self._log_fields)  # every log line of this task names the rollout
        try:
            await self.prepare()
            try:
                return await self._run()
            finally:
                if self.store is not None:
                    await self.store.release()
        finally:
            unbind_rollout(bound)

    def _log_fields(self) -> dict[str, Any]:
        """The rollout's fields on each log line logged while it runs (canary.core.logs)."""
        fields: dict[str, Any] = {
            "rollout": self.labels.get("deployment", self.name),
            "namespace": self.labels.get("namespace"),
            "phase": self.status.phase.value,
            "step": self.status.step,
            "weight": self.status.weight,
            "decision": self.status.last_decision,
        }
        if self._rollout_id:
            fields["rollout_id"] = self._rollout_id
        return fields

    def _wanted_revision(self) -> str:
        return self.revision or self.canary_version

    async def _run(self) -> RolloutStatus:
        if self._finished is not None:
            self.status = self._finished.status
            self._rollout_id = self._finished.rollout_id
            log.info(
                "%s: %s already ended (%s): nothing to do; --fresh rolls it out again",
                self.name,
                self._rollout_id,
                self.status.outcome,
            )
            return self.status
        self._started_at = self.clock()
        try:
            if not await self._resume():
                revision = self._wanted_revision() or time.strftime(
                    "%Y%m%dT%H%M%SZ", time.gmtime(self._started_at)
                )
                self._open_record(revision)
                advice = await self._assumed_advice()
                await self._write(self._start_entry(self.config.get("reason")))
                # Stored before any status names this record: a kill right after the first
                # save must leave a record that a restart can read and carry on.
                await self._flush_record(force=True)
                await self._feed(NewRevision(revision, "rollout started"))
                await self._tell_advice(advice)
            await self._save(force=True)
            await self._flush_record(force=True)
            while not self.status.done:
                await self._wait_or_command()
                if self.status.done:
                    break
                await self._supersede()
                began = asyncio.get_running_loop().time()
                if self.telemetry is not None and self._next_tick is not None:
                    self.telemetry.tick_lateness.observe(max(0.0, began - self._next_tick))
                await self._tick()
                if self.telemetry is not None:
                    self.telemetry.tick_seconds.observe(asyncio.get_running_loop().time() - began)
                # The record before the status: a status that says "done" has its record.
                await self._flush_record(force=self.status.done or self._record_due())
                if self.status.done or self._needs_save():
                    await self._save(force=True)
        except NotActing:
            raise  # not ours to act on any more (a lost Lease): write nothing, say nothing
        except asyncio.CancelledError:
            self.stopped = True
            await self._stopped_note()
            with contextlib.suppress(Exception):
                await self._flush_record(force=True)
            raise
        except Exception as exc:
            # A bug, not an edge error (those are events): say so in the record, then crash.
            with contextlib.suppress(Exception):
                await self._note(
                    "warning", f"controller error, rollout abandoned as it was: {exc!r}"
                )
                await self._flush_record(force=True)
            raise
        finally:
            self._refuse_pending_commands()
            await self._stop_gates()
        # The record first: once the status says "done", readers may look for it.
        await self._flush_record(force=True)
        await self._save(force=True)
        return self.status

    def _refuse_pending_commands(self) -> None:
        """Commands that will never be handled get an answer instead of hanging."""
        while not self._commands.empty():
            pending = self._commands.get_nowait()
            if isinstance(pending, _Pending) and not pending.answer.done():
                pending.answer.set_result(
                    CommandResult(False, self.status.phase.value, "the rollout is not running")
                )

    # ---- the loop ---------------------------------------------------------------------

    async def _wait_or_command(self) -> None:
        """Sleep until the next tick, handling any manual command that arrives meanwhile.

        Ticks are at a fixed rate (the period does not drift by each tick's own cost); a tick
        late by more than a period starts the schedule again from now rather than bursting.
        The first one comes after a random half to whole period, so many rollouts started
        together do not all tick in the same millisecond."""
        self._next_tick = next_tick_at(
            self._next_tick,
            asyncio.get_running_loop().time(),
            self.tick_s,
            # Spread over half a period, never sooner: a first look needs traffic to see.
            first=self.tick_s * random.uniform(*self._first_look),
        )
        deadline = self._next_tick
        while not self.status.done:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    pending = await self._commands.get()
            except TimeoutError:
                return
            if isinstance(pending, Gate):
                await self._feed(pending)
                continue
            before = self.status
            self.unsaved = False
            actions = await self._feed(pending.command)
            refused = any(isinstance(a, RecordManual) and not a.accepted for a in actions)
            message = next(
                (a.message for a in actions if isinstance(a, Emit) and refused),
                self.status.reason if self.status is not before else "",
            )
            if self.unsaved:
                refused, message = True, f"{self.status_error}: nothing was changed"
            if not pending.answer.done():
                pending.answer.set_result(
                    CommandResult(not refused, self.status.phase.value, message)
                )

    async def _tick(self) -> None:
        if self._history_seed is not None:
            # A resumed rollout's latest recorded ticks, for the live page: read here, off
            # the loop, not in the resume (a takeover resumes hundreds of rollouts at once,
            # and their first looks are spread over half a period).
            seed, self._history_seed = self._history_seed, None
            try:
                self._seed_history(await run_blocking("packing", seed))
            except Exception:  # only the charts' start: never a reason to stop a rollout
                log.exception("%s: the recorded ticks could not be shown", self.name)
        now = self.clock()
        looked = time.monotonic()
        gap = looked - self._last_look if self._last_look is not None else 0.0
        self._last_look = looked
        if gap > max(3 * self.tick_s, self.gap_noted_s):
            # Marked in the record (and so in the report): the analysis did not look meanwhile.
            await self._note(
                "warning",
                f"no look for {gap:.3g}s (one every {self.tick_s:g}s expected): the controller "
                "was stalled or suspended",
            )
        weight_read: int | None = None
        match_read: bool | None = None
        router_error: str | None = None
        ab = match_router(self.router)
        try:
            async with asyncio.timeout(self.router_timeout_s):
                weight_read = await self.router.get_weight()
                if ab is not None:
                    match_read = await ab.get_match()  # A/B: read back like the weight
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
            self.telemetry.analysis(self.name, verdict)  # each metric's estimate, bounds, e-values

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
        self.last_tick = LastTick.of(entry)
        self._remember(entry)
        log.debug(
            "%s: tick %s at %d%% (read %s): %s",
            self.name,
            entry.phase,
            entry.weight_set,
            weight_read if router_error is None else router_error,
            decision.value if decision is not None else f"no data ({no_data})",
        )
        await self._write(entry)
        actions = await self._feed(
            Tick(decision, reason, weight_read, router_error, match_read=match_read)
        )
        if counts is not None:
            await self._observed_advice(
                Snapshot(elapsed_s=elapsed, primary=counts.primary, canary=counts.canary)
            )
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
            # Prometheus stamps samples with the wall clock: ask in its time.
            offset = self.clock.wall_offset() if isinstance(self.clock, MonotonicWallClock) else 0.0
            result = await self.metrics.fetch(since=since + offset, now=now + offset)
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
        self._looks += 1
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
            previous, self.status = self.status, outcome.status
            if (
                changed
                and not self.status.done
                and self._needs_save(volatile=False)
                and not await self._save()
            ):
                # Write-ahead or nothing: a change that is not saved is not carried out (a
                # restart would resume the old status and move traffic back). The rollout
                # holds where it is; the machine decides again at the next look.
                self.status = previous
                self.unsaved = True
                break
            if self.telemetry is not None:
                self.telemetry.show(self.name, self.status)
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
        if isinstance(action, SetWeight | Promote) and self.guard is not None:
            self.guard()  # e.g. the Lease may have lapsed since the last save
        match action:
            case SetWeight(weight, wanted_match):
                # A router set up for A/B always gets the match (on or off) with the weight.
                ab = wanted_match or match_router(self.router) is not None
                try:
                    async with asyncio.timeout(self.router_timeout_s):
                        await set_and_verify(
                            self.router, weight, match=wanted_match if ab else None
                        )
                except (RouterError, TimeoutError) as exc:
                    self._count_error("router")
                    return WeightFailed(weight, str(exc) or type(exc).__name__, wanted_match)
                return WeightVerified(weight, wanted_match)
            case Promote(revision):
                try:
                    await self.workload.promote(revision)
                except Exception as exc:
                    log.exception("%s: promotion failed", self.name)
                    self._count_error("promote")
                    return PromoteDone(ok=False, error=str(exc) or type(exc).__name__)
                return PromoteDone(ok=True)
            case ScaleCanary(up):
                try:
                    await self.workload.scale_canary(up)
                except Exception as exc:
                    log.exception("%s: scaling the canary failed", self.name)
                    self._count_error("scale")
                    await self._note(
                        "warning", f"scaling the canary {'up' if up else 'down'} failed: {exc}"
                    )
            case CallGate(kind, index):
                self._ask_gate(kind, index)
            case ResetAnalysis():
                self._analyzer = None  # a fresh one at the next observation
                self._looks = 0
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
                bad = after in ("RollingBack", "Failed")
                await self._announce(
                    "Warning" if bad else "Normal",
                    after,
                    f"{before} -> {after} at {weight}%: {reason}",
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
                await self._announce(
                    "Warning" if level == "warning" else "Normal", "Rollout", message
                )
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
                await self._announce(
                    "Normal" if outcome == "promoted" else "Warning",
                    _FINISH_REASONS.get(outcome, "Aborted"),
                    reason,
                )
        return None

    # ---- gates --------------------------------------------------------------------------

    def _ask_gate(self, kind: GateKind, index: int) -> None:
        """Call the gate in a task (not if a call of that kind is in flight); its answer is
        queued as a Gate event for the runner's own task."""
        if self.gates is None or kind in self._gate_calls:
            return
        status = self.status
        task = asyncio.create_task(
            self._call_gate(kind, index, status.revision, status.phase.value),
            name=f"gate {kind} {self.name}",
        )
        self._gate_calls[kind] = task
        task.add_done_callback(lambda _: self._gate_calls.pop(kind, None))

    async def _call_gate(self, kind: GateKind, index: int, revision: str, phase: str) -> None:
        assert self.gates is not None
        try:
            async with asyncio.timeout(self.gate_timeout_s):
                ok, detail = await self.gates.ask(
                    kind,
                    name=self.labels.get("deployment", self.name),
                    namespace=self.labels.get("namespace", ""),
                    phase=phase,
                    checksum=revision,
                )
        except TimeoutError:
            ok, detail = False, f"no answer within {self.gate_timeout_s:g}s"
        except Exception as exc:  # a bug in a gate is a "no", never a crash of the rollout
            log.exception("%s: gate %s failed", self.name, kind)
            ok, detail = False, type(exc).__name__
        if not ok:
            self._count_error("gate")
        result: Literal["open", "closed", "failed"] = (
            "open" if ok else "failed" if kind in ("pre-rollout", "rollout") else "closed"
        )
        self._commands.put_nowait(Gate(kind, result, redact_text(detail), index, revision))

    async def _stop_gates(self) -> None:
        """Cancel and await the gate calls in flight, then close the gates' client."""
        tasks = list(self._gate_calls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._gate_calls.clear()
        if self.gates is not None:
            with contextlib.suppress(Exception):
                await self.gates.aclose()

    # ---- a new revision mid-rollout ---------------------------------------------------

    async def _supersede(self) -> None:
        revision = self._pending_revision
        self._pending_revision = None
        if revision is None or revision == self.status.revision:
            return
        old = self.rollout_id
        reason = f"superseded {old}: the pod template changed to {revision} during the rollout"
        await self._write(
            EndEntry(
                at=self.clock(),
                rollout=old,
                outcome="superseded",
                reason=f"the pod template changed to {revision} during the rollout",
                duration_s=max(0.0, self.clock() - self._started_at),
            )
        )
        await self._flush_record(force=True)
        self._started_at = self.clock()
        self._open_record(revision)
        self.canary_version = revision
        advice = await self._assumed_advice()
        await self._write(self._start_entry(reason))
        await self._note("info", f"this rollout {reason}; the analysis starts over")
        await self._flush_record(force=True)  # before a status names the new record
        await self._announce("Normal", "Superseded", reason)
        await self._feed(NewRevision(revision, reason))
        await self._tell_advice(advice)

    # ---- saved status and resuming -------------------------------------------------------

    def _saved(self) -> SavedRollout:
        return SavedRollout(
            rollout_id=self._rollout_id,
            record=self.record_ref,
            started_at=self._started_at,
            status=self.status,
            record_error=self.record_error,
        )

    def _needs_save(self, *, volatile: bool = True) -> bool:
        """Whether the status differs from the saved one in what a resume needs, or (with
        `volatile`) its volatile fields are older in the store than volatile_save_s, or the
        last data time is stored nowhere recent enough (_data_stale). The write-ahead before
        actions asks without `volatile`: the tick's end asks again, after the record's flush,
        which may store the last data time instead (_record_due)."""
        saved, status = self._saved_status, self.status
        if saved is None or not same_but_volatile(saved, status):
            return True
        if not volatile:
            return False
        if status.last_data_at is None or saved.last_data_at is None:
            return status.last_data_at != saved.last_data_at
        if status.last_data_at - saved.last_data_at >= self.volatile_save_s:
            return True  # for `canary status`
        return self._data_stale()

    def _stored_data_at(self) -> tuple[float | None, float | None]:
        """The last data time as a resume would find it (see _resume), in the record (its
        newest stored tick with data; None while its writes fail) and in the saved status."""
        record = None
        if self.record is not None and not self.record_error:
            record = self.record.data_through
        saved = self._saved_status.last_data_at if self._saved_status is not None else None
        return record, saved

    def _data_stale(self) -> bool:
        """Whether neither store holds a last data time within a quarter of the no-data
        deadline of the rollout's: a resume would then come closer to that deadline than the
        rollout really was."""
        last = self.status.last_data_at
        if last is None:
            return False
        stored = [t for t in self._stored_data_at() if t is not None]
        return not stored or last - max(stored) >= self.spec.no_data_deadline_s / 4

    def _record_due(self) -> bool:
        """When the last data time is stale in both stores, the record's flush is forced if
        the record is the older of the two (else the status is saved: _needs_save), so they
        take turns: at the default 120 s deadline, each written once a minute keeps it within
        30 s (issue 13: each write is an API call). A record that thins its ticks may not
        store this one; then the status carries it."""
        if self.record is None or self.record_error or not self._data_stale():
            return False
        record, saved = self._stored_data_at()
        return (record if record is not None else -math.inf) <= (
            saved if saved is not None else -math.inf
        )

    async def _save(self, *, force: bool = False) -> bool:
        """Persist the status (write-ahead while active; a done status only when `force`d,
        after its actions). False when the store failed: counted, logged and shown
        (`status_error`), never fatal, except a guard's exception (a lost Lease), which
        stops the runner."""
        if self.store is None or (self.status.done and not force):
            return True
        snapshot = self._saved()
        if snapshot == self._last_saved:
            return True  # the store holds exactly this already
        try:
            await self.store.save(snapshot)
            self._saved_status, self._last_saved = self.status, snapshot
        except (OSError, StateWriteError) as exc:
            if not self.status_error:
                log.error("%s: cannot save the status, holding: %s", self.name, exc)
            self.status_error = f"cannot save the status to {self.store}: {exc}"
            self._count_error("status")
            return False
        if self.status_error:
            log.info("%s: the status is saved again", self.name)
            self.status_error = ""
        return True

    async def _resume(self) -> bool:
        """Continue the saved, unfinished rollout that prepare() read: same record, same step,
        evidence replayed. False when there is nothing to resume."""
        saved = self._resumable
        if saved is None:
            return False
        assert self._resumed_record is not None
        self.status = self._saved_status = saved.status
        self._rollout_id = saved.rollout_id
        self.record = self._resumed_record
        self.record_error = saved.record_error
        if isinstance(self.record, FileRecord):
            self.record_path = self.record.path  # the resumed rollout's file
        self._started_at = saved.started_at or self.status.started_at or self._started_at
        entries = self._resumed_entries
        if self._resumed_head is not None:
            # The head's analysis state names this rollout: its start is in this record.
            head, self._analyzer, self._looks = self._resumed_head
            evidence = (
                f"the analysis carried on from the state saved with the record "
                f"({self._looks} looks)"
            )
            recorded, last = head.data_at, head.tick_at
            self._history_seed = head.recent  # read before the first look (_tick)
        else:
            if not any(
                isinstance(e, StartEntry) and e.rollout == saved.rollout_id for e in entries
            ):
                # The record was lost (a ConfigMap deleted, or never stored): start it again
                # here, so what follows is recorded; the evidence before is gone with it.
                await self._write(self._start_entry("record lost: restarted on resume"))
                await self._note(
                    "warning", f"the record {self.record.label} was lost; it starts again here"
                )
            replayed = self._replay_record(entries)
            self._seed_history(entries)
            refused = self._analysis_refused
            evidence = f"{replayed} ticks of evidence replayed into a fresh analysis" + (
                f" (the analysis state saved with the record: {refused})" if refused else ""
            )
            # The last data time: the status saves it only every volatile_save_s while the
            # record holds it (see _needs_save); the newer of the two.
            recorded = max(
                (
                    e.at
                    for e in entries
                    if isinstance(e, TickEntry)
                    and e.verdict is not None
                    and e.rollout == saved.rollout_id
                ),
                default=None,
            )
            last = max((e.at for e in entries if isinstance(e, TickEntry)), default=None)
        self._resumed_entries = []  # replayed: holding them would grow with the record's age
        self._resumed_head = None
        counting = self._count_on()
        known = self.status.last_data_at
        if recorded is not None and self.status.active and (known is None or recorded > known):
            self.status = self.status.model_copy(update={"last_data_at": recorded})
        status = self.status
        by = f" by {self.identity}" if self.identity else ""
        gap = f"; no look for {self.clock() - last:.0f}s before" if last is not None else ""
        # Traffic has flowed since the last look (a shard moves a Lease duration after it):
        # the first look comes within half a period, no sooner than half a period after the
        # last recorded one, and never later than a fresh rollout's (half to one period: a
        # record stamped by another replica's clock may seem to be from the future).
        since_last = self.clock() - last if last is not None else math.inf
        earliest = min(0.5, max(0.0, 0.5 - since_last / self.tick_s))
        self._first_look = (earliest, earliest + 0.5)
        await self._note(
            "info",
            f"resumed{by} during {status.phase.value} at step {status.step} "
            f"({status.weight}% wanted); {evidence}{gap}{counting}",
        )
        if self.telemetry is not None:
            self.telemetry.show(self.name, status)
        await self._confirm_weight()
        return True

    async def _confirm_weight(self) -> None:
        """After a restart, a weight written but not yet confirmed is confirmed by reading
        it back (the same check set_and_verify makes); any other reading is left to the
        next tick, which sets the wanted weight again."""
        if self.status.weight_verified or self.status.done:
            return
        ab = match_router(self.router)
        try:
            async with asyncio.timeout(self.router_timeout_s):
                read = await self.router.get_weight()
                matched = await ab.get_match() if ab is not None else False
        except (RouterError, TimeoutError):
            return
        if read == self.status.weight and matched == self.status.match:
            await self._feed(WeightVerified(read, matched))

    def _replay_record(self, entries: list[Entry]) -> int:
        """Feed the record's ticks since the analysis began to a fresh Analyzer: counts are
        cumulative from that start, so the evidence comes back exactly as it was."""
        since = self.status.analysis_started_at
        self._analyzer = self.analyzer_factory()
        # Analyzer.replay judges each look as observe does without building its Verdict:
        # the replay was most of a resume's CPU (benchmarks/resume_cost.py).
        feed: Callable[[Snapshot], object] = getattr(
            self._analyzer, "replay", self._analyzer.observe
        )
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
                feed(
                    Snapshot(elapsed_s=entry.elapsed_s, primary=entry.primary, canary=entry.canary)
                )
                replayed += 1
        self._looks = replayed
        return replayed

    # ---- the planner's advice ------------------------------------------------------------

    def _planning_config(self) -> AnalysisConfig | None:
        """The analysis settings to plan with: given, else the analyzer's own."""
        if self.analysis is not None:
            return self.analysis
        if self._planning is None:
            analyzer = self._analyzer or self.analyzer_factory()
            config = getattr(analyzer, "config", None)
            self._planning = config if isinstance(config, AnalysisConfig) else None
        return self._planning

    async def _assumed_advice(self) -> Advice | None:
        """The estimate for the first step from the expected traffic (None without one).
        Planning is CPU work of up to a few hundred ms: it runs off the event loop."""
        self._advice = None
        self._advice_checked_s = None
        self._advice_recheck_s = RECHECK_S
        config = self._planning_config() if self.advise else None
        if config is None or self.expected_rps is None or self.spec.ab:
            return None  # A/B: the canary's share is the matching traffic, not a weight
        try:
            self._advice = await run_blocking(
                "planning",
                assumed_advice,
                expected_rps=self.expected_rps,
                expected_error_rate=self.expected_error_rate,
                weight=self.spec.steps[0],
                budget_s=self.spec.max_step_s,
                config=config,
                generated_rps=self.generated_rps,
                generated_at=self.generated_at,
            )
        except (ValueError, ArithmeticError) as exc:
            log.warning(
                "%s: no time-to-pass estimate from the expected traffic: %s", self.name, exc
            )
        except Exception:  # advice only: a planner bug must never stop a rollout
            log.exception("%s: the planner failed", self.name)
        return self._advice

    async def _observed_advice(self, snapshot: Snapshot) -> None:
        """Estimate again from the observed rates once they are worth it, and tell users
        the first time and whenever the estimate changed materially. Only while the first
        pass is still to come: a pass is sticky, so later steps wait for min_step_s only."""
        status = self.status
        if (
            not self.advise
            or self.spec.ab
            or status.stage != "Progressing"
            or status.last_decision == "pass"
        ):
            return
        config = self._planning_config()
        if config is None or not observed_due(
            self._advice_checked_s, snapshot, config=config, recheck_s=self._advice_recheck_s
        ):
            return
        self._advice_checked_s = snapshot.elapsed_s
        try:
            advice = await run_blocking(
                "planning",
                observed_advice,
                snapshot,
                weight=status.weight,
                budget_s=self.spec.max_step_s,
                config=config,
                generated_rps=self.generated_rps,
                generated_at=self.generated_at,
            )
        except (ValueError, ArithmeticError) as exc:
            log.debug("%s: no time-to-pass estimate from the counts: %s", self.name, exc)
            return
        except Exception:  # advice only: a planner bug must never stop a rollout
            log.exception("%s: the planner failed", self.name)
            return
        # An estimate that held is looked at again half as often (up to every 10 min): at a
        # thousand rollouts a fresh estimate every minute was 40% of the controller's CPU
        # (benchmarks/scale.py), for advice that had not changed.
        if material(self._advice, advice):
            self._advice_recheck_s = RECHECK_S
            await self._tell_advice(advice)
        else:
            self._advice_recheck_s = min(2 * self._advice_recheck_s, MAX_RECHECK_S)

    async def _tell_advice(self, advice: Advice | None) -> None:
        """Say it everywhere users look: the log, a note in the record (the reports show it),
        the status (/rollouts, `canary status`) and, in Kubernetes, an Event on the
        Deployment, a Warning when the step may not pass within max_step_s."""
        if advice is None:
            return
        self._advice = advice
        (log.warning if advice.level == "warning" else log.info)(
            "%s: %s", self.name, advice.message
        )
        await self._write(
            NoteEntry(
                at=self.clock(),
                rollout=self._rollout_id,
                level=advice.level,
                message=advice.message,
                plan=advice.plan(),
            )
        )
        self.status = self.status.model_copy(update={"advice": advice.message})
        await self._announce("Normal" if advice.fits else "Warning", "PassEstimate", advice.message)

    # ---- record -----------------------------------------------------------------------

    def _open_record(self, revision: str) -> None:
        assert self.records is not None
        self._history_seed = None  # the resumed rollout's ticks: not this one's
        self._rollout_id = f"{self.name}@{revision}"
        self.record = self.records(self._rollout_id)
        self._carry_with(self.record)

    def _carry_with(self, record: RecordSink) -> None:
        """The record keeps the metric source's counting state and the analysis' state for
        the next replica."""
        if isinstance(record, CarryingRecord) and isinstance(self.metrics, CarriedCounts):
            record.carry_from(self.metrics.carry)
        if isinstance(record, AnalysisRecord):
            record.keep_analysis_with(self._analysis_state)

    def _analysis_state(self) -> str | None:
        """The analysis as of the entries written so far, for a resume to take up
        (_take_analysis): the record saves it with each write. The record is written by this
        task alone, right after each look, so the two never disagree. None when the analyzer
        cannot carry its state (one without carry())."""
        analyzer = self._analyzer
        if analyzer is not None and not isinstance(analyzer, CarriedAnalysis):
            return None
        state = {
            "v": _ANALYSIS_VERSION,
            "rollout": self._rollout_id,
            "since": self.status.analysis_started_at,
            "looks": self._looks,
            "analysis": None if analyzer is None else analyzer.carry(),
        }
        # ~0.14 ms of CPU a write (~7 KiB); gzip level 1 packs it as small as 6 (most of it
        # is float64 bytes), a little cheaper
        return pack_state(state, max_chars=MAX_ANALYSIS_CHARS, level=1)

    def _take_analysis(
        self, text: str, saved: SavedRollout
    ) -> tuple[AnalyzerLike | None, int] | str:
        """The analyzer (None: none yet) and its looks, from the analysis state a saved
        record's head holds (_analysis_state), if it is this rollout's analysis since the
        saved status' start; else why not (the record is then read and replayed)."""
        try:
            state = unpack_state(text, max_chars=MAX_ANALYSIS_CHARS, source="analysis state")
        except InputError as exc:
            return str(exc)[:300]
        since, looks = state.get("since"), state.get("looks")
        if state.get("v") != _ANALYSIS_VERSION:
            return f"version {excerpt(state.get('v'), 20)}, not {_ANALYSIS_VERSION}"
        if state.get("rollout") != saved.rollout_id:
            return f"it is {excerpt(state.get('rollout'), 80)}'s, not {saved.rollout_id}'s"
        if since != saved.status.analysis_started_at or (
            since is not None and type(since) is not float
        ):
            return "it is of another analysis (the status and the record were saved apart)"
        if type(looks) is not int or looks < 0:
            return "no count of looks"
        analyzer: AnalyzerLike | None = None
        if state.get("analysis") is not None:
            analyzer = self.analyzer_factory()
            if not isinstance(analyzer, CarriedAnalysis):
                return "this analyzer cannot take up a saved state"
            try:
                analyzer.carry_on(state["analysis"])
            except (ValueError, TypeError, ArithmeticError) as exc:  # never costs the resume
                return str(exc)[:300]
        elif looks:
            return f"{looks} looks but no analysis"
        return analyzer, looks

    def _count_on(self) -> str:
        """Take up the counting state the resumed record carries: the first look then reads
        from where the last replica's reads stopped, not back to the analysis' start. Says
        which it is, for the resumed note."""
        record, since = self.record, self.status.analysis_started_at
        carried = record.take_carried() if isinstance(record, CarryingRecord) else None
        if carried is None or since is None or not isinstance(self.metrics, CarriedCounts):
            return ""
        offset = self.clock.wall_offset() if isinstance(self.clock, MonotonicWallClock) else 0.0
        why = self.metrics.carry_on(carried, since=since + offset, now=self.clock() + offset)
        if why is None:
            return "; counts carried on from the state saved with the record"
        log.info("%s: the counting state saved with the record is not taken up: %s", self.name, why)
        return f"; counts read back to the analysis' start (the saved state: {why})"

    def _start_entry(self, reason: str | None) -> StartEntry:
        config = {**self.config, "rollout": self.spec.model_dump(mode="json")}
        if reason is not None:
            config["reason"] = reason
        return StartEntry(
            at=self._started_at,
            rollout=self._rollout_id,
            target=self.name,
            primary_version=self.primary_version,
            canary_version=self.canary_version,
            steps=[] if self.spec.ab else list(self.spec.steps),
            config=redact(config),  # secrets never reach the record
            plan={**(self._advice.plan() if self._advice is not None else {}), **self.plan},
        )

    async def _write(self, entry: Entry) -> None:
        if self.record is not None:
            try:
                await self.record.append(entry)
            except (OSError, RecordWriteError) as exc:  # a full disk must not strand traffic
                log.error("%s: cannot append to %s: %s", self.name, self.record.label, exc)
                self._count_error("record")
                self.record_error = f"could not append to {self.record.label}: {exc}"
            else:
                if self.record_error.startswith("could not append"):
                    self.record_error = ""
        self._observe(entry)

    async def _flush_record(self, *, force: bool = False) -> None:
        """Store the record if due; failures are counted, shown and announced, never raised."""
        if self.record is None:
            return
        try:
            wrote = await self.record.flush(force=force)
        except (OSError, RecordWriteError) as exc:
            self._count_error("record")
            message = f"could not write {exc}"
            log.warning("%s: %s", self.name, message)
            self.record_error = message
            await self._announce("Warning", "RecordWriteFailed", message)
            return
        if wrote and self.record_error:
            self.record_error = ""
            await self._announce("Normal", "RecordWritten", f"record {self.record_ref} written")

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

    async def _announce(
        self, type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> None:
        if self.announcer is not None:
            await self.announcer.announce(type, reason, message)

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
