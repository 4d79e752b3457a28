"""The rollout machine's traffic check (spec.traffic_check): each step's canary share of the
analysis' requests against the step before's, for a router that says it moved traffic but
did not. Whole rollouts of ticks carrying cumulative request counts, split as a router really
split them; the router's read-back always says what was wanted."""

from __future__ import annotations

from collections.abc import Callable

from support.machine import run

from analysis import Decision
from canary.core.rollout import (
    Action,
    Emit,
    Finish,
    Phase,
    Promote,
    RolloutSpec,
    RolloutStatus,
    SetWeight,
    Tick,
    step,
)

SPEC = RolloutSpec(steps=(10, 25, 50), min_step_s=60, max_step_s=300, no_data_deadline_s=60)
HOLD = SPEC.model_copy(update={"traffic_check": "hold"})
OFF = SPEC.model_copy(update={"traffic_check": "off"})
PER_TICK = 10_000.0  # requests every 10 s (1,000 a second)


def honest(wanted: int, first: int) -> float:
    """The canary's real share: half the weight (the primary's pods also serve traffic that
    does not pass the router)."""
    return wanted / 200


def drops_writes(wanted: int, first: int) -> float:
    """A router that applied the first step's weight and acknowledges every later write
    without applying it."""
    return first / 200 if wanted else 0.0


def rollout(
    spec: RolloutSpec,
    real: Callable[[int, int], float],
    *,
    until: float = 600.0,
    status: RolloutStatus | None = None,
    requests: tuple[float, float] = (0.0, 0.0),
    start: float = 0.0,
    per_tick: float = PER_TICK,
) -> tuple[RolloutStatus, list[Action], tuple[float, float]]:
    """Passing ticks every 10 s; the router reads back what was wanted."""
    status = status or RolloutStatus(revision="r1")
    actions: list[Action] = []
    canary, primary = requests
    first = spec.steps[0]
    now = start
    while now <= until and not status.done:
        share = real(status.weight, first)
        canary += per_tick * share
        primary += per_tick * (1 - share)
        tick = Tick(Decision.PASS, "ok", weight_read=status.weight, requests=(canary, primary))
        status, done = run(spec, status, [(now, tick)])
        actions.extend(done)
        now += 10.0
    return status, actions, (canary, primary)


def warnings(actions: list[Action]) -> list[str]:
    return [a.message for a in actions if isinstance(a, Emit) and "traffic split" in a.message]


def test_an_honest_router_is_never_warned_about() -> None:
    """Shares at half the weights (traffic the router does not split): promoted, no warning."""
    status, actions, _ = rollout(HOLD, honest)
    assert status.phase is Phase.SUCCEEDED
    assert warnings(actions) == []


def test_warn_says_once_a_step_that_the_split_did_not_follow_and_goes_on() -> None:
    """The default: a warning at 25% and at 50%, each naming both shares, and the rollout
    goes on as before (the check only tells)."""
    assert SPEC.traffic_check == "warn"
    status, actions, _ = rollout(SPEC, drops_writes)
    assert status.phase is Phase.SUCCEEDED
    told = warnings(actions)
    assert len(told) == 2
    assert told[0].startswith("the traffic split did not follow the weight: the canary had 5% ")
    assert "at 25%" in told[0] and "5% at 10%" in told[0] and "at 50%" in told[1]


def test_hold_never_promotes_behind_a_router_that_drops_writes() -> None:
    """`hold`: the step at 25% is held from its first look on, and rolled back at the no-data
    deadline, with the evidence in the reason."""
    status, actions, _ = rollout(HOLD, drops_writes)
    assert status.phase is Phase.FAILED and status.outcome == "rolled_back"
    assert not any(isinstance(a, Promote) for a in actions)
    assert [a.weight for a in actions if isinstance(a, SetWeight)] == [10, 25, 0]
    assert status.reason.startswith("the traffic split did not follow the weight for 60s ")
    assert "(deadline 60s): the canary had 5% of requests at 25%" in status.reason
    finish = [a for a in actions if isinstance(a, Finish)]
    assert [f.outcome for f in finish] == ["rolled_back"]


def test_a_held_step_shows_why_in_its_message() -> None:
    status, _, _ = rollout(HOLD, drops_writes, until=90.0)
    assert status.phase is Phase.PROGRESSING and status.weight == 25
    assert status.message.startswith("holding at 25%: the traffic split did not follow")
    assert status.split_wrong_since is not None


def test_off_does_not_look() -> None:
    status, actions, _ = rollout(OFF, drops_writes)
    assert status.phase is Phase.SUCCEEDED and warnings(actions) == []
    assert status.split_base is None and status.split_before is None


def test_the_check_resumes_from_the_saved_status() -> None:
    """Stopped mid-way through the held step and resumed from its JSON (as a restarted
    controller would), the deadline still counts from the first contradiction."""
    half, _, requests = rollout(HOLD, drops_writes, until=90.0)
    resumed = RolloutStatus.from_json(half.to_json())
    assert resumed == half and resumed.split_wrong_since == 80.0
    status, _, _ = rollout(
        HOLD, drops_writes, status=resumed, requests=requests, start=100.0, until=130.0
    )
    assert status.phase is Phase.PROGRESSING and status.split_wrong_since == 80.0
    status, _, _ = rollout(
        HOLD, drops_writes, status=resumed, requests=requests, start=100.0, until=140.0
    )
    assert status.phase is Phase.FAILED and "for 60s" in status.reason


def test_counts_that_start_again_start_the_step_again() -> None:
    """Counts below the step's base (the analysis' counters reset): the step counts from
    there, with no contradiction drawn from a negative difference."""
    status, _, _ = rollout(HOLD, drops_writes, until=90.0)
    assert status.split_base is not None and status.split_wrong_since is not None
    again = step(
        HOLD, status, Tick(Decision.PASS, "ok", weight_read=25, requests=(1.0, 1.0)), 100.0
    )
    assert again.status.split_base == (1.0, 1.0)
    assert again.status.message.startswith("holding at 25%: the traffic split")  # as it was


def test_a_held_step_goes_on_once_its_split_is_shown_to_follow() -> None:
    """The router starts applying its weights again 20 s into the held step: the hold stays
    while the step's counts are a mix, is let go once they show the split follows the weight
    (not merely once they stop contradicting it), and the rollout is promoted."""
    fixed_at = 100.0
    clock = {"now": 0.0}

    def heals(wanted: int, first: int) -> float:
        return honest(wanted, first) if clock["now"] >= fixed_at else drops_writes(wanted, first)

    status = RolloutStatus(revision="r1")
    canary = primary = 0.0
    held_messages: list[str] = []
    while clock["now"] <= 900 and not status.done:
        share = heals(status.weight, SPEC.steps[0])
        canary += PER_TICK * share
        primary += PER_TICK * (1 - share)
        tick = Tick(Decision.PASS, "ok", weight_read=status.weight, requests=(canary, primary))
        status, _ = run(HOLD, status, [(clock["now"], tick)])
        if status.message.startswith("holding at 25%"):
            held_messages.append(status.message)
        clock["now"] += 10.0
    assert status.phase is Phase.SUCCEEDED
    assert any("not shown to follow it since" in m for m in held_messages)


def test_hold_lets_a_step_pass_only_once_its_split_is_shown_to_have_moved() -> None:
    """An honest router at low traffic (200 requests a look): the analysis passes at 25%
    after min_step_s, but the step waits, saying why, until the split is shown to have moved
    from 10%; `warn` does not wait."""
    held, _, _ = rollout(HOLD, honest, until=150.0, per_tick=200.0)
    warned, _, _ = rollout(SPEC, honest, until=150.0, per_tick=200.0)
    assert held.weight == 25 and held.message.startswith(
        "analysis passed; waiting for the traffic split to be shown to follow 25% (the canary had"
    )
    assert warned.weight == 50
