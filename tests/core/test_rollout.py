"""The pure rollout machine: table tests of every transition, then whole rollouts and resuming."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from analysis import Decision
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
    check_steps,
    step,
)

SPEC = RolloutSpec(steps=(5, 10, 25, 50), min_step_s=30, max_step_s=300, no_data_deadline_s=60)
COPY = SPEC.model_copy(update={"promotion": "copy"})
ENDLESS = SPEC.model_copy(update={"max_step_s": None})

PASS = Tick(Decision.PASS, "all metrics within tolerance")
CONTINUE = Tick(Decision.CONTINUE, "not enough evidence yet")
FAIL = Tick(Decision.FAIL, "errors 3.1x primary")
NODATA = Tick(None, "prometheus unreachable")

INIT = RolloutStatus(revision="r1")
PROG0_NEW = RolloutStatus(
    stage="Progressing",
    revision="r1",
    step=0,
    weight=5,
    weight_verified=False,
    started_at=0,
    analysis_started_at=0,
)
PROG0 = PROG0_NEW.model_copy(
    update={"weight_verified": True, "step_started_at": 0.0, "last_data_at": 0.0}
)
PROG2 = PROG0.model_copy(update={"step": 2, "weight": 25, "step_started_at": 100.0})
LAST = PROG0.model_copy(update={"step": 3, "weight": 50, "step_started_at": 100.0})
PAUSED = PROG0.model_copy(update={"paused_at": 20.0, "paused_by": "alice"})
PAUSED_INIT = INIT.model_copy(update={"paused_at": 0.0, "paused_by": "alice"})
PROMOTING = PROG0.model_copy(
    update={"stage": "Promoting", "weight": 100, "weight_verified": False, "outcome": "promoted"}
)
PROMOTING_OK = PROMOTING.model_copy(update={"weight_verified": True})
PROMOTED_COPY = PROMOTING_OK.model_copy(
    update={"promoted": True, "weight": 0, "weight_verified": False}
)
ROLLING = PROG0.model_copy(
    update={"stage": "RollingBack", "weight": 0, "weight_verified": False, "outcome": "rolled_back"}
)
ABORTING = ROLLING.model_copy(update={"outcome": "aborted"})
SUCCEEDED = PROMOTING_OK.model_copy(update={"stage": "Succeeded", "promoted": True})
FAILED = ROLLING.model_copy(update={"stage": "Failed", "weight_verified": True})


def show(action: Action) -> str:
    """A compact, exact rendering of an action for the tables."""
    match action:
        case SetWeight(weight):
            return f"SetWeight({weight})"
        case RecordTransition(before, after, _, _, _):
            return f"Transition({before}->{after})"
        case RecordManual(command, _, _, accepted):
            return f"Manual({command},{'ok' if accepted else 'refused'})"
        case Emit(level, _):
            return f"Emit({level})"
        case ScaleCanary(up):
            return f"Scale({'up' if up else 'down'})"
        case ResetAnalysis():
            return "Reset"
        case Promote():
            return "Promote"
        case Finish(outcome, _):
            return f"Finish({outcome})"
    raise AssertionError(action)


START = ["Transition(Initializing->Progressing)", "Reset", "Scale(up)", "SetWeight(5)"]
ROLLBACK = ["Emit(warning)", "SetWeight(0)"]

TICKS: list[tuple[str, RolloutSpec, RolloutStatus, Event, float, Phase, list[str]]] = [
    ("first-tick-starts", SPEC, INIT, PASS, 0, Phase.PROGRESSING, START),
    ("paused-before-start-waits", SPEC, PAUSED_INIT, PASS, 5, Phase.PAUSED, []),
    (
        "unverified-weight-is-asked-again",
        SPEC,
        PROG0_NEW,
        PASS,
        100,
        Phase.PROGRESSING,
        ["SetWeight(5)"],
    ),
    ("pass-before-min-step-holds", SPEC, PROG0, PASS, 29, Phase.PROGRESSING, []),
    (
        "pass-after-min-step-advances",
        SPEC,
        PROG0,
        PASS,
        30,
        Phase.PROGRESSING,
        ["Transition(Progressing->Progressing)", "SetWeight(10)"],
    ),
    (
        "pass-at-last-step-promotes",
        SPEC,
        LAST,
        PASS,
        130,
        Phase.PROMOTING,
        ["Transition(Progressing->Promoting)", "SetWeight(100)"],
    ),
    ("continue-before-max-holds", SPEC, PROG0, CONTINUE, 299, Phase.PROGRESSING, []),
    (
        "continue-at-max-rolls-back",
        SPEC,
        PROG0,
        CONTINUE,
        300,
        Phase.ROLLING_BACK,
        ["Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    ("no-max-waits-forever", ENDLESS, PROG0, CONTINUE, 10_000, Phase.PROGRESSING, []),
    (
        "pass-after-max-still-advances",
        SPEC,
        PROG0,
        PASS,
        400,
        Phase.PROGRESSING,
        ["Transition(Progressing->Progressing)", "SetWeight(10)"],
    ),
    (
        "fail-rolls-back",
        SPEC,
        PROG0,
        FAIL,
        1,
        Phase.ROLLING_BACK,
        ["Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    (
        "fail-before-verified-rolls-back",
        SPEC,
        PROG0_NEW,
        FAIL,
        1,
        Phase.ROLLING_BACK,
        ["Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    ("no-data-holds", SPEC, PROG0, NODATA, 59, Phase.PROGRESSING, []),
    (
        "no-data-deadline-rolls-back",
        SPEC,
        PROG0,
        NODATA,
        60,
        Phase.ROLLING_BACK,
        ["Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    (
        "never-any-data-rolls-back-at-deadline",
        SPEC,
        PROG0.model_copy(update={"last_data_at": None}),
        NODATA,
        60,
        Phase.ROLLING_BACK,
        ["Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    (
        "router-error-holds",
        SPEC,
        PROG0,
        Tick(Decision.PASS, "", router_error="socket gone"),
        10,
        Phase.PROGRESSING,
        [],
    ),
    (
        "router-error-blocks-a-step-past-min",
        SPEC,
        PROG0,
        Tick(Decision.PASS, "", router_error="socket gone"),
        40,
        Phase.PROGRESSING,
        [],
    ),
    (
        "router-error-blocks-promotion-at-last-step",
        SPEC,
        LAST,
        Tick(Decision.PASS, "", router_error="socket gone"),
        140,
        Phase.PROGRESSING,
        [],
    ),
    (
        "router-reporting-a-wrong-weight-blocks-a-step",
        SPEC,
        PROG0,
        Tick(Decision.PASS, "", weight_read=0),
        40,
        Phase.PROGRESSING,
        ["Emit(warning)", "SetWeight(5)"],
    ),
    (
        "router-error-holds-promote-until-it-answers",
        SPEC,
        PROMOTING_OK,
        Tick(Decision.PASS, "", router_error="socket gone"),
        40,
        Phase.PROMOTING,
        [],
    ),
    (
        "router-error-while-promoting-rolls-back-at-deadline",
        SPEC,
        PROMOTING.model_copy(update={"router_failing_since": 0.0}),
        Tick(Decision.PASS, "", router_error="socket gone"),
        60,
        Phase.ROLLING_BACK,
        ["Transition(Promoting->RollingBack)", *ROLLBACK],
    ),
    (
        "router-error-deadline-rolls-back",
        SPEC,
        PROG0.model_copy(update={"router_failing_since": 0.0}),
        Tick(Decision.CONTINUE, "", router_error="socket gone"),
        60,
        Phase.ROLLING_BACK,
        ["Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    (
        "weight-that-never-reads-back-hits-deadline",
        SPEC,
        PROG0_NEW.model_copy(update={"router_failing_since": 0.0, "last_data_at": 59.0}),
        Tick(Decision.PASS, "", weight_read=0),
        60,
        Phase.ROLLING_BACK,
        ["Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    (
        "weight-drift-is-corrected",
        SPEC,
        PROG0,
        Tick(Decision.CONTINUE, "", weight_read=50),
        10,
        Phase.PROGRESSING,
        ["Emit(warning)", "SetWeight(5)"],
    ),
    (
        "fail-while-paused-rolls-back",
        SPEC,
        PAUSED,
        FAIL,
        1000,
        Phase.ROLLING_BACK,
        ["Transition(Paused->RollingBack)", *ROLLBACK],
    ),
    ("pass-while-paused-holds", SPEC, PAUSED, PASS, 1000, Phase.PAUSED, []),
    ("no-data-while-paused-holds", SPEC, PAUSED, NODATA, 1000, Phase.PAUSED, []),
    ("promoting-asks-weight-again", SPEC, PROMOTING, PASS, 10, Phase.PROMOTING, ["SetWeight(100)"]),
    ("promoting-asks-promote-again", SPEC, PROMOTING_OK, PASS, 10, Phase.PROMOTING, ["Promote"]),
    (
        "promoting-ignores-fail",
        SPEC,
        PROMOTING_OK.model_copy(update={"promoted": True}),
        FAIL,
        10,
        Phase.PROMOTING,
        [],
    ),
    (
        "rolling-back-asks-zero-again",
        SPEC,
        ROLLING,
        Tick(None, "x", weight_read=5),
        10,
        Phase.ROLLING_BACK,
        ["Emit(warning)", "SetWeight(0)"],
    ),
    ("succeeded-is-final", SPEC, SUCCEEDED, FAIL, 10, Phase.SUCCEEDED, []),
    ("failed-is-final", SPEC, FAILED, PASS, 10, Phase.FAILED, []),
    # answers to actions
    ("verified-starts-step-timer", SPEC, PROG0_NEW, WeightVerified(5), 7, Phase.PROGRESSING, []),
    ("stale-verification-ignored", SPEC, PROG0_NEW, WeightVerified(10), 7, Phase.PROGRESSING, []),
    (
        "failed-set-warns",
        SPEC,
        PROG0_NEW,
        WeightFailed(5, "refused"),
        7,
        Phase.PROGRESSING,
        ["Emit(warning)"],
    ),
    (
        "full-weight-verified-promotes",
        SPEC,
        PROMOTING,
        WeightVerified(100),
        7,
        Phase.PROMOTING,
        ["Promote"],
    ),
    (
        "promote-done-shift-succeeds",
        SPEC,
        PROMOTING_OK,
        PromoteDone(ok=True),
        8,
        Phase.SUCCEEDED,
        ["Transition(Promoting->Succeeded)", "Finish(promoted)"],
    ),
    (
        "promote-done-copy-shifts-back",
        COPY,
        PROMOTING_OK,
        PromoteDone(ok=True),
        8,
        Phase.PROMOTING,
        ["SetWeight(0)"],
    ),
    (
        "copy-back-verified-succeeds",
        COPY,
        PROMOTED_COPY,
        WeightVerified(0),
        9,
        Phase.SUCCEEDED,
        ["Scale(down)", "Transition(Promoting->Succeeded)", "Finish(promoted)"],
    ),
    (
        "promote-failed-warns",
        SPEC,
        PROMOTING_OK,
        PromoteDone(ok=False, error="conflict"),
        8,
        Phase.PROMOTING,
        ["Emit(warning)"],
    ),
    (
        "rollback-verified-fails",
        SPEC,
        ROLLING,
        WeightVerified(0),
        9,
        Phase.FAILED,
        ["Scale(down)", "Transition(RollingBack->Failed)", "Finish(rolled_back)"],
    ),
    (
        "abort-verified-fails-as-aborted",
        SPEC,
        ABORTING,
        WeightVerified(0),
        9,
        Phase.FAILED,
        ["Scale(down)", "Transition(RollingBack->Failed)", "Finish(aborted)"],
    ),
    # new revisions
    (
        "revision-starts-from-initializing",
        SPEC,
        INIT,
        NewRevision("r1"),
        0,
        Phase.PROGRESSING,
        START,
    ),
    ("same-revision-is-ignored", SPEC, PROG2, NewRevision("r1"), 0, Phase.PROGRESSING, []),
    (
        "new-revision-restarts-analysis",
        SPEC,
        PROG2,
        NewRevision("r2"),
        150,
        Phase.PROGRESSING,
        ["Transition(Progressing->Progressing)", "Reset", "Scale(up)", "SetWeight(5)"],
    ),
    (
        "new-revision-unpauses",
        SPEC,
        PAUSED,
        NewRevision("r2"),
        150,
        Phase.PROGRESSING,
        ["Transition(Paused->Progressing)", "Reset", "Scale(up)", "SetWeight(5)"],
    ),
    (
        "new-revision-after-success-starts-over",
        SPEC,
        SUCCEEDED,
        NewRevision("r2"),
        500,
        Phase.PROGRESSING,
        ["Transition(Initializing->Progressing)", "Reset", "Scale(up)", "SetWeight(5)"],
    ),
]


@pytest.mark.parametrize(
    ("spec", "status", "event", "now", "phase", "actions"),
    [case[1:] for case in TICKS],
    ids=[case[0] for case in TICKS],
)
def test_events(
    spec: RolloutSpec,
    status: RolloutStatus,
    event: Event,
    now: float,
    phase: Phase,
    actions: list[str],
) -> None:
    """Each (status, event, time) leads to the expected phase and exactly the expected actions."""
    out = step(spec, status, event, now)
    assert out.status.phase is phase
    assert [show(a) for a in out.actions] == actions


OK = "Manual({},ok)"
NO = "Manual({},refused)"
COMMANDS: list[tuple[str, RolloutStatus, str, Phase, list[str]]] = [
    (
        "init-promote",
        INIT,
        "promote",
        Phase.PROMOTING,
        [OK, "Scale(up)", "Transition(Initializing->Promoting)", "SetWeight(100)"],
    ),
    (
        "init-abort",
        INIT,
        "abort",
        Phase.ROLLING_BACK,
        [OK, "Transition(Initializing->RollingBack)", *ROLLBACK],
    ),
    ("init-pause", INIT, "pause", Phase.PAUSED, [OK, "Transition(Initializing->Paused)"]),
    ("init-resume", INIT, "resume", Phase.INITIALIZING, [NO, "Emit(warning)"]),
    (
        "progressing-promote",
        PROG0,
        "promote",
        Phase.PROMOTING,
        [OK, "Transition(Progressing->Promoting)", "SetWeight(100)"],
    ),
    (
        "progressing-abort",
        PROG0,
        "abort",
        Phase.ROLLING_BACK,
        [OK, "Transition(Progressing->RollingBack)", *ROLLBACK],
    ),
    ("progressing-pause", PROG0, "pause", Phase.PAUSED, [OK, "Transition(Progressing->Paused)"]),
    ("progressing-resume", PROG0, "resume", Phase.PROGRESSING, [NO, "Emit(warning)"]),
    (
        "paused-promote",
        PAUSED,
        "promote",
        Phase.PROMOTING,
        [OK, "Transition(Paused->Promoting)", "SetWeight(100)"],
    ),
    (
        "paused-abort",
        PAUSED,
        "abort",
        Phase.ROLLING_BACK,
        [OK, "Transition(Paused->RollingBack)", *ROLLBACK],
    ),
    ("paused-pause", PAUSED, "pause", Phase.PAUSED, [NO, "Emit(warning)"]),
    ("paused-resume", PAUSED, "resume", Phase.PROGRESSING, [OK, "Transition(Paused->Progressing)"]),
    ("promoting-promote", PROMOTING, "promote", Phase.PROMOTING, [NO, "Emit(warning)"]),
    (
        "promoting-abort",
        PROMOTING,
        "abort",
        Phase.ROLLING_BACK,
        [OK, "Transition(Promoting->RollingBack)", *ROLLBACK],
    ),
    ("promoted-abort", PROMOTED_COPY, "abort", Phase.PROMOTING, [NO, "Emit(warning)"]),
    ("promoting-pause", PROMOTING, "pause", Phase.PROMOTING, [NO, "Emit(warning)"]),
    ("promoting-resume", PROMOTING, "resume", Phase.PROMOTING, [NO, "Emit(warning)"]),
    ("rolling-back-promote", ROLLING, "promote", Phase.ROLLING_BACK, [NO, "Emit(warning)"]),
    ("rolling-back-abort", ROLLING, "abort", Phase.ROLLING_BACK, [NO, "Emit(warning)"]),
    ("rolling-back-pause", ROLLING, "pause", Phase.ROLLING_BACK, [NO, "Emit(warning)"]),
    ("rolling-back-resume", ROLLING, "resume", Phase.ROLLING_BACK, [NO, "Emit(warning)"]),
    *[
        (f"{name}-{command}", status, command, phase, [NO, "Emit(warning)"])
        for name, status, phase in (
            ("succeeded", SUCCEEDED, Phase.SUCCEEDED),
            ("failed", FAILED, Phase.FAILED),
        )
        for command in ("promote", "abort", "pause", "resume")
    ],
]


@pytest.mark.parametrize(
    ("status", "command", "phase", "actions"),
    [case[1:] for case in COMMANDS],
    ids=[case[0] for case in COMMANDS],
)
def test_manual_commands(
    status: RolloutStatus, command: str, phase: Phase, actions: list[str]
) -> None:
    """Every manual command from every phase is accepted or refused, and recorded either way."""
    out = step(SPEC, status, Command(command, "alice", "ticket 42"), 40)  # type: ignore[arg-type]
    assert out.status.phase is phase
    assert [show(a) for a in out.actions] == [a.format(command) for a in actions]
    if phase is Phase.ROLLING_BACK and status.phase is not Phase.ROLLING_BACK:
        assert out.status.outcome == "aborted"


def run(
    spec: RolloutSpec, status: RolloutStatus, events: list[tuple[float, Event]]
) -> tuple[RolloutStatus, list[Action]]:
    """Feed events in order, answering every SetWeight as a router that always works."""
    actions: list[Action] = []
    for now, event in events:
        queue: list[Event] = [event]
        while queue:
            out = step(spec, status, queue.pop(0), now)
            status = out.status
            actions.extend(out.actions)
            for action in out.actions:
                if isinstance(action, SetWeight):
                    queue.append(WeightVerified(action.weight))
                elif isinstance(action, Promote):
                    queue.append(PromoteDone(ok=True))
    return status, actions


def weights(actions: list[Action]) -> list[int]:
    return [a.weight for a in actions if isinstance(a, SetWeight)]


def test_healthy_rollout_walks_every_step_once_then_promotes() -> None:
    """Passing ticks every 10 s take each step once, after min_step_s, then promote at 100%."""
    status, actions = run(SPEC, INIT, [(float(t), PASS) for t in range(0, 200, 10)])
    assert status.phase is Phase.SUCCEEDED
    assert weights(actions) == [5, 10, 25, 50, 100]
    finishes = [a for a in actions if isinstance(a, Finish)]
    assert [f.outcome for f in finishes] == ["promoted"]
    # each step lasted min_step_s (30 s) measured from its verification
    moves = [t.at for t in status.history if t.to_phase in ("Progressing", "Promoting")]
    assert [b - a for a, b in itertools.pairwise(moves)] == [30.0, 30.0, 30.0, 30.0]


def test_copy_promotion_returns_traffic_to_primary_and_scales_down() -> None:
    """Kubernetes-style promotion: 100% to canary, copy the template, back to 0%, scale down."""
    status, actions = run(COPY, INIT, [(float(t), PASS) for t in range(0, 200, 10)])
    assert status.phase is Phase.SUCCEEDED and status.promoted
    assert weights(actions)[-2:] == [100, 0]
    assert [show(a) for a in actions if isinstance(a, ScaleCanary)] == ["Scale(up)", "Scale(down)"]


def test_pause_freezes_step_and_no_data_timers() -> None:
    """Time spent paused counts neither toward min_step_s nor toward the no-data deadline."""
    status, _ = run(
        SPEC, PROG0, [(20, Command("pause", "alice")), (1020, Command("resume", "alice"))]
    )
    assert status.phase is Phase.PROGRESSING
    assert status.step_started_at == 1000.0
    assert step(SPEC, status, NODATA, 1059).status.phase is Phase.PROGRESSING
    assert step(SPEC, status, PASS, 1029).status.step == 0  # only 29 s in the step so far
    assert step(SPEC, status, PASS, 1030).status.step == 1


def test_status_round_trips_through_compact_json_and_resumes_identically() -> None:
    """A status saved mid-step and reloaded continues exactly as one never saved."""
    script: list[tuple[float, Event]] = [(float(t), PASS) for t in range(0, 200, 10)]
    script.insert(5, (41.0, NODATA))
    straight, straight_actions = run(SPEC, INIT, script)
    for cut in range(1, len(script)):
        half, first = run(SPEC, INIT, script[:cut])
        text = half.to_json()
        assert len(text) < 2500 and "\n" not in text
        resumed = RolloutStatus.from_json(text)
        assert resumed == half
        end, second = run(SPEC, resumed, script[cut:])
        assert end == straight
        assert first + second == straight_actions


def test_resumed_controller_reasserts_the_same_weight_without_advancing() -> None:
    """After a restart the first tick re-asks the saved step's weight: no jump, no step twice."""
    saved = RolloutStatus.from_json(PROG2.to_json())
    out = step(SPEC, saved, Tick(Decision.CONTINUE, "", weight_read=0), 110)
    assert [show(a) for a in out.actions] == ["Emit(warning)", "SetWeight(25)"]
    assert out.status.step == 2
    same = step(SPEC, saved, Tick(Decision.CONTINUE, "", weight_read=25), 110)
    assert same.actions == () and same.status.step == 2


def test_rollback_retries_until_the_router_confirms_zero() -> None:
    """A rollback whose SetWeight(0) fails keeps asking on each tick and ends only once verified."""
    out = step(SPEC, PROG0, FAIL, 10)
    status = step(SPEC, out.status, WeightFailed(0, "socket gone"), 10).status
    assert status.phase is Phase.ROLLING_BACK
    again = step(SPEC, status, Tick(None, "x", router_error="socket gone"), 20)
    assert again.actions == ()
    again = step(SPEC, status, Tick(None, "x"), 30)
    assert [show(a) for a in again.actions] == ["SetWeight(0)"]
    done = step(SPEC, again.status, WeightVerified(0), 31)
    assert done.status.phase is Phase.FAILED and done.status.outcome == "rolled_back"
    assert "analysis failed: errors 3.1x primary" in [
        a.reason for a in done.actions if isinstance(a, Finish)
    ]


def test_a_set_that_landed_but_timed_out_is_verified_by_the_next_read() -> None:
    """A SetWeight whose write landed but whose read-back timed out (WeightFailed) leaves the
    weight unverified while the router reads the wanted weight: the next tick's read is the
    verification (no write), so the step's clock starts, and a promotion's or a rollback's
    last weight finishes them. Before, a read that agreed did nothing, and the rollout waited
    "for the router to confirm" for good (45 of 2,000 rollouts in the scale benchmark)."""
    failed = step(SPEC, PROG0_NEW, WeightFailed(5, "TimeoutError"), 7).status
    assert not failed.weight_verified and failed.step_started_at is None
    agrees = step(SPEC, failed, Tick(Decision.CONTINUE, "", weight_read=5), 17)
    assert agrees.actions == ()
    assert agrees.status.weight_verified and agrees.status.step_started_at == 17
    assert agrees.status.last_data_at == 17  # the tick's verdict still counts
    # a read of another weight is not one: set again, as before
    other = step(SPEC, failed, Tick(Decision.CONTINUE, "", weight_read=0), 17)
    assert [show(a) for a in other.actions] == ["Emit(warning)", "SetWeight(5)"]
    assert not other.status.weight_verified

    rolling = step(SPEC, step(SPEC, PROG0, FAIL, 10).status, WeightFailed(0, "Timeout"), 10)
    done = step(SPEC, rolling.status, Tick(None, "x", weight_read=0), 20)
    assert done.status.phase is Phase.FAILED and done.status.outcome == "rolled_back"
    promoting = step(SPEC, PROMOTING, WeightFailed(100, "Timeout"), 7).status
    promote = step(SPEC, promoting, Tick(Decision.PASS, "", weight_read=100), 17)
    assert [show(a) for a in promote.actions] == ["Promote"]


def test_router_deadline_reason_says_what_failed() -> None:
    """A rollback at the router deadline names the error, or the wrong weight it kept reading."""
    failing = PROG0_NEW.model_copy(update={"router_failing_since": 0.0, "last_data_at": 59.0})
    wrong = step(SPEC, failing, Tick(Decision.CONTINUE, "", weight_read=0), 60).status
    assert wrong.reason == "router failing for 60s (deadline 60s): it reports 0% instead of 5%"
    gone = step(SPEC, failing, Tick(Decision.CONTINUE, "", router_error="socket gone"), 60).status
    assert gone.reason == "router failing for 60s (deadline 60s): socket gone"


def test_history_is_truncated_but_status_stays_small() -> None:
    """Many restarts keep only the latest transitions in the persisted status."""
    status = PROG0
    for n in range(40):
        status = step(SPEC, status, NewRevision(f"r{n + 2}"), float(n)).status
    assert len(status.history) == 12
    assert status.history[-1].reason.startswith("new revision r41")


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "at least one step"),
        ([5, 30, 20], "steps[2]: must be greater than 30, got 20"),
        ([0, 10], "steps[0]: must be within 1..99"),
        ([5, 100], "steps[1]: must be within 1..99 (100 is the promotion), got 100"),
        ([5, 5], "steps[1]: must be greater than 5"),
        ([5, 2.5], "steps[1]: must be an integer percentage"),
    ],
)
def test_bad_steps_are_named(steps: list[int], message: str) -> None:
    """Bad step lists raise an error naming the index and the rule."""
    with pytest.raises(ValueError) as info:
        check_steps(steps)
    assert message in str(info.value)


def test_spec_rejects_max_below_min() -> None:
    """max_step_s below min_step_s is rejected with both numbers."""
    with pytest.raises(ValidationError, match=r"at least min_step_s \(60\)"):
        RolloutSpec(min_step_s=60, max_step_s=30)


# ---- invariants over random event sequences ---------------------------------------------------

ALLOWED_WEIGHTS = {0, 100, *SPEC.steps}
_decisions = st.sampled_from([Decision.PASS, Decision.CONTINUE, Decision.FAIL, None])
_weights = st.sampled_from(sorted(ALLOWED_WEIGHTS))
_events = st.one_of(
    st.builds(
        Tick,
        _decisions,
        st.just("r"),
        st.one_of(st.none(), _weights),
        st.one_of(st.none(), st.just("socket gone")),
    ),
    st.builds(
        Command,
        st.sampled_from(["promote", "abort", "pause", "resume"]),
        st.sampled_from(["alice", "bob"]),
    ),
    st.builds(WeightVerified, _weights),
    st.builds(WeightFailed, _weights, st.just("refused")),
    st.builds(PromoteDone, st.booleans()),
    st.builds(NewRevision, st.sampled_from(["r1", "r2"])),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    spec=st.sampled_from([SPEC, COPY, ENDLESS]),
    script=st.lists(st.tuples(st.floats(0, 50), _events), max_size=60),
)
def test_invariants_hold_for_any_event_sequence(
    spec: RolloutSpec, script: list[tuple[float, Event]]
) -> None:
    """Whatever happens: weights are only 0, a step or 100; steps advance one at a time;
    an ended rollout stays ended until a new revision; the status survives JSON."""
    status, now = INIT, 0.0
    finished = 0
    for gap, event in script:
        now += gap
        before = status
        out = step(spec, status, event, now)
        status = out.status
        assert status.weight in ALLOWED_WEIGHTS
        for action in out.actions:
            if isinstance(action, SetWeight):
                assert action.weight in ALLOWED_WEIGHTS
                assert action.weight == status.weight  # only ever asks for what it wants
            if isinstance(action, Promote):
                assert status.stage == "Promoting" and status.weight == 100
            if isinstance(action, Finish):
                finished += 1
                assert status.done
        if isinstance(event, NewRevision):
            finished = 0
            continue
        assert finished <= 1
        if before.done:
            assert status.phase is before.phase
            assert not any(isinstance(a, SetWeight | Finish) for a in out.actions)
        if before.stage == "Progressing" and status.stage == "Progressing":
            assert before.step <= status.step <= before.step + 1
            assert status.weight == spec.steps[status.step]
        if status.stage == "Progressing" and status.step > before.step:
            assert (
                before.step_started_at is not None
                and now - before.step_started_at >= spec.min_step_s
            )
        assert RolloutStatus.from_json(status.to_json()) == status
