"""A status that cannot be saved (a full disk) must not let a restart move traffic backwards.

Found by benchmarks/fault_table.py ("disk full, then a restart"): the runner's write-ahead
save (canary/runner/runner.py, `_feed` -> `_save`) logs and counts a failed save, then carries
out the actions anyway. With the status stuck at the first step, the rollout went on to 100%,
and a controller restarted once the disk had room resumed the stale status ("router reports
100% but 20% is wanted: setting it again") and sent 80% of the traffic back to the primary
it had already replaced, then walked the steps again.
"""

from __future__ import annotations

import errno
from pathlib import Path

from test_runner import make_runner

from canary.runner import Controller, RolloutRunner
from canary.runner.files import FileStateStore
from canary.runner.seams import SavedRollout


class FullDiskStore(FileStateStore):
    """Saves the first `room` statuses, then raises ENOSPC as a full disk does."""

    def __init__(self, path: Path, *, room: int) -> None:
        super().__init__(path)
        self.room = room

    async def save(self, saved: SavedRollout) -> None:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1
        await super().save(saved)


async def test_restart_after_unsaved_statuses_never_moves_traffic_back(tmp_path: Path) -> None:
    """Statuses unsaved after the first step, then a restart: the router's weights, over both
    runs, never go down for a healthy canary (no step undone, no promotion undone)."""
    first, router, _ = make_runner(tmp_path)
    status_path = tmp_path / "app.status.json"
    first.store = FullDiskStore(status_path, room=2)  # the start is saved, then the disk fills
    await Controller([first]).run()

    second = RolloutRunner(
        name=first.name,
        spec=first.spec,
        router=router,
        metrics=first.metrics,
        record_path=first.record_path,
        tick_s=first.tick_s,
        analyzer_factory=first.analyzer_factory,
        canary_version="v2",
        clock=first.clock,
        status_path=status_path,  # the disk has room again
    )
    await Controller([second]).run()
    assert router.sets == sorted(router.sets), f"traffic moved back: {router.sets}"
