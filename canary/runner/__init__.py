"""The one rollout runner and the seams every mode plugs into.

``RolloutRunner`` drives the pure rollout machine (``canary.core.rollout``) for every mode:
static targets, annotated Deployments and cross-cluster rollouts. What differs between the
modes comes in through the Protocols in ``seams``. May import: ``canary.core``,
``analysis``, ``canary.routers.base``, ``canary.metrics.base``; never a supervisor
(``static``, ``kubernetes``, ``clusters``) or an entry point.
"""

from canary.runner.controller import Controller, run_until_signalled
from canary.runner.files import FileRecord, FileRecords, FileStateStore, RecordWriter
from canary.runner.runner import (
    AnalyzerLike,
    CommandResult,
    RolloutRunner,
    TickReport,
    UnknownRollout,
)
from canary.runner.seams import (
    Announcer,
    MetricSource,
    NotActing,
    NoWorkload,
    RecordOpener,
    RecordSink,
    RecordWriteError,
    ResumeError,
    SavedRollout,
    StateLocked,
    StateStore,
    StateWriteError,
    TrafficRouter,
    Workload,
)
from canary.runner.telemetry import Telemetry

__all__ = [
    "AnalyzerLike",
    "Announcer",
    "CommandResult",
    "Controller",
    "FileRecord",
    "FileRecords",
    "FileStateStore",
    "MetricSource",
    "NoWorkload",
    "NotActing",
    "RecordOpener",
    "RecordSink",
    "RecordWriteError",
    "RecordWriter",
    "ResumeError",
    "RolloutRunner",
    "SavedRollout",
    "StateLocked",
    "StateStore",
    "StateWriteError",
    "Telemetry",
    "TickReport",
    "TrafficRouter",
    "UnknownRollout",
    "Workload",
    "run_until_signalled",
]
