"""The analysis record: every tick and every decision of one rollout, with its evidence.

One record per rollout, as JSON lines: the first line is a `start` entry, then `tick`,
`transition`, `manual`, `failover`, `note` entries in time order, and an `end` entry once the
rollout is over. Each line is one self-contained JSON object with a `kind` and a `schema`
version, so a record cut short by a crash is still readable up to its last whole line.
Reports (canary/reports/) and `canary report` read only this format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from analysis import ArmCounts, Verdict

__all__ = [
    "SCHEMA_VERSION",
    "EndEntry",
    "Entry",
    "FailoverEntry",
    "ManualEntry",
    "NoteEntry",
    "RecordError",
    "StartEntry",
    "TickEntry",
    "TransitionEntry",
    "dump_entry",
    "parse_lines",
    "read_record",
]

SCHEMA_VERSION = 1


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema")
    at: float  # unix seconds
    rollout: str  # the rollout's id, e.g. "demo/app@3f2a1c"


class StartEntry(_Entry):
    kind: Literal["start"] = "start"
    target: str
    primary_version: str = ""
    canary_version: str = ""
    steps: list[int]
    config: dict[str, Any] = Field(default_factory=dict)  # analysis + step settings in force
    # analysis.planner's estimate at start: {"expected_fail_s": ..., "expected_pass_s": ...}
    plan: dict[str, float | None] = Field(default_factory=dict)


class TickEntry(_Entry):
    """One observation. phase/step/weight_set are the state it was observed in (the weight
    the counts were taken under); the transitions its verdict caused follow it."""

    kind: Literal["tick"] = "tick"
    elapsed_s: float  # since the analysis began
    phase: str
    step: int  # index into steps
    weight_set: int  # canary percent asked of the router
    weight_read: int | None  # what the router reported back (None: unreachable)
    primary: ArmCounts | None  # None when the metrics provider had no data
    canary: ArmCounts | None
    no_data_reason: str | None = None
    verdict: Verdict | None = None
    # measured split, when the caller has one (the demo's load generator does)
    observed_canary_share: float | None = None


class TransitionEntry(_Entry):
    kind: Literal["transition"] = "transition"
    from_phase: str
    to_phase: str
    step: int
    weight: int
    reason: str


class ManualEntry(_Entry):
    kind: Literal["manual"] = "manual"
    command: str  # promote | abort | pause | resume | ...
    who: str
    reason: str = ""


class FailoverEntry(_Entry):
    kind: Literal["failover"] = "failover"
    direction: str  # "to-standby" | "to-primary"
    who: str  # "controller" or a user
    reason: str
    forced: bool = False


class NoteEntry(_Entry):
    kind: Literal["note"] = "note"
    level: Literal["info", "warning"] = "info"
    message: str


class EndEntry(_Entry):
    kind: Literal["end"] = "end"
    outcome: Literal["promoted", "rolled_back", "aborted", "superseded"]
    reason: str
    duration_s: float


Entry = Annotated[
    StartEntry | TickEntry | TransitionEntry | ManualEntry | FailoverEntry | NoteEntry | EndEntry,
    Field(discriminator="kind"),
]
_ENTRY: TypeAdapter[Entry] = TypeAdapter(Entry)


class RecordError(ValueError):
    """A record that cannot be read: says which line and why."""


def dump_entry(entry: _Entry) -> str:
    """One JSON line (no trailing newline). `inf` bucket bounds are written as "+Inf"."""
    return json.dumps(entry.model_dump(mode="json", by_alias=True), separators=(",", ":"))


def parse_lines(lines: Iterable[str], *, source: str = "record") -> Iterator[Entry]:
    """Entries of a record. A cut-off last line is skipped (the writer may have died
    mid-line); any other bad line raises RecordError naming the line."""
    pending: tuple[int, str, Exception] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if pending is not None:
            raise RecordError(f"{source}:{pending[0]}: {pending[2]}")
        try:
            yield _ENTRY.validate_python(json.loads(line))
        except (json.JSONDecodeError, ValidationError) as exc:
            pending = (number, line, exc)
    # a bad *last* line is a torn write; the entries before it stand


def read_record(path: Path) -> list[Entry]:
    """All entries of a record file. Raises RecordError for a missing or empty file."""
    if not path.exists():
        raise RecordError(f"{path}: no such record")
    with path.open(encoding="utf-8") as handle:
        entries = list(parse_lines(handle, source=str(path)))
    if not entries:
        raise RecordError(f"{path}: the record is empty")
    return entries
