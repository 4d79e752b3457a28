"""The rollout state machine: pure, so every decision can be table-tested and replayed.

`step(spec, status, event, now) -> Outcome(status, actions)` never awaits and does no I/O.
The controller (static HAProxy targets) and the Kubernetes reconciler feed it the same
events, carry out the actions it returns, report each action's result back as another
event, and persist `RolloutStatus`, which serialises to compact JSON and holds everything
needed to resume: same step, no step taken twice, no jump in weight.

Phases (Flagger's names; derived from the status as Argo does, never stored twice)::

    Initializing -> Progressing(step i) -> Promoting -> Succeeded
                          |                    |
                          +----> RollingBack <-+ (before the template is copied) -> Failed
    Paused: a flag on top of Initializing/Progressing that freezes weights and timers.

Decisions taken here, and why:

- **Evidence accumulates over the whole rollout.** The analysis counts "since the analysis
  began" (the rollout's start), not per step: restarting it at each step would throw away
  evidence and make each step a fresh peek. A step advances once `min_step_s` has passed
  since its weight was *verified* AND the latest verdict is `pass`; later steps therefore
  mostly take `min_step_s` each, while a `fail` at any time rolls back.
- **Max step time rolls back.** With no pass after `max_step_s` at one step the canary has not
  been shown to be safe, and "pass needs positive evidence": we roll back and say so.
  `max_step_s = None` waits forever (for services with very little traffic).
- **No data holds, then rolls back.** No data (or an unreachable router) holds the current
  weight; once it has lasted `no_data_deadline_s` the rollout rolls back. "No data" is never
  a pass. Both clocks start at the rollout's start, so a canary that never reports is caught.
- **A regression found while paused still rolls back.** Pause freezes weights and timers, it
  does not silence the analysis: a human holding a step should not hide a regression.
- **Weights count only when verified.** `SetWeight` is answered by `WeightVerified` or
  `WeightFailed`; a step's timer starts at verification, and a tick that reads a weight other
  than the one wanted re-asserts it (drift, a router restarted without its state).
- **Promotion** first sends 100% to the canary, then asks for `Promote` (copy the template to
  the primary: a no-op for static targets, idempotent, re-asked on each tick until done).
  With `promotion="copy"` (Kubernetes, Flagger's model) the weight then goes back to 0 and the
  canary is scaled down; with `promotion="shift"` (static targets) the canary keeps 100%.
- Manual commands are accepted or refused with a reason; never an exception.
- **Gates are inputs, the machine decides** (Flagger's webhook kinds). The machine asks for
  a gate with `CallGate`; the runner calls the hook in a task and feeds its answer back as
  a `Gate` event (open: 2xx; closed or failed: anything else). `confirm-rollout` then
  `pre-rollout` must open before the first weight is set (the rollout waits in
  Initializing, no analysis clock running); a closed confirm is asked again each tick.
  `pre-rollout` and `rollout` (asked each tick while Progressing) failures count against
  `gate_failure_threshold`, and reaching it rolls back. `confirm-traffic-increase` and
  `confirm-promotion` are asked once a step has passed: closed holds the weight, and a
  held gate is not a failure (max_step_s does not apply once the analysis passed), while
  a `fail` still rolls back. `rollback` is polled each tick while waiting or Progressing:
  open means roll back now. An answer is noted (record, Event) when it changes.
- **A/B mode** (`ab_duration_s` set) replaces the weight steps with one phase: the canary
  gets weight 0 and only the requests that match a header or cookie (`status.match`), for
  at least `ab_duration_s`; a pass then promotes as above, a fail rolls back. The match is
  set, read back and re-asserted exactly like a weight (`SetWeight(0, match=True)`), and is
  removed on promotion and rollback.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from analysis import Decision
from canary.core.inputs import MAX_DURATION_S, excerpt

__all__ = [
    "DEFAULT_STEPS",
    "GATE_KINDS",
    "Action",
    "CallGate",
    "Command",
    "Emit",
    "Event",
    "Finish",
    "Gate",
    "GateKind",
    "NewRevision",
    "Outcome",
    "Phase",
    "Promote",
    "PromoteDone",
    "RecordManual",
    "RecordTransition",
    "ResetAnalysis",
    "RolloutSpec",
    "RolloutStatus",
    "ScaleCanary",
    "SetWeight",
    "Stage",
    "Tick",
    "Transition",
    "WeightFailed",
    "WeightVerified",
    "check_steps",
    "step",
]

DEFAULT_STEPS: tuple[int, ...] = (5, 10, 25, 50)
HISTORY_KEPT = 12  # transitions kept in the status; the record keeps them all


class Phase(StrEnum):
    INITIALIZING = "Initializing"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTING = "Promoting"
    SUCCEEDED = "Succeeded"
    ROLLING_BACK = "RollingBack"
    FAILED = "Failed"


# The stored part of the phase; Paused is derived from `paused_at`.
Stage = Literal["Initializing", "Progressing", "Promoting", "Succeeded", "RollingBack", "Failed"]
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})


def check_steps(steps: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Steps are canary percentages, each 1..99, strictly increasing (100 is the promotion).
    Raises ValueError naming the offending index."""
    if len(steps) == 0:
        raise ValueError("steps: at least one step is needed")
    previous = 0
    for index, weight in enumerate(steps):
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(
                f"steps[{index}]: must be an integer percentage, got {excerpt(weight)}"
            )
        if not 1 <= weight <= 99:
            raise ValueError(
                f"steps[{index}]: must be within 1..99 (100 is the promotion), got {weight}"
            )
        if index > 0 and weight <= previous:
            raise ValueError(f"steps[{index}]: must be greater than {previous}, got {weight}")
        previous = weight
    return tuple(steps)


GateKind = Literal[
    "confirm-rollout",
    "pre-rollout",
    "rollout",
    "confirm-traffic-increase",
    "confirm-promotion",
    "rollback",
]
GATE_KINDS: tuple[str, ...] = typing.get_args(GateKind)
# Flagger counts a failed pre-rollout/rollout webhook as a failed check; its examples
# roll back at 5 (analysis.threshold). Same default here.
DEFAULT_GATE_FAILURE_THRESHOLD = 5


class RolloutSpec(BaseModel):
    """How a rollout moves. Built from a static config file or from annotations."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[int, ...] = DEFAULT_STEPS
    # Finite and at most a week: an infinite deadline is a rollout that never ends
    # (max_step_s None is how to wait forever at a step).
    min_step_s: float = Field(default=60.0, ge=0, le=MAX_DURATION_S, allow_inf_nan=False)
    max_step_s: float | None = Field(default=900.0, gt=0, le=MAX_DURATION_S, allow_inf_nan=False)
    no_data_deadline_s: float = Field(default=120.0, gt=0, le=MAX_DURATION_S, allow_inf_nan=False)
    promotion: Literal["shift", "copy"] = "shift"
    # The gate kinds configured (canary.notify.gates calls them); none: no gate is asked.
    gates: tuple[GateKind, ...] = ()
    gate_failure_threshold: int = Field(default=DEFAULT_GATE_FAILURE_THRESHOLD, ge=1, le=100)
    # A/B mode: how long only matching requests go to the canary before a pass promotes
    # (instead of the weight steps). None: weight steps.
    ab_duration_s: float | None = Field(default=None, ge=0, le=MAX_DURATION_S, allow_inf_nan=False)

    @property
    def ab(self) -> bool:
        return self.ab_duration_s is not None

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: object) -> tuple[int, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError("steps must be a list of percentages")
        return check_steps(tuple(value))

    @field_validator("max_step_s")
    @classmethod
    def _max_after_min(cls, value: float | None, info: ValidationInfo) -> float | None:
        minimum = info.data.get("min_step_s")
        if value is not None and minimum is not None and value < minimum:
            raise ValueError(f"must be at least min_step_s ({minimum:g}), got {value:g}")
        return value


class Transition(BaseModel):
    """One phase change, kept (truncated) in the status for `canary status`."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # persisted: see RolloutStatus

    at: float
    from_phase: str
    to_phase: str
    step: int
    weight: int
    reason: str


class RolloutStatus(BaseModel):
    """The whole persisted state of one rollout. Times are unix seconds."""

    # Persisted, and read back by whichever canary runs next: a field a newer version
    # added is ignored, as Kubernetes ignores unknown fields, so that going back a version
    # resumes every rollout instead of finding its status unreadable and starting it over.
    # (User input, the specs and annotations, stays strict: a typo there is an error.)
    model_config = ConfigDict(frozen=True, extra="ignore")

    stage: Stage = "Initializing"
    revision: str = ""
    step: int = 0  # index into spec.steps
    weight: int = 0  # the canary percent wanted now
    weight_verified: bool = True  # `weight` (and `match`) has been read back from the router
    match: bool = False  # A/B: matching requests go to the canary (wanted now)
    started_at: float | None = None
    analysis_started_at: float | None = None  # metrics are counted from here
    step_started_at: float | None = None  # when this step's weight was verified
    last_data_at: float | None = None  # last tick with metrics
    router_failing_since: float | None = None
    paused_at: float | None = None
    paused_by: str | None = None
    promoted: bool = False  # the template has been copied to the primary
    outcome: Literal["promoted", "rolled_back", "aborted"] | None = None
    last_decision: str | None = None
    reason: str = ""  # why the rollout is in its current stage
    message: str = ""  # what it is doing now (waiting, holding, retrying)
    # The planner's latest advice on the time a good canary needs to pass this step
    # (canary.core.advice): set by the runner for users to read, never read by the machine.
    advice: str = ""
    # Gates opened for this rollout (confirm-rollout, pre-rollout) or this step (the confirms).
    gates_open: tuple[str, ...] = ()
    gate_failures: int = 0  # failed pre-rollout/rollout calls, against gate_failure_threshold
    gate_answers: dict[str, str] = Field(default_factory=dict)  # kind -> the last answer, shown
    history: tuple[Transition, ...] = ()

    @property
    def phase(self) -> Phase:
        if self.paused_at is not None and self.stage not in TERMINAL:
            return Phase.PAUSED
        return Phase(self.stage)

    @property
    def active(self) -> bool:
        """Started and not over."""
        return self.stage != "Initializing" and self.stage not in TERMINAL

    @property
    def done(self) -> bool:
        return self.stage in TERMINAL

    @property
    def underway(self) -> bool:
        """Active, or waiting at a start gate (Initializing with its revision): a restarted
        controller resumes it rather than leaving it stranded."""
        return self.active or (self.stage == "Initializing" and bool(self.revision))

    def to_json(self) -> str:
        """Compact JSON (defaults left out) for an annotation or a status file."""
        return self.model_dump_json(exclude_defaults=True)

    @classmethod
    def from_json(cls, text: str) -> RolloutStatus:
        return cls.model_validate_json(text)


# ---- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """One look at the world. `decision` None means no data (`reason` says why);
    `weight_read` None means the router was not read (or failed: see `router_error`)."""

    decision: Decision | None
    reason: str = ""
    weight_read: int | None = None
    router_error: str | None = None
    match_read: bool | None = None  # A/B routers: whether the match is in place


@dataclass(frozen=True, slots=True)
class Command:
    command: Literal["promote", "abort", "pause", "resume"]
    who: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NewRevision:
    """A new version to roll out (a new pod template; for static targets, the start)."""

    revision: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WeightVerified:
    weight: int
    match: bool = False


@dataclass(frozen=True, slots=True)
class WeightFailed:
    weight: int
    error: str
    match: bool = False


@dataclass(frozen=True, slots=True)
class PromoteDone:
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class Gate:
    """A gate's answer: `open` (2xx), `closed` (a confirm or rollback gate said no, or did not
    answer) or `failed` (a pre-rollout/rollout hook did not succeed). `step` and `revision`
    are those it was asked for: a late answer for another step or revision is ignored."""

    kind: GateKind
    result: Literal["open", "closed", "failed"]
    detail: str = ""
    step: int = 0
    revision: str = ""


Event = Tick | Command | NewRevision | WeightVerified | WeightFailed | PromoteDone | Gate


# ---- actions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetWeight:
    """Set the canary's share (and, A/B, the match) and read it back; answer with
    WeightVerified/WeightFailed."""

    weight: int
    match: bool = False


@dataclass(frozen=True, slots=True)
class Promote:
    """Copy the canary's template to the primary (idempotent); answer with PromoteDone."""

    revision: str


@dataclass(frozen=True, slots=True)
class ScaleCanary:
    up: bool


@dataclass(frozen=True, slots=True)
class ResetAnalysis:
    """Start a fresh analysis (and counting window) at `since`."""

    since: float
    reason: str


@dataclass(frozen=True, slots=True)
class RecordTransition:
    from_phase: str
    to_phase: str
    step: int
    weight: int
    reason: str


@dataclass(frozen=True, slots=True)
class RecordManual:
    command: str
    who: str
    reason: str
    accepted: bool


@dataclass(frozen=True, slots=True)
class Emit:
    """Something a human should see: a Kubernetes Event, a log line, a record note."""

    level: Literal["info", "warning"]
    message: str


@dataclass(frozen=True, slots=True)
class CallGate:
    """Ask the `kind` gate (in a task: never waited for); its answer comes back as a Gate."""

    kind: GateKind
    step: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    """The rollout is over: write the record's end entry, notify."""

    outcome: Literal["promoted", "rolled_back", "aborted"]
    reason: str


Action = (
    SetWeight
    | Promote
    | ScaleCanary
    | ResetAnalysis
    | RecordTransition
    | RecordManual
    | Emit
    | CallGate
    | Finish
)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: RolloutStatus
    actions: tuple[Action, ...] = ()


# ---- the machine ----------------------------------------------------------------------


def step(spec: RolloutSpec, status: RolloutStatus, event: Event, now: float) -> Outcome:
    """Advance one rollout by one event."""
    match event:
        case Tick():
            if _read_verifies(status, event):
                verified = _weight_verified(
                    spec, status, WeightVerified(status.weight, status.match), now
                )
                if verified.actions:  # a promotion goes on, or the rollout ended
                    return verified
                status = verified.status
            return _with_polls(spec, _tick(spec, status, event, now))
        case Command():
            return _command(spec, status, event, now)
        case NewRevision():
            return _new_revision(spec, status, event, now)
        case WeightVerified():
            return _weight_verified(spec, status, event, now)
        case WeightFailed():
            return _weight_failed(status, event, now)
        case PromoteDone():
            return _promote_done(spec, status, event, now)
        case Gate():
            return _gate(spec, status, event, now)
    raise TypeError(f"unknown event {event!r}")  # pragma: no cover


def _move(
    status: RolloutStatus,
    stage: Stage,
    now: float,
    reason: str,
    *,
    paused: bool = False,
    **update: object,
) -> tuple[RolloutStatus, RecordTransition]:
    """Change stage (and anything in `update`), keeping the transition in the history."""
    before = status.phase
    new = status.model_copy(update={"stage": stage, "reason": reason, "message": reason, **update})
    if not paused:
        new = new.model_copy(update={"paused_at": None, "paused_by": None})
    after = new.phase
    record = RecordTransition(before.value, after.value, new.step, new.weight, reason)
    entry = Transition(
        at=now,
        from_phase=before.value,
        to_phase=after.value,
        step=new.step,
        weight=new.weight,
        reason=reason,
    )
    new = new.model_copy(update={"history": (*status.history, entry)[-HISTORY_KEPT:]})
    return new, record


def _start(
    spec: RolloutSpec, status: RolloutStatus, now: float, reason: str, *, entering: bool = True
) -> Outcome:
    """Set the first step's weight, once confirm-rollout and pre-rollout (if any) opened."""
    pending = _start_gate(spec, status)
    if pending is not None:
        return _wait_at_start(status, now, reason, pending, entering=entering)
    first = 0 if spec.ab else spec.steps[0]
    new, record = _move(
        status,
        "Progressing",
        now,
        reason,
        step=0,
        weight=first,
        match=spec.ab,
        weight_verified=False,
        started_at=now,
        analysis_started_at=now,
        step_started_at=None,
        last_data_at=None,
        router_failing_since=None,
        promoted=False,
        outcome=None,
        last_decision=None,
        advice="",
    )
    return Outcome(
        new,
        (
            record,
            ResetAnalysis(now, reason),
            ScaleCanary(up=True),
            SetWeight(first, match=spec.ab),
        ),
    )


def _roll_back(
    status: RolloutStatus,
    now: float,
    reason: str,
    *,
    outcome: Literal["rolled_back", "aborted"] = "rolled_back",
    extra: tuple[Action, ...] = (),
) -> Outcome:
    new, record = _move(
        status,
        "RollingBack",
        now,
        reason,
        weight=0,
        match=False,
        weight_verified=False,
        outcome=outcome,
        step_started_at=None,
    )
    return Outcome(new, (*extra, record, Emit("warning", f"rolling back: {reason}"), SetWeight(0)))


def _promote(
    status: RolloutStatus, now: float, reason: str, extra: tuple[Action, ...] = ()
) -> Outcome:
    new, record = _move(
        status,
        "Promoting",
        now,
        reason,
        weight=100,
        match=False,
        weight_verified=False,
        step_started_at=None,
        outcome="promoted",
    )
    return Outcome(new, (*extra, record, SetWeight(100)))


def _reassert_weight(status: RolloutStatus, tick: Tick) -> tuple[Action, ...]:
    """Ask for the wanted weight again when it is not known to be in place."""
    if tick.router_error is not None:
        return ()
    if tick.weight_read is not None and tick.weight_read != status.weight:
        return (
            Emit(
                "warning",
                f"router reports {tick.weight_read}% but {status.weight}% is wanted: setting it again",
            ),
            SetWeight(status.weight, match=status.match),
        )
    if tick.match_read is not None and tick.match_read != status.match:
        return (
            Emit(
                "warning",
                f"router reports the A/B match {_on(tick.match_read)} but it should be "
                f"{_on(status.match)}: setting it again",
            ),
            SetWeight(status.weight, match=status.match),
        )
    if tick.weight_read is None and not status.weight_verified:
        return (SetWeight(status.weight, match=status.match),)
    return ()


def _read_verifies(status: RolloutStatus, tick: Tick) -> bool:
    """The tick read the wanted weight (and A/B match) back while it is not verified: that
    read is the verification. A set whose write landed but whose own read-back timed out
    leaves the weight unverified, and nothing else would verify it while the router reads
    it right (2,000 rollouts: 45 waited 15 minutes "for the router to confirm 10%" while it
    read 10%); setting it again every tick instead piled writes on the API server that was
    timing them out."""
    return (
        not status.weight_verified
        and status.stage in ("Progressing", "Promoting", "RollingBack")
        and tick.router_error is None
        and tick.weight_read == status.weight
        and (tick.match_read == status.match if tick.match_read is not None else not status.match)
    )


def _on(match: bool) -> str:
    return "on" if match else "off"


def _misrouted(status: RolloutStatus, tick: Tick) -> bool:
    """The router answered with a route other than the one wanted (weight or A/B match)."""
    return (tick.weight_read is not None and tick.weight_read != status.weight) or (
        tick.match_read is not None and tick.match_read != status.match
    )


def _tick(spec: RolloutSpec, status: RolloutStatus, tick: Tick, now: float) -> Outcome:
    if status.stage == "Initializing":
        if status.paused_at is not None:
            return Outcome(status)
        return _start(spec, status, now, "rollout started", entering=False)
    if status.done:
        return Outcome(status)

    # Router health and data freshness are tracked in every active stage.
    failing_since = status.router_failing_since
    wrong = _misrouted(status, tick)
    if tick.router_error is not None or (wrong and status.weight_verified):
        # Unreadable, or no longer what was verified: failing until it reads back right.
        failing_since = failing_since if failing_since is not None else now
    elif tick.weight_read is not None and not wrong:
        failing_since = None  # a router that answers with the wrong weight is still failing
    decision = tick.decision
    update: dict[str, object] = {"router_failing_since": failing_since}
    if decision is not None:
        update["last_data_at"] = now
        update["last_decision"] = decision.value
    status = status.model_copy(update=update)
    fix = _reassert_weight(status, tick)

    if status.stage == "RollingBack":
        return Outcome(status, fix)
    if status.stage == "Promoting":
        router_ok = failing_since is None
        failing_for = 0.0 if failing_since is None else now - failing_since
        if (
            not fix
            and router_ok
            and status.weight_verified
            and not status.promoted
            and status.weight == 100
        ):
            return Outcome(status, (Promote(status.revision),))
        if not router_ok and not status.promoted and failing_for >= spec.no_data_deadline_s:
            # Not promoted yet and the router is gone: the canary's share cannot be known,
            # so hand everything back to the primary rather than hold forever.
            return _roll_back(
                status,
                now,
                f"router failing for {failing_for:.0f}s while promoting "
                f"(deadline {spec.no_data_deadline_s:g}s): {_router_detail(status, tick)}",
            )
        return Outcome(status, fix)

    # Progressing (possibly paused).
    if decision is Decision.FAIL:
        return _roll_back(status, now, f"analysis failed: {tick.reason}".rstrip(": "))
    if status.paused_at is not None:
        return Outcome(status, fix)

    origin = status.analysis_started_at if status.analysis_started_at is not None else now
    if failing_since is not None and now - failing_since >= spec.no_data_deadline_s:
        return _roll_back(
            status,
            now,
            f"router failing for {now - failing_since:.0f}s (deadline {spec.no_data_deadline_s:g}s): {_router_detail(status, tick)}",
        )
    if decision is None:
        since = status.last_data_at if status.last_data_at is not None else origin
        if now - since >= spec.no_data_deadline_s:
            return _roll_back(
                status,
                now,
                f"no data for {now - since:.0f}s (deadline {spec.no_data_deadline_s:g}s): {tick.reason}",
            )
        held = status.model_copy(
            update={"message": f"holding at {status.weight}%: no data ({tick.reason})"}
        )
        return Outcome(held, fix)

    if status.step_started_at is None or not status.weight_verified:
        waiting = status.model_copy(
            update={"message": f"waiting for the router to confirm {status.weight}%"}
        )
        return Outcome(waiting, fix)
    if failing_since is not None:
        # The weight in place is not known: no step, promotion or pass counts until the
        # router answers with the wanted weight again (then the deadline above rolls back).
        held = status.model_copy(
            update={
                "message": f"holding at {status.weight}%: router failing ({_router_detail(status, tick)})"
            }
        )
        return Outcome(held, fix)

    in_step = now - status.step_started_at
    least = spec.ab_duration_s if spec.ab_duration_s is not None else spec.min_step_s
    if decision is Decision.PASS and in_step >= least:
        gate = _confirm_gate(spec, status)
        if gate is not None:
            # Held by a gate, not by the canary: max_step_s does not count this against it.
            answer = status.gate_answers.get(gate)
            held = status.model_copy(
                update={
                    "message": f"holding at {status.weight}%: analysis passed; waiting for the "
                    f"{gate} gate" + (f" ({answer})" if answer else "")
                }
            )
            return Outcome(held, (*fix, CallGate(typing.cast(GateKind, gate), status.step)))
        if spec.ab:
            return _promote(status, now, f"A/B analysis passed after {in_step:.0f}s")
        return _advance(spec, status, now, fix)
    if spec.max_step_s is not None and in_step >= spec.max_step_s:
        return _roll_back(
            status,
            now,
            f"no pass within max_step_s ({spec.max_step_s:g}s) at {status.weight}%: the canary was not shown to be safe",
        )
    wait = (
        f"{decision.value}; A/B match for {in_step:.0f}s (min {least:g}s)"
        if spec.ab
        else f"{decision.value}; step {status.step + 1}/{len(spec.steps)} at {status.weight}% "
        f"for {in_step:.0f}s (min {spec.min_step_s:g}s)"
    )
    return Outcome(status.model_copy(update={"message": wait}), fix)


def _router_detail(status: RolloutStatus, tick: Tick) -> str:
    if tick.router_error:
        return tick.router_error
    if tick.weight_read is not None and tick.weight_read != status.weight:
        return f"it reports {tick.weight_read}% instead of {status.weight}%"
    if tick.match_read is not None and tick.match_read != status.match:
        return f"it reports the A/B match {_on(tick.match_read)} instead of {_on(status.match)}"
    return f"{status.weight}% never read back"


def _advance(
    spec: RolloutSpec, status: RolloutStatus, now: float, fix: tuple[Action, ...]
) -> Outcome:
    del fix  # the new SetWeight supersedes any re-assertion
    following = status.step + 1
    if following >= len(spec.steps):
        return _promote(status, now, f"analysis passed at every step (last {status.weight}%)")
    weight = spec.steps[following]
    reason = f"analysis passed at {status.weight}%: next step {weight}%"
    new, record = _move(
        status,
        "Progressing",
        now,
        reason,
        step=following,
        weight=weight,
        weight_verified=False,
        step_started_at=None,
        # the confirms are asked again at the next step
        gates_open=tuple(g for g in status.gates_open if g not in _STEP_GATES),
        gate_answers={k: v for k, v in status.gate_answers.items() if k not in _STEP_GATES},
    )
    return Outcome(new, (record, SetWeight(weight)))


def _command(spec: RolloutSpec, status: RolloutStatus, command: Command, now: float) -> Outcome:
    label = f"{command.command} by {command.who}" + (
        f": {command.reason}" if command.reason else ""
    )

    def refuse(why: str) -> Outcome:
        return Outcome(
            status,
            (
                RecordManual(command.command, command.who, command.reason, accepted=False),
                Emit("warning", f"{command.command} refused: {why}"),
            ),
        )

    accepted: tuple[Action, ...] = (
        RecordManual(command.command, command.who, command.reason, accepted=True),
    )
    phase = status.phase

    if status.done:
        return refuse(f"the rollout is over ({phase.value})")

    if command.command == "promote":
        if status.stage == "RollingBack":
            return refuse("a rollback is in progress")
        if status.stage == "Promoting":
            return refuse("already promoting")
        if status.stage == "Initializing":
            status = status.model_copy(update={"started_at": now, "analysis_started_at": now})
            accepted = (*accepted, ScaleCanary(up=True))
        return _promote(status, now, f"manual {label}", accepted)

    if command.command == "abort":
        if status.stage == "RollingBack":
            return refuse("already rolling back")
        if status.stage == "Promoting" and status.promoted:
            return refuse("the template has already been copied to the primary")
        return _roll_back(status, now, f"manual {label}", outcome="aborted", extra=accepted)

    if command.command == "pause":
        if status.stage not in ("Initializing", "Progressing"):
            return refuse(f"cannot pause while {phase.value}")
        if status.paused_at is not None:
            return refuse(f"already paused by {status.paused_by}")
        new, record = _move(
            status,
            status.stage,
            now,
            f"manual {label}",
            paused=True,
            paused_at=now,
            paused_by=command.who,
        )
        return Outcome(new, (*accepted, record))

    # resume
    if status.paused_at is None:
        return refuse(f"not paused ({phase.value})")
    frozen = now - status.paused_at

    def shifted(value: float | None) -> float | None:
        return None if value is None else value + frozen

    new, record = _move(
        status,
        status.stage,
        now,
        f"manual {label}",
        step_started_at=shifted(status.step_started_at),
        last_data_at=shifted(status.last_data_at),
        router_failing_since=shifted(status.router_failing_since),
    )
    # With no data yet the no-data clock runs from the analysis start: move it past the pause.
    if new.last_data_at is None and new.analysis_started_at is not None:
        new = new.model_copy(update={"last_data_at": new.analysis_started_at + frozen})
    return Outcome(new, (*accepted, record))


def _new_revision(
    spec: RolloutSpec, status: RolloutStatus, event: NewRevision, now: float
) -> Outcome:
    if event.revision == status.revision and status.stage != "Initializing":
        return Outcome(status)
    reason = event.reason or f"new revision {event.revision}"
    if status.active:
        reason = f"{reason}: restarting the analysis (was {status.phase.value} at {status.weight}%)"
    fresh_gates: dict[str, object] = {"gates_open": (), "gate_failures": 0, "gate_answers": {}}
    base = status.model_copy(update={"revision": event.revision, **fresh_gates})  # _start unpauses
    if status.done:
        base = RolloutStatus(revision=event.revision, history=status.history, weight=status.weight)
    return _start(spec, base, now, reason)


def _weight_verified(
    spec: RolloutSpec, status: RolloutStatus, event: WeightVerified, now: float
) -> Outcome:
    if event.weight != status.weight or event.match != status.match:
        return Outcome(status)  # a stale answer for a weight no longer wanted
    new = status.model_copy(update={"weight_verified": True, "router_failing_since": None})
    if status.stage == "Progressing" and status.step_started_at is None:
        new = new.model_copy(update={"step_started_at": now})
        return Outcome(new)
    if status.stage == "Promoting" and event.weight == 100 and not status.promoted:
        return Outcome(new, (Promote(status.revision),))
    if status.stage == "Promoting" and event.weight == 0 and status.promoted:
        return _finish(
            new,
            "Succeeded",
            now,
            "template copied to the primary, which serves all traffic again",
            (ScaleCanary(up=False),),
        )
    if status.stage == "RollingBack" and event.weight == 0:
        outcome = status.outcome if status.outcome in ("rolled_back", "aborted") else "rolled_back"
        reason = status.reason or "rolled back"
        return _finish(new, "Failed", now, reason, (ScaleCanary(up=False),), outcome=outcome)
    return Outcome(new)


def _finish(
    status: RolloutStatus,
    stage: Literal["Succeeded", "Failed"],
    now: float,
    reason: str,
    extra: tuple[Action, ...] = (),
    *,
    outcome: Literal["promoted", "rolled_back", "aborted"] = "promoted",
) -> Outcome:
    new, record = _move(status, stage, now, reason, outcome=outcome)
    return Outcome(new, (*extra, record, Finish(outcome, reason)))


def _weight_failed(status: RolloutStatus, event: WeightFailed, now: float) -> Outcome:
    if event.weight != status.weight or event.match != status.match:
        return Outcome(status)
    since = status.router_failing_since if status.router_failing_since is not None else now
    new = status.model_copy(
        update={
            "weight_verified": False,
            "router_failing_since": since,
            "message": f"could not set {_route(event.weight, event.match)}: {event.error}",
        }
    )
    return Outcome(
        new,
        (Emit("warning", f"could not set {_route(event.weight, event.match)}: {event.error}"),),
    )


def _route(weight: int, match: bool) -> str:
    return f"{weight}% and the A/B match" if match else f"{weight}%"


def _promote_done(
    spec: RolloutSpec, status: RolloutStatus, event: PromoteDone, now: float
) -> Outcome:
    if status.stage != "Promoting" or status.promoted:
        return Outcome(status)
    if not event.ok:
        new = status.model_copy(update={"message": f"promotion failed, will retry: {event.error}"})
        return Outcome(new, (Emit("warning", f"promotion failed: {event.error}"),))
    new = status.model_copy(update={"promoted": True})
    if spec.promotion == "shift":
        return _finish(new, "Succeeded", now, "the canary now serves all traffic")
    new = new.model_copy(update={"weight": 0, "weight_verified": False})
    return Outcome(new, (SetWeight(0),))


# ---- gates ------------------------------------------------------------------------------

_START_GATES = ("confirm-rollout", "pre-rollout")  # in this order, before any traffic moves
_STEP_GATES = ("confirm-traffic-increase", "confirm-promotion")


def _start_gate(spec: RolloutSpec, status: RolloutStatus) -> str | None:
    """The start gate still to open, if any."""
    return next((g for g in _START_GATES if g in spec.gates and g not in status.gates_open), None)


def _confirm_gate(spec: RolloutSpec, status: RolloutStatus) -> str | None:
    """The gate that must open before this passed step moves on, if any."""
    last = spec.ab or status.step + 1 >= len(spec.steps)  # A/B: one phase, then promotion
    gate = "confirm-promotion" if last else "confirm-traffic-increase"
    return gate if gate in spec.gates and gate not in status.gates_open else None


def _wait_at_start(
    status: RolloutStatus, now: float, reason: str, gate: str, *, entering: bool
) -> Outcome:
    """Wait in Initializing (no analysis clock, no traffic to the canary) for `gate`."""
    answer = status.gate_answers.get(gate)
    message = f"waiting for the {gate} gate before any traffic moves" + (
        f" ({answer})" if answer else ""
    )
    actions: list[Action] = []
    update: dict[str, object] = {"message": message, "paused_at": None, "paused_by": None}
    if status.weight != 0:  # a superseded rollout had traffic: the new revision has none yet
        update.update(weight=0, weight_verified=False)
        actions.append(SetWeight(0))
    if status.stage != "Initializing":
        new, record = _move(status, "Initializing", now, reason)
        new = new.model_copy(update=update)
        actions.insert(0, record)
    else:
        new = status.model_copy(update={"reason": reason, **update})
    if entering:
        actions.append(Emit("info", f"{reason}: {message}"))
        if gate == "pre-rollout":
            actions.append(ScaleCanary(up=True))  # pre-rollout hooks test the running canary
    actions.append(CallGate(typing.cast(GateKind, gate), 0))
    return Outcome(new, tuple(actions))


def _with_polls(spec: RolloutSpec, outcome: Outcome) -> Outcome:
    """After a tick: poll the rollback gate while Progressing or waiting at a start gate, and
    call the rollout hook while Progressing (not paused)."""
    status, calls = outcome.status, list[Action]()
    asked = {a.kind for a in outcome.actions if isinstance(a, CallGate)}
    waiting = status.stage == "Initializing" and _start_gate(spec, status) is not None
    if "rollback" in spec.gates and (status.stage == "Progressing" or waiting):
        calls.append(CallGate("rollback", status.step))
    if "rollout" in spec.gates and status.stage == "Progressing" and status.paused_at is None:
        calls.append(CallGate("rollout", status.step))
    calls = [c for c in calls if isinstance(c, CallGate) and c.kind not in asked]
    return Outcome(status, (*outcome.actions, *calls)) if calls else outcome


def _gate(spec: RolloutSpec, status: RolloutStatus, event: Gate, now: float) -> Outcome:
    if status.done or event.revision != status.revision or event.kind not in spec.gates:
        return Outcome(status)  # late, for another revision, or not configured
    kind, opened = event.kind, event.result == "open"
    label = event.result + (f" ({event.detail})" if event.detail else "")
    noted: tuple[Action, ...] = ()
    if status.gate_answers.get(kind) != label:  # recorded when the answer changes
        quiet = opened or (kind == "rollback" and event.result == "closed")
        noted = (Emit("info" if quiet else "warning", f"gate {kind}: {label}"),)
    status = status.model_copy(update={"gate_answers": {**status.gate_answers, kind: label}})
    waiting = status.stage == "Initializing"

    if kind == "rollback":
        if opened and (status.stage == "Progressing" or (waiting and status.revision)):
            return _roll_back(
                status, now, f"the rollback gate asked for a rollback ({label})", extra=noted
            )
        return Outcome(status, noted)
    if kind in _START_GATES:
        if not waiting or _start_gate(spec, status) != kind:
            return Outcome(status, noted)
        if opened:
            started = _start(
                spec,
                status.model_copy(update={"gates_open": (*status.gates_open, kind)}),
                now,
                status.reason or "rollout started",
            )
            return Outcome(started.status, (*noted, *started.actions))
        if kind == "pre-rollout":
            return _gate_failed(spec, status, now, kind, label, noted)
        message = f"waiting for the {kind} gate before any traffic moves ({label})"
        return Outcome(status.model_copy(update={"message": message}), noted)
    if kind == "rollout":
        if opened or status.stage != "Progressing":
            return Outcome(status, noted)
        return _gate_failed(spec, status, now, kind, label, noted)
    # confirm-traffic-increase, confirm-promotion: the next tick moves on once open
    if status.stage != "Progressing" or event.step != status.step:
        return Outcome(status, noted)
    if opened and kind not in status.gates_open:
        status = status.model_copy(update={"gates_open": (*status.gates_open, kind)})
    return Outcome(status, noted)


def _gate_failed(
    spec: RolloutSpec,
    status: RolloutStatus,
    now: float,
    kind: str,
    label: str,
    noted: tuple[Action, ...],
) -> Outcome:
    """A failed pre-rollout/rollout call: counted; reaching the threshold rolls back."""
    failures = status.gate_failures + 1
    threshold = spec.gate_failure_threshold
    status = status.model_copy(update={"gate_failures": failures})
    if failures >= threshold:
        return _roll_back(
            status,
            now,
            f"the {kind} gate failed {failures} times (threshold {threshold}): {label}",
            extra=noted,
        )
    message = (
        f"the {kind} gate failed ({label}): {failures} of {threshold} failures before a rollback"
    )
    return Outcome(status.model_copy(update={"message": message}), noted)
