"""Gates in the pure rollout machine: Flagger's webhook kinds as Gate events, decided here."""

from __future__ import annotations

from analysis import Decision
from canary.core.rollout import (
    CallGate,
    Command,
    Emit,
    Event,
    Gate,
    GateKind,
    NewRevision,
    Outcome,
    Phase,
    Promote,
    PromoteDone,
    RolloutSpec,
    RolloutStatus,
    ScaleCanary,
    SetWeight,
    Tick,
    WeightVerified,
    step,
)


def spec(*gates: GateKind, threshold: int = 3) -> RolloutSpec:
    return RolloutSpec(
        steps=(10, 50),
        min_step_s=10,
        max_step_s=30,
        no_data_deadline_s=60,
        gates=gates,
        gate_failure_threshold=threshold,
    )


class Run:
    """Feeds events at a clock that moves 10 s per tick; answers SetWeight as the router would."""

    def __init__(self, rollout: RolloutSpec) -> None:
        self.spec = rollout
        self.status = RolloutStatus()
        self.now = 1000.0
        self.calls: list[CallGate] = []
        self.sets: list[int] = []
        self.notes: list[str] = []

    def feed(self, event: Event) -> Outcome:
        outcome = step(self.spec, self.status, event, self.now)
        self.status = outcome.status
        for action in outcome.actions:
            if isinstance(action, CallGate):
                self.calls.append(action)
            elif isinstance(action, Emit):
                self.notes.append(action.message)
            elif isinstance(action, Promote):
                self.feed(PromoteDone(ok=True))
            elif isinstance(action, SetWeight):
                self.sets.append(action.weight)
                self.feed(WeightVerified(action.weight))
        return outcome

    def tick(self, decision: Decision | None = Decision.PASS) -> Outcome:
        self.now += 10
        return self.feed(Tick(decision, "r", weight_read=self.status.weight))

    def answer(self, kind: GateKind, result: str, detail: str = "HTTP 403") -> Outcome:
        return self.feed(
            Gate(kind, result, detail, self.status.step, self.status.revision)  # type: ignore[arg-type]
        )

    def asked(self, kind: str) -> int:
        return sum(1 for c in self.calls if c.kind == kind)


def test_no_gates_configured_means_no_gate_is_ever_asked() -> None:
    """Without gates the rollout is exactly as before: no CallGate at all."""
    run = Run(spec())
    run.feed(NewRevision("v2"))
    for _ in range(6):
        run.tick()
    assert run.status.phase is Phase.SUCCEEDED and run.calls == [] and run.sets == [10, 50, 100]


def test_confirm_rollout_holds_with_no_traffic_until_open_then_pre_rollout_then_start() -> None:
    """confirm-rollout closed: Initializing, weight 0, asked again each tick; open: the canary
    is scaled up and pre-rollout asked; its open sets the first step."""
    run = Run(spec("confirm-rollout", "pre-rollout"))
    first = run.feed(NewRevision("v2"))
    assert CallGate("confirm-rollout", 0) in first.actions
    assert ScaleCanary(up=True) not in first.actions
    run.answer("confirm-rollout", "closed")
    for _ in range(5):
        run.tick()
    assert run.status.phase is Phase.INITIALIZING and run.sets == []
    assert run.asked("confirm-rollout") == 6
    assert "confirm-rollout gate" in run.status.message and "HTTP 403" in run.status.message
    assert run.notes.count("gate confirm-rollout: closed (HTTP 403)") == 1  # noted on change
    opened = run.answer("confirm-rollout", "open", "HTTP 200")
    assert ScaleCanary(up=True) in opened.actions and run.asked("pre-rollout") == 1
    assert run.sets == []
    run.answer("pre-rollout", "open", "HTTP 200")
    assert run.status.phase is Phase.PROGRESSING and run.sets == [10]


def test_pre_rollout_failures_reach_the_threshold_and_roll_back_at_zero() -> None:
    """Each failed pre-rollout call counts; at the threshold the rollout rolls back having
    never set a canary weight."""
    run = Run(spec("pre-rollout", threshold=3))
    run.feed(NewRevision("v2"))
    for _ in range(2):
        run.answer("pre-rollout", "failed", "HTTP 500")
        assert run.status.phase is Phase.INITIALIZING
        run.tick()
    run.answer("pre-rollout", "failed", "HTTP 500")
    assert run.status.phase is Phase.FAILED and run.status.outcome == "rolled_back"
    assert "pre-rollout gate failed 3 times (threshold 3)" in run.status.reason
    assert run.sets == [0]


def test_rollout_hook_is_called_each_tick_and_its_failures_roll_back() -> None:
    """The rollout hook is asked on every Progressing tick; failures count across ticks."""
    run = Run(spec("rollout", threshold=2))
    run.feed(NewRevision("v2"))
    run.tick(Decision.CONTINUE)
    run.tick(Decision.CONTINUE)
    assert run.asked("rollout") == 2
    run.answer("rollout", "open", "HTTP 200")
    run.answer("rollout", "failed", "HTTP 500")
    assert run.status.phase is Phase.PROGRESSING and run.status.gate_failures == 1
    run.answer("rollout", "failed", "HTTP 500")
    assert run.status.phase is Phase.FAILED
    assert "rollout gate failed 2 times" in run.status.reason


def test_confirm_traffic_increase_holds_past_max_step_then_advances_when_open() -> None:
    """A passed step waits for confirm-traffic-increase: weight kept, and max_step_s (30s)
    does not roll back a held gate; open moves on at the next tick, and the next step asks
    again (here for confirm-promotion at the last step)."""
    run = Run(spec("confirm-traffic-increase", "confirm-promotion"))
    run.feed(NewRevision("v2"))
    for _ in range(8):  # 80 s at 10%: far past max_step_s
        run.tick()
        run.answer("confirm-traffic-increase", "closed")
    assert run.status.phase is Phase.PROGRESSING and run.sets == [10]
    assert "waiting for the confirm-traffic-increase gate" in run.status.message
    run.answer("confirm-traffic-increase", "open", "HTTP 200")
    run.tick()
    assert run.sets == [10, 50]
    for _ in range(4):
        run.tick()
    assert run.sets == [10, 50] and run.asked("confirm-promotion") >= 2
    run.answer("confirm-promotion", "open", "HTTP 200")
    run.tick()
    assert run.status.phase is Phase.SUCCEEDED and run.sets == [10, 50, 100]


def test_a_failing_analysis_still_rolls_back_while_held_at_a_gate() -> None:
    """Held at confirm-promotion, the analysis keeps running: a fail rolls back."""
    run = Run(spec("confirm-promotion"))
    run.feed(NewRevision("v2"))
    run.tick()
    run.tick()  # 50%
    run.tick()
    run.tick()
    assert run.sets == [10, 50] and run.asked("confirm-promotion") >= 1
    run.tick(Decision.FAIL)
    assert run.status.phase is Phase.FAILED and run.sets == [10, 50, 0]


def test_rollback_gate_polled_while_waiting_and_progressing_and_open_rolls_back() -> None:
    """The rollback gate is polled at each tick while waiting at a gate or Progressing;
    a 2xx rolls back at once; closed answers change nothing."""
    run = Run(spec("confirm-rollout", "rollback"))
    run.feed(NewRevision("v2"))
    run.tick()
    assert run.asked("rollback") == 1
    run.answer("rollback", "closed")
    run.answer("confirm-rollout", "open", "HTTP 200")
    run.tick(Decision.CONTINUE)
    assert run.asked("rollback") == 2 and run.status.phase is Phase.PROGRESSING
    run.answer("rollback", "open", "HTTP 200")
    assert run.status.phase is Phase.FAILED
    assert "rollback gate asked for a rollback" in run.status.reason


def test_manual_promote_and_abort_work_while_held() -> None:
    """A rollout held at confirm-rollout can be promoted or aborted by hand."""
    for command, phase in (("promote", Phase.SUCCEEDED), ("abort", Phase.FAILED)):
        run = Run(spec("confirm-rollout"))
        run.feed(NewRevision("v2"))
        run.feed(Command(command, "alice"))  # type: ignore[arg-type]
        run.tick()
        assert run.status.phase is phase, command


def test_stale_answers_are_ignored() -> None:
    """An answer for another revision or step changes nothing."""
    run = Run(spec("confirm-traffic-increase"))
    run.feed(NewRevision("v2"))
    before = run.status
    run.feed(Gate("confirm-traffic-increase", "open", "HTTP 200", 0, "v1"))
    run.feed(Gate("confirm-traffic-increase", "open", "HTTP 200", 5, "v2"))
    assert run.status.gates_open == before.gates_open == ()


def test_new_revision_resets_gates_and_asks_again_before_traffic() -> None:
    """A new revision mid-rollout sends the canary's weight back to 0 and waits for the start
    gates again; the gate state round-trips through the saved JSON."""
    run = Run(spec("confirm-rollout"))
    run.feed(NewRevision("v2"))
    run.answer("confirm-rollout", "open", "HTTP 200")
    assert run.sets == [10]
    run.feed(NewRevision("v3"))
    assert run.status.phase is Phase.INITIALIZING and run.sets == [10, 0]
    assert run.status.gates_open == () and run.asked("confirm-rollout") == 2
    assert RolloutStatus.from_json(run.status.to_json()) == run.status
