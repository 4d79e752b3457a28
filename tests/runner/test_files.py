"""File-backed state and records: one controller per rollout, and records a full disk cannot tear."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_runner import SPEC, make_runner, stopped_at_step

from canary.core.records import RecordError, TickEntry, read_record
from canary.core.rollout import Phase
from canary.metrics.base import MetricsResult
from canary.reports import build_report, render_html, render_markdown
from canary.runner import Controller, FileStateStore, RecordWriter, ResumeError, StateLocked
from canary.runner.files import cut_torn_tail
from canary.runner.seams import SavedRollout

ROOT = Path(__file__).resolve().parents[2]


def test_a_torn_last_line_is_cut_back_to_the_last_whole_line(tmp_path: Path) -> None:
    """Only the bytes after the last newline go; whole lines and empty files are left alone."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    assert cut_torn_tail(path) == 5 and path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert cut_torn_tail(path) == 0 and path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    path.write_bytes(b"no newline at all")
    assert cut_torn_tail(path) == 17 and path.read_bytes() == b""
    assert cut_torn_tail(path) == 0


async def test_a_full_disk_mid_line_leaves_a_readable_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that stops half-way (ENOSPC) is counted and shown; the next append cuts the
    torn half first, so the rollout carries on, the record reads back whole, and its report
    builds. (Before: the next entry was glued to the torn one and the record was unreadable.)"""
    writes = 0
    original = RecordWriter._write

    def flaky(self: RecordWriter, handle: Any, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes in (6, 7):
            handle.write(data[: len(data) // 2])
            handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, handle, data)

    monkeypatch.setattr(RecordWriter, "_write", flaky)
    runner, _, _ = make_runner(tmp_path)
    statuses = await Controller([runner]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED
    assert runner.record_error == ""  # cleared by the appends that worked afterwards
    entries = read_record(runner.record_path)
    assert sum(isinstance(e, TickEntry) for e in entries) >= 10
    text = runner.record_path.read_text()
    assert text.endswith("\n") and all(line.startswith("{") for line in text.splitlines())
    build_report([json.loads(line) for line in text.splitlines()])


def test_a_glued_line_is_what_the_cut_prevents(tmp_path: Path) -> None:
    """The failure mode itself: a torn line followed by a whole one is an unreadable record."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"kind":"no')  # torn by a full disk
    with path.open("a") as handle:  # appended without the cut
        handle.write('{"kind":"note"}\n{"kind":"note"}\n')
    with pytest.raises(RecordError):
        read_record(path)


async def test_a_second_controller_on_the_same_rollout_is_refused(tmp_path: Path) -> None:
    """Two runners on one status file: the second cannot take the lock and says who holds
    it; once the first is done, the lock is free again."""
    first, _, _ = make_runner(tmp_path)
    first.status_path = tmp_path / "app.status.json"
    await first.prepare()
    second, _, _ = make_runner(tmp_path)
    second.status_path = first.status_path
    with pytest.raises(StateLocked, match=rf"pid {os.getpid()} on "):
        await second.prepare()
    statuses = await Controller([first]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED
    third = FileStateStore(first.status_path)
    await third.acquire()
    await third.release()


def test_canary_run_refuses_a_target_another_process_runs(tmp_path: Path) -> None:
    """`canary run` on a target whose lock another process holds exits 2 naming the holder,
    before it touches HAProxy (the socket here does not even exist)."""
    config = tmp_path / "rollout.yaml"
    text = (ROOT / "examples" / "rollout.yaml").read_text()
    config.write_text(text.replace("record_dir: records", f"record_dir: {tmp_path / 'records'}"))
    store = FileStateStore(tmp_path / "records" / "checkout.status.json")
    store._acquire_blocking()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "canary",
                "run",
                "--config",
                str(config),
                "--listen",
                "127.0.0.1:0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
    finally:
        os.close(store._lock_fd)  # type: ignore[arg-type]
    assert result.returncode == 2, result.stderr
    assert (
        f"in use by pid {os.getpid()}" in result.stderr
        and "one controller per rollout" in result.stderr
    )
    assert not list((tmp_path / "records").glob("*.jsonl"))


async def test_a_saved_rollout_whose_record_is_unreadable_refuses_to_start(tmp_path: Path) -> None:
    """A restart whose saved rollout points at a record that cannot be read is a loud error
    naming the record, before anything moves, and the record is left as it was for people to
    look at (never a silent new rollout)."""
    first, _, _ = await stopped_at_step(
        tmp_path, 1, spec=SPEC.model_copy(update={"steps": (5, 10)})
    )
    broken = first.record_path.read_text().replace("\n", "", 1)  # two lines glued together
    first.record_path.write_text(broken)

    again, router, _ = make_runner(tmp_path)
    again.status_path = first.status_path
    with pytest.raises(ResumeError, match=r"app\.jsonl cannot be read"):
        await again.run()
    assert router.sets == [] and first.record_path.read_text() == broken


async def test_a_state_file_a_newer_canary_wrote_resumes_and_names_what_it_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Static mode after a downgrade: the state file holds fields this canary does not know
    (at the top and inside the status). The rollout resumes where it was, not over, and a
    warning names each of those fields; one without its status is refused by the key's name,
    with nothing moved."""
    first, _, _ = await stopped_at_step(
        tmp_path, 1, spec=SPEC.model_copy(update={"steps": (5, 10)})
    )
    saved = json.loads(first.status_path.read_text())
    step = saved["status"]["step"]
    saved["shard"] = 3
    saved["status"]["surge"] = {"max": 2}
    saved["status"]["history"][0]["why"] = "newer"
    first.status_path.write_text(json.dumps(saved))

    loaded = await FileStateStore(first.status_path).load()
    assert loaded is not None and loaded.status.step == step
    assert loaded.rollout_id == saved["rollout"]
    named = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(named) == 1, named
    assert named[0].endswith("shard, status.history[0].why, status.surge"), named

    del saved["status"]
    first.status_path.write_text(json.dumps(saved))
    again, router, _ = make_runner(tmp_path)
    again.status_path = first.status_path
    with pytest.raises(ResumeError, match=r"status\.json: no 'status' key"):
        await again.run()
    assert router.sets == []


class FullDiskStore(FileStateStore):
    """A status file on a disk that fills up: saves raise ENOSPC while `full`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.full = False
        self.failed = 0
        self.many_failed = asyncio.Event()

    async def save(self, saved: SavedRollout) -> None:
        if self.full:
            self.failed += 1
            if self.failed >= 20:  # many looks, each deciding to step on, none saved
                self.many_failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().save(saved)


async def test_an_unsaved_status_is_not_carried_out_and_a_restart_moves_nothing_back(
    tmp_path: Path,
) -> None:
    """Write-ahead or nothing: with the status file's disk full, no step is taken (the
    rollout holds at its weight and says why); a restart then resumes exactly there, and
    once the disk has room the rollout goes on. Over both runs the canary's weight only
    grows. (Before: the steps went on unsaved, and the restart sent traffic back.)"""
    status_path = tmp_path / "app.status.json"
    first, router, metrics = make_runner(tmp_path)
    store = FullDiskStore(status_path)
    first.store = store
    original = metrics.fetch
    looks = 0

    async def fill_the_disk(*, since: float, now: float) -> MetricsResult:
        nonlocal looks
        looks += 1
        if first.status.step == 1 and first.status.weight_verified:
            store.full = True
        return await original(since=since, now=now)

    metrics.fetch = fill_the_disk  # type: ignore[method-assign]
    controller = Controller([first])
    task = asyncio.create_task(controller.run())
    waiter = asyncio.create_task(store.many_failed.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert store.many_failed.is_set(), f"went on unsaved: {router.sets}"
    assert first.status.step == 1 and router.sets == [5, 10]
    assert "No space left" in first.state()["status_error"]
    controller.stop()
    await task

    second, _, _ = make_runner(tmp_path, router=router)
    second.status_path = status_path  # the disk has room again
    statuses = await Controller([second]).run()
    assert statuses["app"].phase is Phase.SUCCEEDED
    assert router.sets == [5, 10, 25, 50, 100], router.sets
    assert router.sets == sorted(router.sets)


async def test_a_stall_between_looks_is_marked_in_the_record_and_the_report(
    tmp_path: Path,
) -> None:
    """When the controller could not look for a while (stalled, suspended, a disk that kept
    it waiting), the record says so at the next look, and the report shows that note."""
    runner, _, metrics = make_runner(tmp_path)
    runner.gap_noted_s = 0.2
    original = metrics.fetch
    looks = 0

    async def stalls_once(*, since: float, now: float) -> MetricsResult:
        nonlocal looks
        looks += 1
        if looks == 3:
            await asyncio.sleep(0.5)  # the stall itself (a condition, not a measurement)
        return await original(since=since, now=now)

    metrics.fetch = stalls_once  # type: ignore[method-assign]
    await Controller([runner]).run()
    text = runner.record_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    gaps = [e for e in lines if e["kind"] == "note" and e["message"].startswith("no look for")]
    assert gaps and all("was stalled or suspended" in g["message"] for g in gaps)
    report = build_report(lines)
    assert any(n.message.startswith("no look for") for n in report.notes)
    assert "no look for" in render_html(report) and "no look for" in render_markdown(report)
