"""The analysis record: every tick and every decision of one rollout, with its evidence.

One record per rollout, as JSON lines: the first line is a `start` entry, then `tick`,
`transition`, `manual`, `failover`, `note` entries in time order, and an `end` entry once the
rollout is over. Each line is one self-contained JSON object with a `kind` and a `schema`
version, so a record cut short by a crash is still readable up to its last whole line.
Reports (canary/reports/) and `canary report` read only this format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from analysis import ArmCounts, Verdict
from canary.core.inputs import (
    MAX_RECORD_BYTES,
    MAX_RECORD_LINE_BYTES,
    InputError,
    decode_text,
    excerpt,
    load_json,
)

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
    # NaN and infinities as json.dumps writes them (and json.loads reads them), not null;
    # every model inside an entry says the same (tests/core/test_records_json.py)
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

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
    # the planner's estimate at start (canary.core.advice.Advice.plan, from the expected
    # traffic): {"expected_fail_s": ..., "expected_pass_s": ..., "likely_pass_s": ...}
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
    # The planner's numbers behind an advice note (canary.core.advice.Advice.plan): the
    # reports compare them with what happened. Empty for other notes.
    plan: dict[str, float | None] = Field(default_factory=dict)


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
    """One JSON line (no trailing newline). `inf` bucket bounds are written as "+Inf".
    pydantic's own encoder: a fifth of the time of model_dump + json.dumps (a tick's line,
    ~5 KB, 73 -> 16 us), which every rollout pays every tick (issue 13)."""
    return entry.model_dump_json(by_alias=True)


def _check_version(data: object, *, where: str) -> None:
    """A whole line written by a newer canary is refused, never half-read."""
    if not isinstance(data, dict) or "schema" not in data:
        return  # schema 1 entries may omit it (the default); pydantic checks the rest
    version = data["schema"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise RecordError(
            f"{where}: record schema version {excerpt(version, 40)} is not supported: this "
            f"canary reads version {SCHEMA_VERSION} (a record from a newer canary needs that "
            "canary to read it)"
        )


def parse_lines(lines: Iterable[str], *, source: str = "record") -> Iterator[Entry]:
    """Entries of a record. A cut-off last line is skipped (the writer may have died
    mid-line); any other bad line raises RecordError naming the line, and so does a whole
    line of an unknown schema version, wherever it is."""
    pending: tuple[int, str, Exception] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if pending is not None:
            raise RecordError(f"{source}:{pending[0]}: {pending[2]}")
        if isinstance(line, _Undecodable):  # bad unless it is the (torn) last line
            pending = (number, line, RecordError(line.problem))
            continue
        if len(line) > MAX_RECORD_LINE_BYTES:
            raise RecordError(
                f"{source}:{number}: a line of {len(line)} characters; entries are at most "
                f"{MAX_RECORD_LINE_BYTES}"
            )
        try:
            data = load_json(line, source=f"{source}:{number}")
        except InputError as exc:
            pending = (number, line, RecordError(str(exc).removeprefix(f"{source}:{number}: ")))
            continue
        _check_version(data, where=f"{source}:{number}")
        try:
            entry = _ENTRY.validate_python(data)
        except ValidationError as exc:
            pending = (number, line, _short(exc))
            continue
        except (ValueError, TypeError, OverflowError) as exc:  # a validator's own error
            # (e.g. ArmCounts given a 400-digit integer: OverflowError, found by fuzzing)
            pending = (number, line, RecordError(f"{type(exc).__name__}: {excerpt(str(exc))}"))
            continue
        yield entry
    # a bad *last* line is a torn write; the entries before it stand


def _short(exc: ValidationError) -> Exception:
    """The first problems of a validation error, without the input it quotes in full."""
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}" for e in exc.errors()
    ]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return RecordError(excerpt("; ".join(problems[:3]), 300).strip("'") + more)


def read_record(path: Path) -> list[Entry]:
    """All entries of a record file. Raises RecordError for a missing or empty file."""
    if not path.exists():
        raise RecordError(f"{path}: no such record")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if size > MAX_RECORD_BYTES:
        raise RecordError(f"{path}: the record is larger than {MAX_RECORD_BYTES} bytes")
    try:
        with path.open("rb") as handle:
            entries = list(parse_lines(_text_lines(handle, source=str(path)), source=str(path)))
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not entries:
        raise RecordError(f"{path}: the record is empty")
    return entries


class _Undecodable(str):
    """A line that is not UTF-8 text: an error in the middle of a record, a torn write (a
    character cut in half) at its end."""

    problem: str


def _text_lines(handle: BinaryIO, *, source: str) -> Iterator[str]:
    """Lines of a binary file as text, each read at most MAX_RECORD_LINE_BYTES at a time."""
    number = 0
    while line := handle.readline(MAX_RECORD_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_RECORD_LINE_BYTES:
            raise RecordError(
                f"{source}:{number}: a line longer than {MAX_RECORD_LINE_BYTES} bytes"
            )
        try:
            yield decode_text(line, source=f"{source}:{number}")
        except InputError as exc:
            undecodable = _Undecodable("?")
            undecodable.problem = str(exc).removeprefix(f"{source}:{number}: ")
            yield undecodable
