"""A saved status must never name a record that holds no start entry yet.

Found by benchmarks/kill_campaign.py --mode kubernetes (run 9 of seed 11): a controller
SIGKILLed just after a new rollout's first status save left the status annotation naming a
record ConfigMap that was never created, because the runner (canary/runner/runner.py,
`_run`: `_write(start entry)` then `_feed(NewRevision)`, whose write-ahead `_save` comes
before `_flush_record`) saves the status before a batching record sink has stored the start
entry. The restarted controller could not read the record (404: "analysis restarts from
Prometheus"), and every later write of it failed ("a record to store must begin with its
start entry"): the whole rollout went unrecorded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

from test_runner import make_runner

from canary.core.records import Entry, StartEntry, TickEntry, read_record
from canary.runner import Controller
from canary.runner.seams import SavedRollout


class BatchedRecord:
    """A RecordSink that stores entries only on flush, like the record ConfigMap."""

    def __init__(self, stored: list[Entry]) -> None:
        self.pending: list[Entry] = []
        self.stored = stored

    ref = "ns/record"
    label = "configmap ns/record"

    async def append(self, entry: Entry) -> None:
        self.pending.append(entry)

    async def flush(self, *, force: bool = False) -> bool:
        wrote = bool(self.pending)
        self.stored.extend(self.pending)
        self.pending.clear()
        return wrote

    @property
    def data_through(self) -> float | None:
        return max(
            (e.at for e in self.stored if isinstance(e, TickEntry) and e.verdict is not None),
            default=None,
        )

    async def read(self) -> list[Entry]:
        return list(self.stored)


class WatchingStore:
    """A StateStore noting, at each save, whether the named record holds its start entry."""

    def __init__(self, stored: list[Entry]) -> None:
        self.stored = stored
        self.saves: list[tuple[str, bool]] = []

    async def acquire(self) -> None: ...

    async def release(self) -> None: ...

    async def load(self) -> SavedRollout | None:
        return None

    async def save(self, saved: SavedRollout) -> None:
        has_start = any(isinstance(e, StartEntry) for e in self.stored)
        self.saves.append((saved.status.stage, has_start))


async def test_every_saved_status_names_a_record_with_its_start(tmp_path: Path) -> None:
    """From the first save on, a SIGKILL at any save leaves a record a restart can read."""
    runner, _, _ = make_runner(tmp_path)
    stored: list[Entry] = []
    runner.records = lambda rollout_id, *, ref=None: BatchedRecord(stored)
    store = WatchingStore(stored)
    runner.store = store
    await Controller([runner]).run()
    assert store.saves
    unstarted = [stage for stage, has_start in store.saves if not has_start]
    assert not unstarted, f"statuses saved before the record held its start: {unstarted}"


async def test_a_resumed_rollout_whose_record_was_lost_records_again(tmp_path: Path) -> None:
    """A saved, unfinished rollout whose record is gone (a deleted ConfigMap reads as
    nothing) starts the record again with a start entry and says so, instead of failing
    every later write: the rest of the rollout is recorded."""
    first, _, _ = make_runner(tmp_path)
    stored: list[Entry] = []
    saved: list[SavedRollout] = []

    class Keeping(WatchingStore):
        async def save(self, state: SavedRollout) -> None:
            saved.append(state)

        async def load(self) -> SavedRollout | None:
            return next((s for s in reversed(saved) if s.status.step == 1), None)

    first.records = lambda rollout_id, *, ref=None: BatchedRecord(stored)
    first.store = Keeping(stored)
    await Controller([first]).run()

    lost: list[Entry] = []
    second, _, _ = make_runner(tmp_path)
    second.records = lambda rollout_id, *, ref=None: BatchedRecord(lost)
    second.store = Keeping(lost)
    await Controller([second]).run()
    assert isinstance(lost[0], StartEntry) and lost[0].rollout == saved[-1].rollout_id
    notes = [e.message for e in lost if e.kind == "note"]  # type: ignore[union-attr]
    assert any("was lost; it starts again here" in n for n in notes), notes
    assert lost[-1].kind == "end"


async def test_the_status_is_saved_when_a_resume_needs_it_not_on_every_tick(
    tmp_path: Path,
) -> None:
    """Issue 13: a tick that changes only the last data time (and the message) is not a save
    (in Kubernetes mode a save is a PATCH and a watch event); those fields are saved at most
    every volatile_save_s of rollout time. Every step, weight and stage change is saved."""
    from test_runner import SPEC

    spec = SPEC.model_copy(update={"min_step_s": 120, "no_data_deadline_s": 600})
    runner, router, _ = make_runner(tmp_path, spec=spec)
    saved: list[SavedRollout] = []

    class Recording(WatchingStore):
        async def save(self, state: SavedRollout) -> None:
            saved.append(state)

    runner.store = Recording([])
    await Controller([runner]).run()
    ticks = [e for e in read_record(runner.record_path) if e.kind == "tick"]
    assert len(saved) < 0.6 * len(ticks), (len(saved), len(ticks))  # every tick: > 1.2
    # every weight the router was asked for was saved first (write-ahead)
    assert {s.status.weight for s in saved} >= set(router.sets) - {100}
    volatile = {"last_data_at": None, "message": "", "last_decision": None}
    for before, after in itertools.pairwise(saved):
        if before.status.model_copy(update=volatile) == after.status.model_copy(update=volatile):
            if before.status.last_data_at is None:
                continue  # the first data: saved at once
            assert after.status.last_data_at is not None
            gap = after.status.last_data_at - before.status.last_data_at
            assert gap >= runner.volatile_save_s, gap


async def test_a_resume_takes_the_last_data_time_from_the_record(tmp_path: Path) -> None:
    """Issue 13: the status saves the last data time only every volatile_save_s (a minute)
    while the record holds it, so a resume takes it from the record's newest tick with data
    when that is newer. Here the saved status says 45 s without data against a 40 s deadline,
    the record 10 s: the resumed rollout holds through a tick without data and goes on, where
    reading the status alone would roll it back."""
    import json

    from test_runner import _again, stopped_at_step

    from canary.core.rollout import Phase

    first, router, metrics = await stopped_at_step(tmp_path, 2)
    assert first.spec.no_data_deadline_s == 40
    recorded = max(
        e.at
        for e in read_record(first.record_path)
        if isinstance(e, TickEntry) and e.verdict is not None
    )
    saved = json.loads(first.status_path.read_text())
    saved["status"]["last_data_at"] = recorded - 35  # a status saved 35 s before that tick
    first.status_path.write_text(json.dumps(saved))
    first.clock.now = recorded + 10  # type: ignore[attr-defined]

    metrics.no_data = True
    second = _again(first, record_path=first.record_path)
    second.observers.append(lambda report: setattr(metrics, "no_data", False))
    statuses = await Controller([second]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED, statuses["app"].reason
    ticks = [e for e in read_record(first.record_path) if isinstance(e, TickEntry)]
    assert any(t.verdict is None and t.at > recorded for t in ticks), "a tick without data"
    assert router.sets[-1] == 100


class SavingTo(WatchingStore):
    """A StateStore keeping every status saved, in order."""

    def __init__(self, saved: list[SavedRollout]) -> None:
        super().__init__([])
        self.saved = saved

    async def save(self, state: SavedRollout) -> None:
        self.saved.append(state)


class FailingRecord(BatchedRecord):
    """A record whose store refuses every write after the start."""

    async def flush(self, *, force: bool = False) -> bool:
        if self.stored:
            from canary.runner.seams import RecordWriteError

            raise RecordWriteError("configmap ns/record: HTTP 500")
        return await super().flush(force=force)


async def test_the_status_carries_the_last_data_time_only_while_the_record_lags(
    tmp_path: Path,
) -> None:
    """With the record storing its ticks, a status that changed only in its volatile fields
    is saved once a minute (volatile_save_s), for `canary status`; with the record failing,
    every quarter of the no-data deadline (30 s here), as a resume then needs it."""
    from test_runner import SPEC

    spec = SPEC.model_copy(update={"min_step_s": 600, "no_data_deadline_s": 120})
    gaps: dict[str, list[float]] = {}
    for case in ("stored", "failing"):
        runner, _, _ = make_runner(tmp_path / case, spec=spec)
        saved: list[SavedRollout] = []
        runner.store = SavingTo(saved)
        if case == "failing":
            kept: list[Entry] = []
            runner.records = lambda rollout_id, *, ref=None: FailingRecord(kept)  # noqa: B023
        await Controller([runner]).run()
        volatile = {"last_data_at": None, "message": "", "last_decision": None}
        gaps[case] = [
            b.status.last_data_at - a.status.last_data_at
            for a, b in itertools.pairwise(saved)
            if a.status.model_copy(update=volatile) == b.status.model_copy(update=volatile)
            and a.status.last_data_at is not None
            and b.status.last_data_at is not None
        ]
    assert runner.volatile_save_s == 60
    assert gaps["stored"] and min(gaps["stored"]) >= 60, gaps["stored"]
    assert gaps["failing"] and 30 <= min(gaps["failing"]) < 60, gaps["failing"]


class CadencedRecord(BatchedRecord):
    """A record stored as the ConfigMap one is: ticks at most every `every_s` of rollout time,
    anything else (a transition, the end) or a forced flush at once. Keeps its write times."""

    def __init__(self, stored: list[Entry], clock: Callable[[], float], every_s: float) -> None:
        super().__init__(stored)
        self.clock, self.every_s = clock, every_s
        self.writes: list[float] = []

    async def flush(self, *, force: bool = False) -> bool:
        now = self.clock()
        last = self.writes[-1] if self.writes else -math.inf
        due = force or now - last >= self.every_s
        if not self.pending or not (due or any(e.kind != "tick" for e in self.pending)):
            return False
        self.writes.append(now)
        return await super().flush(force=force)


async def test_the_record_and_the_status_take_turns_storing_the_last_data_time(
    tmp_path: Path,
) -> None:
    """Issue 13: with a minute between record writes and a minute between volatile status
    saves, the last data time is still stored (in one or the other) within a quarter of the
    no-data deadline (30 s), because whichever is older is written when both lag: two writes
    a minute while a rollout analyses, not three (record every 30 s and status every 60 s)."""
    from test_runner import SPEC

    spec = SPEC.model_copy(
        update={"min_step_s": 1200, "max_step_s": 3600, "no_data_deadline_s": 120}
    )
    runner, _, _ = make_runner(tmp_path, spec=spec)
    saves: list[SavedRollout] = []
    runner.store = SavingTo(saves)
    kept: list[Entry] = []
    record = CadencedRecord(kept, runner.clock, every_s=60)
    runner.records = lambda rollout_id, *, ref=None: record
    stored: list[tuple[float, float]] = []  # (when, the last data time a write stored)
    saved_at: list[float] = []
    real_save, real_flush = runner.store.save, record.flush

    async def save(state: SavedRollout) -> None:
        await real_save(state)
        saved_at.append(runner.clock())
        if state.status.last_data_at is not None:
            stored.append((runner.clock(), state.status.last_data_at))

    async def flush(*, force: bool = False) -> bool:
        wrote = await real_flush(force=force)
        if wrote and record.data_through is not None:
            stored.append((runner.clock(), record.data_through))
        return wrote

    runner.store.save = save  # type: ignore[method-assign]
    record.flush = flush  # type: ignore[method-assign]
    await Controller([runner]).run()

    ticks = [e for e in kept if isinstance(e, TickEntry) and e.verdict is not None]
    assert len(ticks) > 100, len(ticks)
    # By each tick, the stores held the last data time of the one before within 30 s.
    for before, tick in itertools.pairwise(ticks):
        held = max((t for when, t in stored if when <= tick.at), default=None)
        assert held is not None and before.at - held < 30, (before.at, held)
    # While the first step analyses (nothing else to write): about two writes a minute
    # (the fake metrics move the clock 10 s between a tick's look and its decision, so the
    # record's tick is 10 s older than the status' last data time: 2.4 here, 2 when the
    # look and the decision are milliseconds apart); the record every 30 s and the status
    # every minute would be 3.
    first, last = ticks[1].at, ticks[1].at + 900
    assert any(t.at > last for t in ticks)
    writes = [w for w in (*record.writes, *saved_at) if first < w <= last]
    assert len(writes) <= 2.5 * 15, (record.writes, saved_at)
