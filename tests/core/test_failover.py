"""The pure failover machine: hysteresis, manual commands, refusals, and resuming from JSON."""

from __future__ import annotations

import random

import pytest

from canary.core.failover import (
    AbortRollout,
    FailoverCommand,
    FailoverPolicy,
    FailoverState,
    Mode,
    Probe,
    Record,
    Refused,
    RevertStandbyCanary,
    SetWeights,
    step,
)

POLICY = FailoverPolicy(failures_to_failover=3, healthy_s_to_failback=60)
AUTO = FailoverPolicy(failures_to_failover=3, healthy_s_to_failback=60, auto_failback=True)
UP = Probe(primary_healthy=True)
DOWN = Probe(primary_healthy=False, detail="connect refused")
LOST = Probe(primary_healthy=None)


def run(
    policy: FailoverPolicy, probes: list[Probe], state: FailoverState | None = None
) -> tuple[FailoverState, list[object]]:
    state = state or FailoverState()
    actions: list[object] = []
    for second, probe in enumerate(probes):
        out = step(policy, state, probe, float(second))
        state = out.state
        actions.extend(out.actions)
    return state, actions


@pytest.mark.parametrize(
    ("probes", "mode"),
    [
        ([DOWN, DOWN], Mode.PRIMARY),
        ([DOWN, DOWN, DOWN], Mode.STANDBY),
        ([DOWN, DOWN, UP, DOWN, DOWN], Mode.PRIMARY),
        ([DOWN, LOST, DOWN, LOST, DOWN], Mode.STANDBY),
        ([LOST] * 20, Mode.PRIMARY),
        ([UP, DOWN, DOWN, LOST, LOST, DOWN], Mode.STANDBY),
    ],
    ids=[
        "two-failures-hold",
        "three-failures-fail-over",
        "health-resets-count",
        "lost-probes-do-not-reset-an-outage",
        "lost-probes-alone-never-fail-over",
        "mixed",
    ],
)
def test_failover_needs_consecutive_failures(probes: list[Probe], mode: Mode) -> None:
    """N consecutive failed probes fail over; a healthy probe resets the count, a lost one does not."""
    state, _ = run(POLICY, probes)
    assert state.mode is mode


def test_failover_moves_all_weight_and_records_why() -> None:
    """The move to the standby emits the weight change and a record naming the probe detail."""
    _, actions = run(POLICY, [DOWN, DOWN, DOWN])
    assert SetWeights(Mode.STANDBY) in actions
    records = [a for a in actions if isinstance(a, Record) and a.direction == "to-standby"]
    assert (
        len(records) == 1
        and "connect refused" in records[0].reason
        and records[0].who == "controller"
    )


def test_no_failover_to_an_unhealthy_standby() -> None:
    """With both sides down, traffic stays and a warning says why."""
    down_both = Probe(primary_healthy=False, standby_healthy=False, detail="timeout")
    state, actions = run(POLICY, [down_both] * 4)
    assert state.mode is Mode.PRIMARY
    assert not any(isinstance(a, SetWeights) for a in actions)
    assert any(
        isinstance(a, Record) and a.warning and "standby is unhealthy" in a.reason for a in actions
    )


@pytest.mark.parametrize(
    ("policy", "healthy_seconds", "mode"),
    [(POLICY, 120, Mode.STANDBY), (AUTO, 30, Mode.STANDBY), (AUTO, 62, Mode.PRIMARY)],
    ids=["manual-failback-by-default", "auto-waits-for-hysteresis", "auto-after-hysteresis"],
)
def test_failback(policy: FailoverPolicy, healthy_seconds: int, mode: Mode) -> None:
    """Automatic failback only when enabled and after M seconds of unbroken health."""
    state, _ = run(policy, [DOWN, DOWN, DOWN] + [UP] * healthy_seconds)
    assert state.mode is mode


def test_flapping_primary_never_fails_back_early() -> None:
    """One failed probe restarts the healthy period that failback needs."""
    probes = [DOWN] * 3 + ([UP] * 50 + [DOWN]) * 5
    state, _ = run(AUTO, probes)
    assert state.mode is Mode.STANDBY


@pytest.mark.parametrize("seed", range(20))
def test_random_probe_loss_does_not_flap(seed: int) -> None:
    """A healthy primary whose probes are lost at random (30%) never fails over."""
    rng = random.Random(seed)
    probes = [LOST if rng.random() < 0.3 else UP for _ in range(2000)]
    state, actions = run(AUTO, probes)
    assert state.mode is Mode.PRIMARY
    assert not any(isinstance(a, SetWeights) for a in actions)


def test_random_probe_loss_during_outage_still_fails_over() -> None:
    """Lost probes during a real outage delay the failover but never prevent it."""
    rng = random.Random(7)
    probes = [LOST if rng.random() < 0.3 else DOWN for _ in range(30)]
    state, _ = run(POLICY, probes)
    assert state.mode is Mode.STANDBY


def test_manual_failover_is_idempotent_and_recorded() -> None:
    """A second manual failover changes nothing and says so; both are recorded with who/why."""
    cmd = FailoverCommand(to=Mode.STANDBY, who="alice", reason="primary maintenance")
    first = step(POLICY, FailoverState(), cmd, 10.0)
    assert first.state.mode is Mode.STANDBY and first.state.pinned_by == "alice"
    assert SetWeights(Mode.STANDBY) in first.actions
    second = step(POLICY, first.state, cmd, 11.0)
    assert second.state == first.state
    assert not any(isinstance(a, SetWeights) for a in second.actions)
    assert any(
        isinstance(a, Record) and "nothing changed" in a.reason and a.who == "alice"
        for a in second.actions
    )


def test_manual_failover_pins_against_auto_failback() -> None:
    """Automatic failback never undoes a human's failover."""
    state = step(AUTO, FailoverState(), FailoverCommand(Mode.STANDBY, "alice", "drill"), 0.0).state
    state, _ = run(AUTO, [UP] * 500, state)
    assert state.mode is Mode.STANDBY


def test_refuses_unhealthy_target_unless_forced() -> None:
    """Failover to an unhealthy standby is refused; --force overrides and is recorded as forced."""
    sick = FailoverState(standby_healthy=False)
    cmd = FailoverCommand(to=Mode.STANDBY, who="bob", reason="test")
    refused = step(POLICY, sick, cmd, 0.0)
    assert refused.state == sick and isinstance(refused.actions[0], Refused)
    assert "unhealthy" in refused.actions[0].reason and "--force" in refused.actions[0].reason
    forced = step(POLICY, sick, FailoverCommand(Mode.STANDBY, "bob", "test", force=True), 0.0)
    assert forced.state.mode is Mode.STANDBY
    assert any(isinstance(a, Record) and a.forced for a in forced.actions)


def test_failback_refused_while_primary_unhealthy() -> None:
    """`canary failback` is refused while the primary is still failing its probes."""
    state, _ = run(POLICY, [DOWN] * 3)
    out = step(POLICY, state, FailoverCommand(Mode.PRIMARY, "carol", "looks fixed"), 5.0)
    assert out.state.mode is Mode.STANDBY and isinstance(out.actions[0], Refused)
    state, _ = run(POLICY, [DOWN] * 3 + [UP])
    back = step(POLICY, state, FailoverCommand(Mode.PRIMARY, "carol", "fixed"), 5.0)
    assert back.state.mode is Mode.PRIMARY and back.state.pinned_by is None
    assert SetWeights(Mode.PRIMARY) in back.actions


@pytest.mark.parametrize(
    ("canary_on_standby", "expected"),
    [
        ("serve", [AbortRollout, Record, SetWeights, Record]),
        ("revert-first", [AbortRollout, RevertStandbyCanary, SetWeights, Record]),
    ],
)
def test_rollout_in_progress_is_aborted(canary_on_standby: str, expected: list[type]) -> None:
    """A failover aborts a running rollout and applies the policy for the canary on the standby."""
    policy = POLICY.model_copy(update={"canary_on_standby": canary_on_standby})
    state = FailoverState(consecutive_failures=2)
    out = step(policy, state, DOWN, 0.0, rollout_active=True)
    assert [type(a) for a in out.actions] == expected


def test_state_survives_a_restart_as_json() -> None:
    """Persisted state resumes exactly: no early failback, no weight flip after a restart."""
    state, _ = run(AUTO, [DOWN] * 3 + [UP] * 30)
    restored = FailoverState.model_validate_json(state.model_dump_json())
    assert restored == state
    out = step(AUTO, restored, UP, 31.0)
    assert out.state.mode is Mode.STANDBY and out.actions == ()
    later = step(AUTO, out.state, UP, 63.0)
    assert later.state.mode is Mode.PRIMARY
