"""The runner's side of gates: calls in tasks that never hold the tick loop, answers fed back
as Gate events, and a rollout waiting at a start gate resumed after a restart.

Router and metrics are test_runner's in-memory fakes; the gate is an in-memory GateAsker
(GateCaller itself is tested against a real receiver in tests/notify/test_gate_calls.py and
end to end in tests/static and tests/cluster)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_runner import TICK_S, Clock, FakeMetrics, FakeRouter

from analysis import AnalysisConfig, Analyzer
from canary.core.records import NoteEntry, StartEntry, read_record
from canary.core.rollout import Command, Phase, RolloutSpec
from canary.runner import RolloutRunner

pytestmark = pytest.mark.timeout(60)

SPEC = RolloutSpec(
    steps=(5, 50), min_step_s=20, max_step_s=600, no_data_deadline_s=40, gates=("confirm-rollout",)
)


class SlowGate:
    """Answers `answer` after `delay_s` (real seconds); counts calls and concurrent calls."""

    def __init__(self, answer: bool, delay_s: float = 0.0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.closed = False
        self.called = asyncio.Event()

    async def until_called(self, times: int) -> None:
        while self.calls < times:
            self.called.clear()
            await self.called.wait()

    async def ask(
        self, kind: str, *, name: str, namespace: str, phase: str, checksum: str
    ) -> tuple[bool, str]:
        self.calls += 1
        self.called.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        return self.answer, "HTTP 200" if self.answer else "HTTP 403"

    async def aclose(self) -> None:
        self.closed = True


def runner_for(tmp_path: Path, gate: SlowGate, router: FakeRouter) -> RolloutRunner:
    clock = Clock()
    return RolloutRunner(
        name="app",
        spec=SPEC,
        router=router,
        metrics=FakeMetrics(router, clock),
        record_path=tmp_path / "app.jsonl",
        status_path=tmp_path / "app.status.json",
        tick_s=TICK_S,
        analyzer_factory=lambda: Analyzer(AnalysisConfig()),
        canary_version="v2",
        clock=clock,
        gates=gate,
    )


async def test_a_slow_gate_never_holds_the_tick_loop_and_is_called_once_at_a_time(
    tmp_path: Path,
) -> None:
    """A gate that takes 100 ticks to answer: the runner keeps ticking (and answering
    commands) meanwhile, never has two calls of a kind in flight, and an abort works while
    held; the call in flight is cancelled and the gate closed at the end."""
    router = FakeRouter()
    gate = SlowGate(answer=False, delay_s=100 * TICK_S)
    runner = runner_for(tmp_path, gate, router)
    task = asyncio.create_task(runner.run())
    await gate.until_called(2)
    assert runner.status.phase is Phase.INITIALIZING and router.sets == []
    ticks = sum(1 for e in read_record(runner.record_path) if e.kind == "tick")
    assert ticks > 20  # looked on while the gate was being asked (blocked: one per call)
    assert gate.most_in_flight == 1
    gate.delay_s = 10.0  # the next call is still in flight when the rollout ends
    result = await runner.command(Command("abort", "alice", "not today"))
    assert result.accepted
    status = await asyncio.wait_for(task, 10)
    assert status.phase is Phase.FAILED and status.outcome == "aborted"
    assert gate.closed and router.sets == [0]


async def test_waiting_at_a_start_gate_is_resumed_after_a_restart(tmp_path: Path) -> None:
    """A runner stopped while confirm-rollout is closed: the next one resumes the same
    rollout (same record, still waiting), and proceeds once the gate opens."""
    router = FakeRouter()
    gate = SlowGate(answer=False)
    first = runner_for(tmp_path, gate, router)
    task = asyncio.create_task(first.run())
    await gate.until_called(3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert router.sets == []

    gate.answer = True
    second = runner_for(tmp_path, gate, router)
    status = await asyncio.wait_for(second.run(), 30)
    assert status.phase is Phase.SUCCEEDED and router.sets == [5, 50, 100]
    assert second.rollout_id == first.rollout_id
    entries = read_record(second.record_path)
    assert sum(isinstance(e, StartEntry) for e in entries) == 1
    notes = [e.message for e in entries if isinstance(e, NoteEntry)]
    assert any(n.startswith("resumed during Initializing") for n in notes), notes
    assert notes.count("gate confirm-rollout: closed (HTTP 403)") == 1
    assert "gate confirm-rollout: open (HTTP 200)" in notes
