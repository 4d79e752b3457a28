"""The failover machine: when the primary cluster is down, all traffic goes to the standby.

Pure: `step(policy, state, event, now) -> Outcome(state, actions)`, no awaits and no I/O, so
every decision can be table-tested and replayed. The controller feeds it probe results and
manual commands, carries out the actions it returns, and persists `FailoverState` (a frozen
pydantic model that serialises to compact JSON) so that a restart during an outage neither
fails back early nor flips weights.

Hysteresis, as k8gb and every load balancer's health checks do it:
- `failures_to_failover` consecutive unhealthy probes move traffic to the standby. A lost probe
  (no answer from the prober itself) counts as neither health nor failure, so random probe
  loss cannot trigger a failover on its own, and cannot reset a real outage's count either.
- Failing back needs `healthy_s_to_failback` seconds of unbroken health, and happens on its
  own only when `auto_failback` is set; by default an on-call engineer runs `canary failback`.
- A manual failover pins the mode: automatic failback never undoes a human's decision.

Manual commands are idempotent: a second `failover --to standby` changes nothing and says so.
A move to a target that is unhealthy is refused unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from canary.core.inputs import MAX_DURATION_S

__all__ = [
    "AbortRollout",
    "FailoverCommand",
    "FailoverPolicy",
    "FailoverState",
    "Mode",
    "Outcome",
    "Probe",
    "Record",
    "Refused",
    "RevertStandbyCanary",
    "SetWeights",
    "step",
]


class Mode(StrEnum):
    PRIMARY = "primary"  # steady state: primary serves, standby takes its canary slice
    STANDBY = "standby"  # failed over: the standby serves everything


class FailoverPolicy(BaseModel):
    """Failover settings. Defaults: fail over after 3 bad probes, fail back by hand."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    failures_to_failover: int = Field(default=3, ge=1)
    healthy_s_to_failback: float = Field(default=300.0, ge=0, le=MAX_DURATION_S)
    auto_failback: bool = False
    # When the standby was running a canary at failover time: serve it at once, or first
    # revert it to the last promoted version (slower, but users get the known-good build).
    canary_on_standby: Literal["serve", "revert-first"] = "serve"


class FailoverState(BaseModel):
    """Everything needed to resume after a restart. Times are unix seconds."""

    model_config = ConfigDict(frozen=True)

    mode: Mode = Mode.PRIMARY
    consecutive_failures: int = 0
    primary_healthy_since: float | None = None  # start of the current unbroken healthy run
    standby_healthy: bool = True
    pinned_by: str | None = None  # who moved traffic by hand; blocks automatic failback
    changed_at: float | None = None
    changed_by: str | None = None  # who made the last move: "controller" or a person
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Probe:
    """One health observation. `primary_healthy` None means the probe itself was lost."""

    primary_healthy: bool | None
    standby_healthy: bool | None = True
    detail: str = ""


@dataclass(frozen=True, slots=True)
class FailoverCommand:
    to: Mode
    who: str
    reason: str
    force: bool = False


Event = Probe | FailoverCommand


@dataclass(frozen=True, slots=True)
class SetWeights:
    """All traffic to one side (STANDBY), or back to the steady-state weights (PRIMARY)."""

    mode: Mode


@dataclass(frozen=True, slots=True)
class AbortRollout:
    reason: str


@dataclass(frozen=True, slots=True)
class RevertStandbyCanary:
    """Put the standby back on the last promoted version before it serves everything."""

    reason: str


@dataclass(frozen=True, slots=True)
class Record:
    """Something to write to status, Events and the record: who, why, forced or not."""

    direction: Literal["to-standby", "to-primary"] | None
    who: str
    reason: str
    forced: bool = False
    warning: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


Action = SetWeights | AbortRollout | RevertStandbyCanary | Record | Refused


@dataclass(frozen=True, slots=True)
class Outcome:
    state: FailoverState
    actions: tuple[Action, ...] = ()


def step(
    policy: FailoverPolicy,
    state: FailoverState,
    event: Event,
    now: float,
    *,
    rollout_active: bool = False,
) -> Outcome:
    """Advance the machine by one event. `rollout_active` says a canary runs on the standby."""
    if isinstance(event, FailoverCommand):
        return _command(state, event, now, rollout_active=rollout_active, policy=policy)
    return _probe(policy, state, event, now, rollout_active=rollout_active)


def _probe(
    policy: FailoverPolicy, state: FailoverState, probe: Probe, now: float, *, rollout_active: bool
) -> Outcome:
    standby_healthy = (
        state.standby_healthy if probe.standby_healthy is None else probe.standby_healthy
    )
    if probe.primary_healthy is None:  # lost probe: no evidence either way
        return Outcome(state.model_copy(update={"standby_healthy": standby_healthy}))

    if probe.primary_healthy:
        healthy_since = (
            state.primary_healthy_since if state.primary_healthy_since is not None else now
        )
        new = state.model_copy(
            update={
                "consecutive_failures": 0,
                "primary_healthy_since": healthy_since,
                "standby_healthy": standby_healthy,
            }
        )
        if (
            new.mode is Mode.STANDBY
            and policy.auto_failback
            and new.pinned_by is None
            and now - healthy_since >= policy.healthy_s_to_failback
        ):
            reason = f"primary healthy for {now - healthy_since:.0f}s (>= {policy.healthy_s_to_failback:.0f}s)"
            return _move(
                new,
                Mode.PRIMARY,
                "controller",
                reason,
                now,
                forced=False,
                rollout_active=False,
                policy=policy,
            )
        return Outcome(new)

    failures = state.consecutive_failures + 1
    new = state.model_copy(
        update={
            "consecutive_failures": failures,
            "primary_healthy_since": None,
            "standby_healthy": standby_healthy,
        }
    )
    if new.mode is Mode.PRIMARY and failures >= policy.failures_to_failover:
        if not standby_healthy:
            # Nowhere better to send traffic: stay, but say so loudly every time.
            return Outcome(
                new,
                (
                    Record(
                        None,
                        "controller",
                        f"primary down ({probe.detail}) but the standby is unhealthy too: not failing over",
                        warning=True,
                    ),
                ),
            )
        reason = f"primary failed {failures} consecutive probes: {probe.detail}".rstrip(": ")
        return _move(
            new,
            Mode.STANDBY,
            "controller",
            reason,
            now,
            forced=False,
            rollout_active=rollout_active,
            policy=policy,
        )
    return Outcome(new)


def _command(
    state: FailoverState,
    command: FailoverCommand,
    now: float,
    *,
    rollout_active: bool,
    policy: FailoverPolicy,
) -> Outcome:
    if command.to is state.mode:
        note = f"already on {state.mode.value}; nothing changed"
        return Outcome(state, (Record(None, command.who, f"{command.reason} ({note})"),))
    target_healthy = (
        state.standby_healthy
        if command.to is Mode.STANDBY
        else state.primary_healthy_since is not None
    )
    if not target_healthy and not command.force:
        return Outcome(
            state,
            (
                Refused(
                    f"refusing to move traffic to the {command.to.value}: it is unhealthy (use --force to override)"
                ),
            ),
        )
    return _move(
        state,
        command.to,
        command.who,
        command.reason,
        now,
        forced=command.force and not target_healthy,
        rollout_active=rollout_active,
        policy=policy,
    )


def _move(
    state: FailoverState,
    to: Mode,
    who: str,
    reason: str,
    now: float,
    *,
    forced: bool,
    rollout_active: bool,
    policy: FailoverPolicy,
) -> Outcome:
    actions: list[Action] = []
    if to is Mode.STANDBY and rollout_active:
        actions.append(AbortRollout(f"failover to standby: {reason}"))
        if policy.canary_on_standby == "revert-first":
            actions.append(
                RevertStandbyCanary(
                    "the standby was running a canary; reverting it before it serves all traffic"
                )
            )
        else:
            actions.append(
                Record(
                    None,
                    who,
                    "the standby is running the canary version and now serves all traffic (policy: serve)",
                    warning=True,
                )
            )
    actions.append(SetWeights(to))
    direction: Literal["to-standby", "to-primary"] = (
        "to-standby" if to is Mode.STANDBY else "to-primary"
    )
    actions.append(Record(direction, who, reason, forced=forced, warning=to is Mode.STANDBY))
    manual = who != "controller"
    new = state.model_copy(
        update={
            "mode": to,
            "changed_at": now,
            "changed_by": who,
            "reason": reason,
            "consecutive_failures": 0 if to is Mode.PRIMARY else state.consecutive_failures,
            # A human's failover pins the mode; a failback (either way) unpins it.
            "pinned_by": who if manual and to is Mode.STANDBY else None,
        }
    )
    return Outcome(new, tuple(actions))
