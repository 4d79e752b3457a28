"""The seams between the one rollout runner and the modes that use it.

The runner (canary.runner.runner) is the same for a static target, an annotated Deployment
and a cross-cluster rollout. What differs comes in through these small Protocols, each with
one implementation per mode:

    seam          static target (files)   Kubernetes                  two clusters
    -----------   ---------------------   -------------------------   ---------------------
    TrafficRouter HAProxy runtime API     ingress-nginx, Gateway API  PowerDNS, external-dns
    MetricSource  Prometheus              Prometheus                  both clusters' Prometheus
    StateStore    a JSON file             the status annotation       a JSON file
    RecordOpener  JSON-lines files        one ConfigMap per rollout   JSON-lines files
    Workload      nothing to deploy       app / app-primary           the primary cluster
    Announcer     none                    Kubernetes Events           none (its own Events)
    GateAsker     config `webhooks:` gates  `webhook.<kind>` annotations  (none yet)

Errors at these edges are data for the runner (a failed write is counted, recorded and
shown); only a bug raises through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from canary.core.records import Entry
from canary.core.rollout import RolloutStatus
from canary.metrics.base import MetricSource
from canary.routers.base import TrafficRouter

__all__ = [
    "AnalysisRecord",
    "Announcer",
    "CarryingRecord",
    "GateAsker",
    "MetricSource",
    "NoWorkload",
    "NotActing",
    "RecordOpener",
    "RecordSink",
    "RecordWriteError",
    "ResumeError",
    "SavedHead",
    "SavedRollout",
    "StateLocked",
    "StateStore",
    "StateWriteError",
    "TrafficRouter",
    "Workload",
]


class NotActing(Exception):
    """Raised by a runner's guard: this process may not act on the rollout any more (it lost
    the Lease). The runner stops at once and writes nothing more."""


class StateLocked(Exception):
    """Another controller runs this rollout (it holds the state's lock): refuse to start."""


class ResumeError(Exception):
    """A saved, unfinished rollout exists but cannot be read back: refuse to start rather
    than begin a new rollout silently (`canary run --fresh` starts a new one on purpose)."""


class StateWriteError(Exception):
    """A status could not be saved (an API conflict that would not settle, a full disk): the
    runner holds and tries again at the next look."""


class RecordWriteError(Exception):
    """A record could not be written (disk full, API refused): counted and shown, not fatal."""


@dataclass(frozen=True, slots=True)
class SavedRollout:
    """What a restarted runner needs to carry on: the machine's status and where the record is."""

    rollout_id: str
    record: str  # RecordSink.ref of the rollout's record
    started_at: float
    status: RolloutStatus
    record_error: str = ""  # the last failure to write the record, "" once one succeeds


class StateStore(Protocol):
    """Where the runner's status is persisted, before every action that changes traffic.

    `acquire` makes this process the rollout's only controller until `release` (a file lock;
    in Kubernetes the Lease does it, so there it is a no-op) or raises StateLocked saying
    who holds it."""

    async def acquire(self) -> None: ...

    async def release(self) -> None: ...

    async def load(self) -> SavedRollout | None:
        """The last rollout saved (unfinished: to resume; finished: not to run its revision
        again), or None. Raises ValueError (or OSError) when a saved state exists but cannot
        be read."""

    async def save(self, saved: SavedRollout) -> None:
        """Persist `saved`; raise StateWriteError (or OSError) on failure: the runner then
        carries out nothing of that change and holds."""


class RecordSink(Protocol):
    """One rollout's analysis record."""

    @property
    def ref(self) -> str:
        """Where the record is, as a supervisor finds it again (a path, `namespace/name`)."""

    @property
    def label(self) -> str:
        """Where the record is, for people (`/var/lib/canary/app-….jsonl`, `configmap ns/x`)."""

    async def append(self, entry: Entry) -> None:
        """Add one entry; raise RecordWriteError (or OSError) when it cannot be stored."""

    async def flush(self, *, force: bool = False) -> bool:
        """Store what was appended, if due (a sink may batch); True when it wrote. Raise
        RecordWriteError on failure."""

    @property
    def data_through(self) -> float | None:
        """`at` of the newest tick with a verdict that the store holds (None: none since this
        sink was opened). A resume takes the rollout's last data time from the record's
        ticks, so while this is recent the status need not be saved for it."""

    async def read(self) -> list[Entry]:
        """The entries stored so far (to replay the evidence on resume)."""


@runtime_checkable
class CarryingRecord(Protocol):
    """A RecordSink that saves the metric source's counting state beside the record
    (canary.metrics.base.CarriedCounts), so the next replica counts on from it."""

    def carry_from(self, source: Callable[[], str | None]) -> None:
        """Save what `source` gives with the record's writes."""

    def take_carried(self) -> str | None:
        """The state `read` found with the record, once (None: none)."""


@dataclass(frozen=True, slots=True)
class SavedHead:
    """What a resume needs of a saved record without reading it (AnalysisRecord.read_head)."""

    analysis: str  # the runner's analysis state saved with the last write (_analysis_state)
    tick_at: float | None  # the record's last tick, and its last tick with a verdict
    data_at: float | None
    # The record's latest entries (its head's tail), for the live page's charts: a resumed
    # rollout's charts carry on from them instead of starting empty. Pure CPU (unpacking and
    # parsing, ~2 ms), so a call the runner makes off the event loop, and later than the
    # resume: a shard's takeover resumes hundreds at once. () when they cannot be read.
    recent: Callable[[], tuple[Entry, ...]] | None = None


@runtime_checkable
class AnalysisRecord(Protocol):
    """A RecordSink that saves the runner's analysis state, and where the record ends, with
    each write, so that a resume takes the analysis up instead of reading back and replaying
    the whole record (canary.kubernetes.record_store: ANALYSIS_KEY)."""

    def keep_analysis_with(self, source: Callable[[], str | None]) -> None:
        """Save what `source` gives (as of the entries appended so far) with each write."""

    async def read_head(self) -> SavedHead | None:
        """The saved state, without the record (None: read() it whole). The sink then
        carries on as after read()."""


class RecordOpener(Protocol):
    """Opens the record of a rollout: a new one, or (with `ref`) the one a saved state names."""

    def __call__(self, rollout_id: str, *, ref: str | None = None) -> RecordSink: ...


class Workload(Protocol):
    """What is deployed: the runner asks it to promote the canary and to scale it."""

    async def promote(self, revision: str) -> None:
        """Make `revision` the primary; return once it serves. Raise on failure."""

    async def scale_canary(self, up: bool) -> None:
        """Give the canary its replicas (up) or none. Raise on failure."""


class NoWorkload:
    """Nothing to deploy (static targets): promotion and scaling are no-ops."""

    async def promote(self, revision: str) -> None:
        return None

    async def scale_canary(self, up: bool) -> None:
        return None


class Announcer(Protocol):
    """Who hears of transitions as they happen (Kubernetes Events on the Deployment)."""

    async def announce(
        self, type: Literal["Normal", "Warning"], reason: str, message: str
    ) -> None: ...


class GateAsker(Protocol):
    """Asks a gate webhook (canary.notify.gates.GateCaller). Answers (ok, detail), never
    raises for an edge error; the runner calls it in a task with its own timeout, so a slow
    gate never holds the tick loop. The runner closes it when the rollout ends."""

    async def ask(
        self, kind: str, *, name: str, namespace: str, phase: str, checksum: str
    ) -> tuple[bool, str]: ...

    async def aclose(self) -> None: ...
