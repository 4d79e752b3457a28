"""File-backed adapters: the record as JSON lines, the status as one JSON file.

Used by static targets and cross-cluster rollouts. Record writes append and flush one whole
line at a time in a worker thread, under a lock, so a crash or a cancellation leaves whole
lines only; a line cut short by a full disk is cut off before the next append (the file is
truncated to its last whole line), so an entry is never glued to a torn one. The status is
replaced atomically (write, then rename): a crash leaves the old status or the new one. A lock
file beside the status (flock, held for the process's life) makes one process the rollout's
only controller; it names the holder for the next one to quote.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from canary.core.fields import unknown_fields
from canary.core.inputs import clip
from canary.core.records import Entry, TickEntry, dump_entry, read_record
from canary.core.rollout import RolloutStatus
from canary.executors import run_blocking
from canary.runner.seams import SavedRollout, StateLocked

__all__ = ["FileRecord", "FileRecords", "FileStateStore", "RecordWriter", "cut_torn_tail"]

log = logging.getLogger("canary.runner.files")

# The state file's keys (FileStateStore.save): a file holding others was written by a newer
# canary, and those are named when it is read.
_SAVED_KEYS = frozenset({"rollout", "record", "started_at", "status"})


def cut_torn_tail(path: Path) -> int:
    """Truncate `path` after its last newline (a line a full disk cut short); the bytes cut."""
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        return size - keep


class RecordWriter:
    """Appends entries to one JSON-lines record, a whole flushed line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # a cancelled await still lets its thread finish
        self._check_tail = True  # before the first append, and after any failed one

    def _append(self, line: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._check_tail and self.path.exists():
                cut = cut_torn_tail(self.path)
                if cut:
                    log.warning("%s: cut a torn last line of %d bytes", self.path, cut)
            self._check_tail = False
            try:
                with self.path.open("ab") as handle:
                    self._write(handle, (line + "\n").encode("utf-8"))
                    handle.flush()
            except OSError:
                self._check_tail = True  # part of the line may be on disk
                raise

    def _write(self, handle: Any, data: bytes) -> None:
        handle.write(data)

    async def append(self, entry: Entry) -> None:
        await run_blocking("files", self._append, dump_entry(entry))


class FileRecord:
    """A RecordSink on one JSON-lines file: every entry is stored as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = RecordWriter(path)
        self.data_through: float | None = None

    @property
    def ref(self) -> str:
        return str(self.path)

    @property
    def label(self) -> str:
        return str(self.path)

    async def append(self, entry: Entry) -> None:
        await self._writer.append(entry)
        if isinstance(entry, TickEntry) and entry.verdict is not None:
            self.data_through = entry.at

    async def flush(self, *, force: bool = False) -> bool:
        return False  # every append is stored already

    async def read(self) -> list[Entry]:
        return await run_blocking("files", read_record, self.path)


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
        self._lock_fd: int | None = None

    def __str__(self) -> str:
        return str(self.path)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _acquire_blocking(self) -> None:
        if self._lock_fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise StateLocked(
                f"{self.path} is in use by {holder} (lock {self.lock_path}): one controller "
                "per rollout"
            ) from None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {when}\n".encode())
        self._lock_fd = fd

    async def acquire(self) -> None:
        """Hold the rollout's lock until release() (or the process ends); StateLocked if
        another process holds it."""
        self._acquire_blocking()

    async def release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing drops the flock; the file stays for the next holder

    def _load_blocking(self) -> SavedRollout | None:
        if not self.resume or not self.path.exists():
            return None
        saved = json.loads(self.path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError(f"not a JSON object but {type(saved).__name__}")
        for key in ("rollout", "record", "status"):
            if key not in saved:
                raise ValueError(f"no {key!r} key")
        status = RolloutStatus.model_validate(saved["status"])
        # A newer canary's fields are set aside (a downgrade carries the rollout on), named.
        unknown = [k for k in saved if k not in _SAVED_KEYS]
        unknown += unknown_fields(RolloutStatus, saved["status"], prefix="status.")
        if unknown:
            log.warning(
                "%s: the saved state has fields this canary does not know, ignored (written "
                "by a newer version?): %s",
                self.path,
                ", ".join(clip(k, 100) for k in unknown[:20]),
            )
        if not status.underway and not status.done:
            return None  # never started: the next run is a new rollout
        return SavedRollout(
            rollout_id=str(saved["rollout"]),
            record=str(saved["record"]),
            started_at=float(saved.get("started_at") or status.started_at or 0.0),
            status=status,
        )

    async def load(self) -> SavedRollout | None:
        return await run_blocking("files", self._load_blocking)

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
        await run_blocking("files", self._save_blocking, text)
        self._written = text
