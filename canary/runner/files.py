"""File-backed adapters: the record as JSON lines, the status as one JSON file.

Used by static targets and cross-cluster rollouts. Record writes append and flush one whole
line at a time in a worker thread, under a lock, so a crash or a cancellation leaves whole
lines only. The status is replaced atomically (write, then rename): a crash leaves the old
status or the new one.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

from canary.core.records import Entry, dump_entry, read_record
from canary.core.rollout import RolloutStatus
from canary.runner.seams import SavedRollout

__all__ = ["FileRecord", "FileRecords", "FileStateStore", "RecordWriter"]


class RecordWriter:
    """Appends entries to one JSON-lines record, a whole flushed line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # a cancelled await still lets its thread finish

    def _append(self, line: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
                handle.flush()

    async def append(self, entry: Entry) -> None:
        await asyncio.to_thread(self._append, dump_entry(entry))


class FileRecord:
    """A RecordSink on one JSON-lines file: every entry is stored as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = RecordWriter(path)

    @property
    def ref(self) -> str:
        return str(self.path)

    @property
    def label(self) -> str:
        return str(self.path)

    async def append(self, entry: Entry) -> None:
        await self._writer.append(entry)

    async def flush(self, *, force: bool = False) -> bool:
        return False  # every append is stored already

    async def read(self) -> list[Entry]:
        return await asyncio.to_thread(read_record, self.path)


class FileRecords:
    """Opens FileRecords: a new rollout gets `path`; a resumed one the file its state names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, rollout_id: str, *, ref: str | None = None) -> FileRecord:
        return FileRecord(Path(ref) if ref else self.path)


class FileStateStore:
    """A StateStore on one JSON file. `resume=False` starts a new rollout whatever is saved."""

    def __init__(self, path: Path, *, resume: bool = True) -> None:
        self.path = path
        self.resume = resume
        self._written = ""

    def __str__(self) -> str:
        return str(self.path)

    def _load_blocking(self) -> SavedRollout | None:
        if not self.resume or not self.path.exists():
            return None
        saved = json.loads(self.path.read_text(encoding="utf-8"))
        status = RolloutStatus.model_validate(saved["status"])
        if not status.active:
            return None  # over (or never started): the next run is a new rollout
        return SavedRollout(
            rollout_id=str(saved["rollout"]),
            record=str(saved["record"]),
            started_at=float(saved.get("started_at") or status.started_at or 0.0),
            status=status,
        )

    async def load(self) -> SavedRollout | None:
        return await asyncio.to_thread(self._load_blocking)

    def _save_blocking(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)  # atomic: a crash leaves the old status or the new one

    async def save(self, saved: SavedRollout) -> None:
        text = json.dumps(
            {
                "rollout": saved.rollout_id,
                "record": saved.record,
                "started_at": saved.started_at,
                "status": json.loads(saved.status.to_json()),
            },
            separators=(",", ":"),
        )
        if text == self._written:
            return  # unchanged: no write
        await asyncio.to_thread(self._save_blocking, text)
        self._written = text
