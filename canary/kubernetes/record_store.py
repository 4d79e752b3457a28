"""Records in Kubernetes ConfigMaps: written incrementally, in chunks, never held whole.

Why: in a cluster the analysis record must outlive the controller's pod, and ConfigMaps are
the storage the controller already has RBAC for (get, create, update, patch in its own
namespace).

The format (this module's writer). A rollout's record is a head ConfigMap
`canary-record-<rollout>` and sealed chunks `canary-record-<rollout>--00001`, `--00002`, ...
Each chunk holds a gzipped run of whole JSON lines (`SEAL_BYTES` of them and at most one save's
more) and is written once and never again; the head holds the chunk count, the record's id
(which its chunks repeat) and the tail: the lines not yet sealed, gzipped, in `TAIL_KEY` and
in numbered parts after it (`record.tail.0001.jsonl.gz.b64`, ...: one gzip member per save).
A save adds its lines as the next part (a merge patch of one key); every MERGE_MEMBERS parts,
and once the tail reaches `SEAL_BYTES`, it reads the head back (or takes it from the answer
to the last part's write, when nothing was written since) and rewrites it, with the tail
packed again as one member, first creating the next chunk from it when it is due. So:

* the controller holds only the entries added since its last save (deflated), not the
  record nor its tail: memory per rollout stays flat whatever its age;
* a write is at most one chunk and the head, whatever the age: the history is never rewritten;
* crash safety needs no transaction: a chunk is created before the head names it, so a kill
  between the two leaves the old head, which does not name it (a later save overwrites it);
  the head is one object, patched or replaced (guarded by resourceVersion) or not at all,
  and each write carries a token (`WRITE_KEY`) from which a save whose answer was lost
  learns whether it landed: its lines are then neither lost nor written twice;
* the head also keeps the metric source's counting state (`CARRY_KEY`, replaced by each
  write; not part of the record, readers ignore it), so the replica that carries the rollout
  on counts on from it (canary.metrics.batched, "Carried state"); and, when the runner gives
  it, the analysis' state as of the write's last line and an index of where the record ends
  (`ANALYSIS_KEY`, `INDEX_KEY`), so that a resume reads the head alone (`read_head`): no chunk
  is read, no line parsed, nothing replayed;
* chunks and the head carry the label `canary.io/record=<head>`, and chunks an ownerReference
  to the head: deleting the head deletes its chunks (the garbage collector); one `kubectl get
  configmap -l canary.io/record=<head> -o json` dumps a whole record for `canary report`.

We chose immutable chunk objects over appending keys to one ConfigMap for the history: an
update sends (and etcd stores) the whole object, so appending to a ConfigMap approaching 1 MiB
would still write up to 1 MiB per tick. The tail's parts are appended keys, but within
SEAL_BYTES of lines (~30 KiB packed). A bounded window plus a summary would lose the ticks the
report charts.

Records in the older whole format (`record.jsonl.gz.b64`: the whole record, gzipped, thinned
to fit, rewritten on every save; `pack_record` still writes it) are read as before; a resumed
rollout converts its record to chunks at its next save.

Readers are bounded: a chunk's packed text is at most `_MAX_PACKED_CHARS`, and the whole record
at most MAX_UNPACKED_RECORD_BYTES unpacked, however many chunks claim to hold it. A writer whose
record passes `BUDGET_BYTES` keeps one tick every ten minutes from then on, and every tick a
decision follows, so a record stays readable whole (totals are cumulative, so they stay exact).

The packing is pure. `ConfigMapRecordWriter` is the thin adapter that keeps one rollout's
record through `canary.kubernetes.client.Kube` (or anything with its two ConfigMap methods):
it never raises, a failed write comes back as a message for the caller to log and count, and
the next write retries. `canary report` reads a record live (`load_record_configmap`), or a
dump of its ConfigMaps.

Exception tree::

    RecordError (canary.core.records)
    ├── RecordTooLarge      a chunk (or an old whole record) does not fit the limit
    └── (plain)             ConfigMaps that hold no readable record
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import gzip
import json
import logging
import math
import secrets
import time
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from canary.core.inputs import (
    MAX_UNPACKED_RECORD_BYTES,
    InputError,
    decode_text,
    excerpt,
    gunzip_bounded,
    load_json,
)
from canary.core.records import (
    EndEntry,
    Entry,
    NoteEntry,
    RecordError,
    StartEntry,
    TickEntry,
    dump_entry,
    parse_lines,
)
from canary.executors import run_blocking
from canary.runner.seams import RecordWriteError, SavedHead

log = logging.getLogger("canary.kubernetes.record_store")

__all__ = [
    "BUDGET_BYTES",
    "GAP_NOTE_END",
    "MAX_CONFIGMAP_BYTES",
    "RECORD_KEY",
    "RECORD_LABEL",
    "SEAL_BYTES",
    "ConfigMapApi",
    "ConfigMapRecord",
    "ConfigMapRecordWriter",
    "RecordTooLarge",
    "chunk_name",
    "configmap_name",
    "downsample",
    "is_chunked",
    "load_record_configmap",
    "looks_like_configmap",
    "pack_record",
    "read_record_configmap",
    "unpack_record",
]

RECORD_KEY = "record.jsonl.gz.b64"
# 1 MiB is the API server's limit for the whole object; leave room for metadata.
MAX_CONFIGMAP_BYTES = 1_000_000
# What `unpack_record` accepts (a dump read from a file is not held to the API's limit).
_MAX_PACKED_CHARS = 4 * MAX_CONFIGMAP_BYTES

# The chunked format (see the module docstring).
FORMAT_KEY = "record.format"
FORMAT = "chunks/2"  # /1 had no tail parts; both read the same
ID_KEY = "record.id"
CHUNKS_KEY = "record.chunks"
TAIL_KEY = "record.tail.jsonl.gz.b64"
# The tail's later parts, one per save since the head was last rewritten (_part_key): a save
# adds one with a merge patch, so the writer holds none of the tail (it held ~10 KiB a
# rollout on average, issue 13), and sends only its own lines.
_PART_PREFIX, _PART_SUFFIX = "record.tail.", ".jsonl.gz.b64"
MAX_PARTS = 1000  # a hostile head cannot make a reader unpack a million keys
# The token of the save that last wrote the head: a save whose answer was lost finds out
# from it whether it landed (so its lines are neither lost nor written twice).
WRITE_KEY = "record.write"
# The metric source's counting state (canary.metrics.batched: `carry`), saved with each write
# of the head, so the replica that carries the rollout on counts on from it instead of reading
# its series back to the analysis' start. Not part of the record: readers ignore it.
CARRY_KEY = "metrics.state.json.gz.b64"
# The runner's analysis state as of the write's last line (canary.runner: `_analysis_state`;
# "" when it has none to carry), and where the record ends (`_Index`), both with each write of
# the head when the runner gives the state: a resume then reads the head alone, not the
# chunks, and neither parses nor replays the record (issue 13: at an hour of age, reading
# 1,000 records back whole was what held a moved shard's rollouts for minutes).
ANALYSIS_KEY = "analysis.state.json.gz.b64"
INDEX_KEY = "record.index"
CHUNK_KEY = "record.chunk.jsonl.gz.b64"
CHUNK_NUMBER_KEY = "record.chunk"
RECORD_LABEL = "canary.io/record"
# JSON lines per chunk. The tail is held and rewritten as gzip members (one per save, each
# compressing on its own), so a smaller seal keeps the head small: at 128 KiB a save writes
# ~16 KiB on average (at 256 KiB, 28) and an hour of 10 s ticks is ~12 chunks of ~25 KiB
# (benchmarks/record_memory.py). Smaller means smaller writes and more objects.
SEAL_BYTES = 128 << 10
# Members compress apart (a save's ticks, ~4.6 KiB of JSON each: three ticks a member hold
# ~1.45x one stream's size, six ~1.2x): past this many, the tail's members are packed again as
# one. At the operator's minute between saves a chunk seals before that (about five saves),
# so this costs nothing there; it bounds the tail when saves come often (benchmarks/RESULTS.md:
# merging past three members of three ticks was ~0.16 ms of packing per save).
MERGE_MEMBERS = 6
# The tail's entries a resumed rollout parses for the live page's charts (SavedHead.recent):
# two minutes of the operator's 10 s ticks, at ~0.13 ms a line (JSON and validation of ~4.9
# KB); the whole tail, up to a chunk's ~30 lines, would cost more than the rest of a resume.
RECENT_LINES = 12
# A reader unpacks at most MAX_UNPACKED_RECORD_BYTES: past this, ticks are thinned.
BUDGET_BYTES = MAX_UNPACKED_RECORD_BYTES * 3 // 4
MAX_CHUNKS = 10_000  # a hostile head cannot send a reader round a million GETs


class RecordTooLarge(RecordError):
    """The record does not fit even after thinning to its essential ticks."""


def configmap_name(rollout: str) -> str:
    """A valid ConfigMap name (DNS subdomain, <= 253) for a rollout's record."""
    safe = "".join(c if c.isalnum() else "-" for c in rollout.lower()).strip("-")
    while "--" in safe:
        safe = safe.replace("--", "-")
    return f"canary-record-{safe}"[:253].rstrip("-")


def _essential(ticks: Sequence[TickEntry], keep_recent: int) -> set[int]:
    keep = {0, *range(max(len(ticks) - keep_recent, 0), len(ticks))}
    for i in range(1, len(ticks)):
        before, now = ticks[i - 1], ticks[i]
        decision_before = before.verdict.decision if before.verdict else None
        decision_now = now.verdict.decision if now.verdict else None
        if decision_before != decision_now:
            keep.update((i - 1, i))  # the report compares a decisive verdict with the one before
        elif before.step != now.step or before.weight_set != now.weight_set:
            keep.add(i)
    return keep


def downsample(entries: Sequence[Entry], *, max_ticks: int, keep_recent: int = 30) -> list[Entry]:
    """At most about `max_ticks` ticks (essential ticks are never dropped), evenly thinned
    among the older ones; every other entry is kept, in order, and a note says what was done."""
    if max_ticks < 1:
        raise ValueError(f"max_ticks must be at least 1, got {max_ticks}")
    ticks = [e for e in entries if isinstance(e, TickEntry)]
    if len(ticks) <= max_ticks:
        return list(entries)
    keep = _essential(ticks, keep_recent)
    optional = [i for i in range(len(ticks)) if i not in keep]
    room = max_ticks - len(keep)
    if room > 0 and optional:
        stride = len(optional) / room
        keep.update(optional[int(k * stride)] for k in range(min(room, len(optional))))
    kept_ids = {id(ticks[i]) for i in keep}
    out: list[Entry] = [e for e in entries if not isinstance(e, TickEntry) or id(e) in kept_ids]
    note = NoteEntry(
        at=max(e.at for e in entries),
        rollout=entries[0].rollout,
        level="info",
        message=(
            f"record downsampled for storage: kept {len(keep)} of {len(ticks)} ticks "
            "(counts are cumulative, so totals are exact; older ticks are sparser)"
        ),
    )
    # the end entry stays last
    if out and isinstance(out[-1], EndEntry):
        return [*out[:-1], note, out[-1]]
    return [*out, note]


def _encode(entries: Sequence[Entry]) -> str:
    text = "".join(dump_entry(e) + "\n" for e in entries).encode("utf-8")
    # mtime=0: the same record always packs to the same bytes
    return base64.b64encode(gzip.compress(text, compresslevel=9, mtime=0)).decode("ascii")


def pack_record(
    entries: Sequence[Entry], *, max_bytes: int = MAX_CONFIGMAP_BYTES, keep_recent: int = 30
) -> dict[str, str]:
    """ConfigMap `data` holding the record gzipped, thinned until it fits `max_bytes`."""
    if not entries or not isinstance(entries[0], StartEntry):
        raise RecordError("a record to store must begin with its start entry")
    ticks = sum(isinstance(e, TickEntry) for e in entries)
    candidate = list(entries)
    limit = ticks
    while True:
        encoded = _encode(candidate)
        if len(encoded) + len(RECORD_KEY) <= max_bytes:
            return {RECORD_KEY: encoded}
        if limit <= 1:
            raise RecordTooLarge(
                f"record of {entries[0].rollout} is {len(encoded)} bytes packed even with its "
                f"essential ticks only; the limit is {max_bytes}"
            )
        limit = max(limit // 2, 1)
        thinner = downsample(entries, max_ticks=limit, keep_recent=min(keep_recent, limit))
        if thinner == candidate:
            limit = 1  # nothing more can go: one last try is the error above
        candidate = thinner


def unpack_record(configmap: Mapping[str, Any], *, gaps: bool = False) -> list[Entry]:
    """The entries of a record read from a dump: one ConfigMap (the whole object, as
    `kubectl get configmap -o json` prints it, or its `data`) in the whole format or a
    chunked head without chunks yet, or a List of a head and its chunks (`kubectl get
    configmap -l canary.io/record=NAME -o json`). `gaps`: as read_record_configmap's."""
    items = configmap.get("items")
    if isinstance(items, list):
        return _unpack_list(items, source=str(configmap.get("kind") or "list"), gaps=gaps)
    data = configmap.get("data", configmap)
    name = _name_of(configmap)
    if isinstance(data, Mapping) and TAIL_KEY in data:
        assembler = _Assembler(configmap)
        if assembler.count:
            raise RecordError(
                f"{name}: the record has {assembler.count} chunks in other ConfigMaps; dump "
                f"them all with `kubectl get configmap -l {RECORD_LABEL}={name} -o json`"
            )
        return assembler.entries()
    if not isinstance(data, Mapping) or RECORD_KEY not in data:
        raise RecordError(f"{name}: no {RECORD_KEY} key: not a canary record ConfigMap")
    text = _unpack_text(
        data[RECORD_KEY], name=name, key=RECORD_KEY, budget=MAX_UNPACKED_RECORD_BYTES
    )
    entries = list(parse_lines(text.splitlines(), source=name))
    if not entries:
        raise RecordError(f"{name}: the record is empty")
    return entries


def looks_like_configmap(text: str) -> Mapping[str, Any] | None:
    """The parsed object if `text` is one JSON object holding a canary record ConfigMap."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return None
    try:
        obj = load_json(stripped, source="configmap")
    except InputError:
        return None  # one JSON line of a record is also an object: not this
    if isinstance(obj, dict) and obj.get("kind") == "ConfigMap":
        return obj
    if isinstance(obj, dict) and obj.get("kind") == "List" and isinstance(obj.get("items"), list):
        return obj  # a head and its chunks, dumped by label
    return None


class ConfigMapApi(Protocol):
    """The calls of canary.kubernetes.client.Kube this adapter needs."""

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]: ...

    async def put_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        resource_version: str | None = None,
        labels: Mapping[str, str] | None = None,
        owner: Mapping[str, str] | None = None,
        keep: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]: ...

    async def patch_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]: ...


def _others_of(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """What others set on a head ConfigMap, for its rewrite to keep: a rewrite is a PUT,
    which replaces the whole object, so without them it would drop a team's labels and
    annotations, an owner someone gave the record (which the API server may refuse:
    canary.kubernetes.client.KEPT_METADATA), and finalizers (a backup tool's). None when
    there is nothing but ours (the usual case: nothing is held)."""
    from canary.kubernetes.client import kept_metadata

    others = kept_metadata(metadata)
    labels = others.get("labels")
    if isinstance(labels, Mapping):
        theirs = {k: v for k, v in labels.items() if k != RECORD_LABEL}
        if theirs:
            others["labels"] = theirs
        else:
            del others["labels"]
    return others or None


# Others' metadata on a head is held by its writer up to this size (as JSON); more (up to
# the object's limit, from someone who may write ConfigMaps here) is not held: a rewrite
# then reads the head back and carries over what that read showed.
_OTHERS_HELD_CHARS = 4096


# -- the chunked format ------------------------------------------------------------------


def chunk_name(head: str, number: int) -> str:
    """The name of chunk `number` (from 1) of the record whose head ConfigMap is `head`.
    `configmap_name` never writes "--", so a chunk's name is never another record's head."""
    return f"{head[:245].rstrip('-')}--{number:05d}"


def _part_key(number: int) -> str:
    return f"{_PART_PREFIX}{number:04d}{_PART_SUFFIX}"


def _parts(data: Mapping[str, Any], name: str) -> list[tuple[int, str]]:
    """The tail's numbered parts in a head's data, in order: (number, key)."""
    parts = []
    for key in data:
        if not (isinstance(key, str) and key.startswith(_PART_PREFIX)):
            continue
        number = key[len(_PART_PREFIX) : -len(_PART_SUFFIX)]
        if key.endswith(_PART_SUFFIX) and len(number) == 4 and number.isdigit():
            parts.append((int(number), key))
    if len(parts) > MAX_PARTS:
        raise RecordError(f"{name}: {len(parts)} tail parts; a record has at most {MAX_PARTS}")
    return sorted(parts)


def _gzip_lines(lines: Sequence[str]) -> bytes:
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    # Level 6, not 9: 9 costs twice the CPU for ~2% less.
    return gzip.compress(text, compresslevel=6, mtime=0)


# Lines waiting for their save (up to a minute of ticks, ~4.4 KiB of JSON each) are held
# deflated against a dictionary: a tick line of the default analysis, whose keys and reason
# phrases real lines repeat. ~5-7x smaller (600-900 bytes a line, where one line deflated
# alone is ~1.3 KiB); ~45 us a line. In memory only: records stay gzip.
_PENDING_WBITS = -13  # raw deflate, an 8 KiB window: the dictionary fits it


@functools.cache
def _pending_dict() -> bytes:
    """A representative tick line: three looks of the default analysis at realistic counts
    (the standard latency buckets), built once, the same in every process."""
    from analysis import AnalysisConfig, Analyzer, ArmCounts, Snapshot

    les = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
    share = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0)

    def arm(n: float, errors: float) -> ArmCounts:
        return ArmCounts(
            requests=n,
            errors=errors,
            latency_buckets={le: n * f for le, f in zip(les, share, strict=True)},
        )

    analyzer = Analyzer(AnalysisConfig())
    entry: TickEntry | None = None
    for i in range(1, 4):
        primary, canary = arm(2000.0 * i, 20.0 * i), arm(200.0 * i, 2.0 * i)
        verdict = analyzer.observe(Snapshot(elapsed_s=10.0 * i, primary=primary, canary=canary))
        entry = TickEntry(
            at=1.7e9 + 10 * i,
            rollout="team/app@rev",
            elapsed_s=10.0 * i,
            phase="Progressing",
            step=0,
            weight_set=10,
            weight_read=10,
            primary=primary,
            canary=canary,
            no_data_reason=None,
            verdict=verdict,
        )
    assert entry is not None
    return dump_entry(entry).encode("utf-8")


@functools.cache
def _primed_deflate() -> zlib._Compress:
    """A compressor that has taken in _pending_dict() and nothing else."""
    return zlib.compressobj(
        6, zlib.DEFLATED, _PENDING_WBITS, 6, zlib.Z_DEFAULT_STRATEGY, _pending_dict()
    )


def _hold_line(line: str) -> bytes:
    """One pending line as held: deflated against _pending_dict(). A copy of the primed
    compressor gives the same bytes as a new one given the dictionary, ~25% faster (the
    dictionary is not hashed in again for every line: issue 13)."""
    deflate = _primed_deflate().copy()
    return deflate.compress(line.encode("utf-8")) + deflate.flush()


def _held_line(held: bytes) -> str:
    """The line `_hold_line` held."""
    inflate = zlib.decompressobj(_PENDING_WBITS, _pending_dict())
    return (inflate.decompress(held) + inflate.flush()).decode("utf-8")


def _pack_lines(lines: Sequence[str]) -> str:
    return base64.b64encode(_gzip_lines(lines)).decode("ascii")


def _b64_len(members: Sequence[bytes]) -> int:
    return 4 * ((sum(len(m) for m in members) + 2) // 3)


def _b64(members: Sequence[bytes]) -> str:
    """gzip members, concatenated: one gzip stream (RFC 1952 allows many members; every
    reader here, like gzip(1), reads them all)."""
    return base64.b64encode(b"".join(members)).decode("ascii")


def _unpack_text(packed: object, *, name: str, key: str, budget: int) -> str:
    """The text of one packed key, at most `budget` bytes once unpacked (a gzip bomb, or a
    record that grew past what a reader holds, stops there with an error naming it)."""
    if not isinstance(packed, str | bytes) or len(packed) > _MAX_PACKED_CHARS:
        what = f"{len(packed)} characters" if isinstance(packed, str | bytes) else "not text"
        raise RecordError(f"{name}: {key} is not base64 gzip text of a record ({what})")
    try:
        unpacked = gunzip_bounded(
            base64.b64decode(packed, validate=True), source=name, max_bytes=max(budget, 0)
        )
        return decode_text(unpacked, source=name)
    except binascii.Error as exc:
        raise RecordError(f"{name}: {key} is not base64 gzip text: {exc}") from None
    except InputError as exc:
        message = str(exc).removeprefix(f"{name}: ")
        raise RecordError(f"{name}: {key} is not base64 gzip text: {message}") from None


def _raw_name(configmap: Mapping[str, Any]) -> str:
    """metadata.name as stored (chunk names are derived from it), "" when there is none."""
    metadata = configmap.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return name if isinstance(name, str) and len(name) <= 253 else ""


def _name_of(configmap: Mapping[str, Any]) -> str:
    """metadata.name for messages: an excerpt."""
    metadata = configmap.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return excerpt(name, 80).strip("'") if isinstance(name, str) and name else "configmap"


def _data_of(configmap: Mapping[str, Any]) -> Mapping[str, Any]:
    data = configmap.get("data", configmap)
    return data if isinstance(data, Mapping) else {}


def is_chunked(configmap: Mapping[str, Any]) -> bool:
    """True for the head of a chunked record (this format), False for a whole one."""
    return TAIL_KEY in _data_of(configmap)


def _chunk_count(head: Mapping[str, Any], name: str) -> int:
    raw = _data_of(head).get(CHUNKS_KEY, "0")
    if not isinstance(raw, str) or not raw.isdigit() or int(raw) > MAX_CHUNKS:
        raise RecordError(
            f"{name}: {CHUNKS_KEY} is {excerpt(raw, 40)}: a chunk count of 0 to {MAX_CHUNKS}"
        )
    return int(raw)


# How a report's note for a chunk that could not be read ends (canary report also says so
# on stderr).
GAP_NOTE_END = "the entries it held are not shown"


class _ForeignChunk(RecordError):
    """A chunk's ConfigMap that holds another record's chunk (or another number)."""


class _Gap:
    """Where a chunk that could not be read was (a report shows the rest, and says so)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Assembler:
    """Reassembles a chunked record, chunk by chunk, within one unpacked-size budget."""

    def __init__(self, head: Mapping[str, Any]) -> None:
        self.name = _name_of(head)
        self.head = _raw_name(head)
        data = _data_of(head)
        self.record_id = data.get(ID_KEY)
        self.count = _chunk_count(head, self.name)
        self.budget = MAX_UNPACKED_RECORD_BYTES
        self.lines: list[str | _Gap] = []
        self.record_bytes = 0  # its lines in UTF-8, as the writer counts them
        self._tail = [(TAIL_KEY, data.get(TAIL_KEY))]
        self._tail += [(key, data.get(key)) for _, key in _parts(data, self.name)]

    def add_chunk(self, number: int, configmap: Mapping[str, Any]) -> None:
        name = _name_of(configmap)
        data = _data_of(configmap)
        if data.get(ID_KEY) != self.record_id or data.get(CHUNK_NUMBER_KEY) != str(number):
            raise _ForeignChunk(
                f"{name}: not chunk {number} of record {self.name} (a chunk of another "
                "record under the same name?)"
            )
        self._add(data.get(CHUNK_KEY), name=name, key=CHUNK_KEY)

    def add_chunks(
        self,
        first: int,
        configmaps: Sequence[Mapping[str, Any] | RecordError],
        *,
        gaps: bool = False,
    ) -> None:
        """Chunks `first`, `first + 1`, ... in order; a RecordError in their place is a chunk
        that could not be read, and with `gaps` (a report) so is a chunk of another record:
        each is then a gap (add_gap) rather than the whole record's error."""
        for number, configmap in enumerate(configmaps, start=first):
            if isinstance(configmap, RecordError):
                if not gaps:
                    raise configmap
                self.add_gap(str(configmap))
                continue
            try:
                self.add_chunk(number, configmap)
            except _ForeignChunk as exc:
                if not gaps:
                    raise
                self.add_gap(str(exc))

    def add_gap(self, why: str) -> None:
        """A chunk that could not be read, for a reader that shows the rest (reports): the
        entries get a warning note in its place, saying which and why."""
        self.lines.append(_Gap(f"{why}: {GAP_NOTE_END}"))

    def _add(self, packed: object, *, name: str, key: str) -> None:
        self.lines.extend(self._unpack(packed, name=name, key=key))

    def _unpack(self, packed: object, *, name: str, key: str) -> list[str]:
        text = _unpack_text(packed, name=name, key=key, budget=self.budget)
        self.budget -= len(text)
        if self.budget <= 0:
            raise RecordError(
                f"{self.name}: the record unpacks to more than {MAX_UNPACKED_RECORD_BYTES} "
                f"bytes at {name}; a reader holds at most that"
            )
        self.record_bytes += len(text.encode("utf-8"))
        return text.splitlines()

    def recent(self, count: int) -> tuple[Entry, ...]:
        """The last `count` entries of the tail alone (no chunk), its newest parts first:
        the older ones are not unpacked once the newer hold enough lines."""
        lines: list[str] = []
        for key, packed in reversed(self._tail):
            lines[:0] = self._unpack(packed, name=self.name, key=key)
            if len(lines) > count:
                break
        return tuple(parse_lines(lines[max(0, len(lines) - count) :], source=self.name))

    def entries(self) -> list[Entry]:
        for key, packed in self._tail:
            self._add(packed, name=self.name, key=key)
        lines: list[str] = []
        gaps: list[tuple[int, str]] = []  # (entries before it, why)
        count = 0
        for line in self.lines:
            if isinstance(line, _Gap):
                gaps.append((count, line.message))
            else:
                lines.append(line)
                count += bool(line.strip())  # each other line is one entry (parse_lines)
        entries = list(parse_lines(lines, source=self.name))
        if not entries:
            raise RecordError(f"{self.name}: the record is empty")
        if gaps and gaps[0][0] == 0 and not isinstance(entries[0], StartEntry):
            # the first chunk holds the start entry: no report is made without it
            raise RecordError(f"{gaps[0][1]}, the start entry among them")
        count = len(entries)  # a torn last line is counted in `before`, not kept
        for before, why in reversed(gaps):
            at = min(before, count)
            near = entries[at - 1] if at else entries[0]
            note = NoteEntry(at=near.at, rollout=near.rollout, level="warning", message=why)
            entries.insert(at, note)
        return entries


def _recent_entries(assembler: _Assembler) -> tuple[Entry, ...]:
    """The last RECENT_LINES entries of a chunked head's tail, or () when they cannot be
    read: they only seed the live page's charts after a resume (SavedHead.recent), and the
    next save or a full read says what is wrong with them."""
    try:
        return assembler.recent(RECENT_LINES)
    except RecordError as exc:
        log.info(
            "record %s: its latest ticks are not shown after a resume: %s", assembler.name, exc
        )
        return ()


def _unpack_list(items: Sequence[Any], *, source: str, gaps: bool = False) -> list[Entry]:
    """A head and its chunks, as `kubectl get configmap -l canary.io/record=NAME -o json`
    lists them."""
    objects = [i for i in items if isinstance(i, Mapping)]
    heads = [o for o in objects if RECORD_KEY in _data_of(o) or TAIL_KEY in _data_of(o)]
    if len(heads) != 1:
        names = ", ".join(_name_of(h) for h in heads[:5]) or "none"
        raise RecordError(
            f"{source}: {len(heads)} record heads in the list ({names}); dump one record "
            f"with `kubectl get configmap -l {RECORD_LABEL}=NAME -o json`"
        )
    (head,) = heads
    if not is_chunked(head):
        return unpack_record(head)
    assembler = _Assembler(head)
    by_name = {_raw_name(o): o for o in objects}
    for number in range(1, assembler.count + 1):
        name = chunk_name(assembler.head, number)
        chunk: Mapping[str, Any] | RecordError = by_name.get(name) or RecordError(
            f"{assembler.name}: chunk {number} of {assembler.count} ({excerpt(name, 80)}) is "
            "not in the list"
        )
        assembler.add_chunks(number, [chunk], gaps=gaps)
    return assembler.entries()


async def read_record_configmap(
    api: ConfigMapApi, head: Mapping[str, Any], *, gaps: bool = False
) -> list[Entry]:
    """The entries of a record whose head ConfigMap is `head` (either format): its chunks
    are read a few at a time, unpacked off the event loop, within one bounded budget. With
    `gaps` (a report), a chunk that is gone (404) or holds another record's is a warning note
    in its place naming it, and the rest of the record is read (the first chunk, which holds
    the start entry, excepted); without, it is a RecordError, as any other error is."""
    return (await _read_record(api, head, gaps=gaps))[0]


# Chunks asked for at once: a resume waits for one round trip per this many chunks, not per
# chunk (an hour of record is ~12 chunks), and holds at most this many packed (~25 KiB each).
CHUNK_READS = 4


async def _read_record(
    api: ConfigMapApi, head: Mapping[str, Any], *, gaps: bool = False
) -> tuple[list[Entry], int | None]:
    """read_record_configmap, and the record's lines in UTF-8 bytes (None for the whole
    format): a writer carrying the record on counts its size from it."""
    from canary.kubernetes.client import KubeError, NotFound

    if not is_chunked(head):
        return await run_blocking("packing", unpack_record, head), None
    assembler = _Assembler(head)
    metadata = head.get("metadata")
    namespace = metadata.get("namespace", "") if isinstance(metadata, Mapping) else ""
    for first in range(1, assembler.count + 1, CHUNK_READS):
        numbers = range(first, min(first + CHUNK_READS, assembler.count + 1))
        chunks = await asyncio.gather(
            *(api.get_configmap(namespace, chunk_name(assembler.head, n)) for n in numbers),
            return_exceptions=True,
        )
        read: list[Mapping[str, Any] | RecordError] = []
        for number, chunk in zip(numbers, chunks, strict=True):
            if isinstance(chunk, KubeError):
                error = RecordError(
                    f"record ConfigMap {namespace}/{assembler.name}: chunk {number} of "
                    f"{assembler.count}: {chunk}"
                )
                # Only a chunk that is gone is a gap: any other error may pass (a 429, a
                # timeout), and a report server caches what it read.
                if not gaps or not isinstance(chunk, NotFound):
                    raise error from None
                read.append(error)
                continue
            if isinstance(chunk, BaseException):
                raise chunk
            read.append(chunk)
        await run_blocking(
            "packing", functools.partial(assembler.add_chunks, gaps=gaps), first, read
        )
    return await run_blocking("packing", assembler.entries), assembler.record_bytes


@dataclass(frozen=True, slots=True)
class _Attempt:
    """A write to the head, and the writer's state once it has landed."""

    token: str  # WRITE_KEY's value in it
    lines: int  # the held lines it saves
    chunks: int  # chunks it sealed
    parts: int  # the head's tail parts after it
    members_lines: int  # the tail's lines and JSON bytes after it
    members_bytes: int
    last_at: float | None
    data_at: float | None


class _Moved(Exception):
    """The head a rewrite was made from is not the head any more: read it back."""


# Bytes of kept heads (_KeptHead) a process holds at once; past it, a rewrite reads the
# head back as before. Rollouts started together seal together: at 1,000 of them each kept
# ~35 KiB in the same minute, and the process' RSS rose by that (~30 MiB, and stayed) in
# benchmarks/scale.py (issue 13's 300 MiB). Spread out, a thousand rollouts hold ~5 MiB.
KEPT_HEADS_BYTES = 8 << 20


class _KeptBudget:
    """What the process' kept heads hold. Each admitted head gives its bytes back when it is
    freed (a finalizer), however its writer let go of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0  # heads not kept for the budget (tests, benchmarks)

    def admit(self, kept: _KeptHead) -> bool:
        size = kept.size
        if self.held + size > self.limit:
            self.refused += 1
            return False
        self.held += size
        weakref.finalize(kept, self._give_back, size)
        return True

    def _give_back(self, size: int) -> None:
        self.held -= size


@dataclass(frozen=True, slots=True, weakref_slot=True)
class _KeptHead:
    """The head as the answer to a part's write gave it, kept when the next save is likely
    to rewrite the head (_keep_head): that rewrite then seals the tail from these members
    instead of reading the head back (issue 13: the GET was a third of a rewrite's
    requests, and its decoding a quarter of its CPU)."""

    resource_version: str  # the head's, after that write: valid while it is still the head's
    members: list[str]  # the tail's members as stored: TAIL_KEY, then parts 1..n (base64)
    carry: object  # the head's CARRY_KEY

    @property
    def size(self) -> int:
        carry = len(self.carry) if isinstance(self.carry, str) else 0
        return sum(map(len, self.members)) + carry


KEPT_BUDGET = _KeptBudget(KEPT_HEADS_BYTES)


@dataclass(frozen=True, slots=True)
class _Index:
    """Where the record ends, as of the write that saved it (INDEX_KEY): what a writer
    carrying the record on, and a resume, need without reading it."""

    written_bytes: int  # the record's JSON lines in UTF-8 (a reader unpacks this much)
    tail_lines: int  # the lines of the head's tail, and their bytes
    tail_bytes: int
    last_at: float | None  # the last line's time
    tick_at: float | None  # the last tick's, and the last tick with a verdict's
    data_at: float | None
    kept_tick_at: float | None  # the last tick kept while thinning (ConfigMapRecordWriter.add)
    # WRITE_KEY of the write that saved it: a head written since by a writer that does not
    # save the index (an older canary's) holds another, and this index is stale
    token: str

    def text(self) -> str:
        return json.dumps(
            [
                _INDEX_VERSION,
                self.token,
                self.written_bytes,
                self.tail_lines,
                self.tail_bytes,
                self.last_at,
                self.tick_at,
                self.data_at,
                self.kept_tick_at,
            ],
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: object, name: str, token: object) -> _Index:
        """INDEX_KEY's value, checked against the head's WRITE_KEY (`token`); RecordError
        naming what is wrong."""
        if not isinstance(text, str) or len(text) > 1024:
            raise RecordError(f"{name}: {INDEX_KEY} is missing or too long")
        try:
            values = json.loads(text)
        except ValueError:
            raise RecordError(f"{name}: {INDEX_KEY} is not JSON") from None
        if not isinstance(values, list) or len(values) != 9 or values[0] != _INDEX_VERSION:
            raise RecordError(f"{name}: {INDEX_KEY} is not a version {_INDEX_VERSION} index")
        if values[1] != token:
            raise RecordError(f"{name}: {INDEX_KEY} is not of the head's last write")
        sizes, times = values[2:5], values[5:]
        if not all(type(v) is int and 0 <= v <= MAX_UNPACKED_RECORD_BYTES for v in sizes):
            raise RecordError(f"{name}: {INDEX_KEY} has a size that is not a byte count")
        if not all(v is None or (type(v) in (int, float) and math.isfinite(v)) for v in times):
            raise RecordError(f"{name}: {INDEX_KEY} has a time that is not a finite number")
        return cls(
            written_bytes=sizes[0],
            tail_lines=sizes[1],
            tail_bytes=sizes[2],
            last_at=times[0],
            tick_at=times[1],
            data_at=times[2],
            kept_tick_at=times[3],
            token=values[1],
        )


_INDEX_VERSION = 1


def _pack_held(held_lines: Sequence[bytes]) -> str:
    """Held lines as one part: base64 of one gzip member. Pure CPU: off the event loop."""
    return base64.b64encode(_gzip_lines([_held_line(h) for h in held_lines])).decode("ascii")


def _stored_members(data: Mapping[str, Any], parts: int, name: str) -> list[bytes]:
    """The tail in a head's data as gzip members: TAIL_KEY, then parts 1..`parts`. A part
    past those is a write that did not land as far as the writer knows: its lines are still
    held, and the rewrite drops it."""
    keys = [TAIL_KEY] + [key for number, key in _parts(data, name) if number <= parts]
    members = []
    for key in keys:
        packed = data.get(key)
        if not isinstance(packed, str):
            raise RecordError(f"{name}: {key} is missing from the head")
        try:
            members.append(base64.b64decode(packed, validate=True))
        except binascii.Error as exc:
            raise RecordError(f"{name}: {key} is not base64: {exc}") from None
    return [m for m in members if m]


class ConfigMapRecordWriter:
    """Keeps one rollout's record in ConfigMaps, incrementally. Never raises for API errors.

    Holds only the entries added since the last save (deflated), not the tail: a save adds
    them to the head as one part (a merge patch); every MERGE_MEMBERS parts, and once the
    tail reaches `seal_bytes` (when it first creates a chunk from it), it reads the head back
    and rewrites it. Entries other than ticks are saved at once (a decision must not be
    lost); ticks at most every `save_every_s` of record time. `flush()` saves whatever is
    pending.

    A record that grows past `budget_bytes` (unpacked) keeps one tick every `thin_every_s`
    from then on, and every tick before a non-tick entry, so it stays readable whole.
    """

    def __init__(
        self,
        api: ConfigMapApi,
        *,
        namespace: str,
        rollout: str,
        max_bytes: int = MAX_CONFIGMAP_BYTES,
        save_every_s: float = 30.0,
        seal_bytes: int = SEAL_BYTES,
        budget_bytes: int = BUDGET_BYTES,
        thin_every_s: float = 600.0,
    ) -> None:
        if seal_bytes < 1 or max_bytes < 1:
            raise ValueError("seal_bytes and max_bytes must be positive")
        self.api = api
        self.namespace = namespace
        self.rollout = rollout
        self.name = configmap_name(rollout)
        self.max_bytes = max_bytes
        self.save_every_s = save_every_s
        # JSON packs ~8x: a chunk of twice the object limit in lines still fits it
        self.seal_bytes = min(seal_bytes, 2 * max_bytes)
        self.budget_bytes = budget_bytes
        self.thin_every_s = thin_every_s
        self.last_error: str | None = None
        self.chunks = 0  # sealed chunks the head names
        self.record_id = secrets.token_hex(8)  # ties the chunks to this head
        self.written_bytes = 0  # of JSON lines, sealed and pending: what a reader unpacks
        self.last_write_bytes = 0  # the data of the last save's writes, for benchmarks
        # The tail (the lines not yet sealed) is in the head, not here: its count and JSON
        # bytes (`_members_*`) and how many parts it has, as the last save left them; only
        # the lines added since (`_lines`) are held. Unpacked, 1,000 young rollouts' tails
        # were a quarter of a GiB (issue 13); held packed, ~10 MiB; now none.
        self._members_lines = 0
        self._members_bytes = 0
        self._tail_parts = 0
        self._rewrite = False  # the next save writes the head from the lines held alone
        self._attempt: _Attempt | None = None  # a write whose answer was lost
        self._kept: _KeptHead | None = None  # the head before a likely rewrite (_keep_head)
        self._ended = False  # an end entry was added: no save is due after the one it makes
        self._lines: list[bytes] = []  # held by _hold_line
        self._line_sizes: list[int] = []  # each line's UTF-8 bytes plus its newline
        self._lines_bytes = 0
        self._held: TickEntry | None = None  # a thinned tick, kept in case it is the last
        self._kept_tick_at: float | None = None
        self._resource_version: str | None = None
        self._uid: str | None = None  # the head's, for the chunks' ownerReference
        self._others: dict[str, Any] | None = None  # what others set on the head (_others_of)
        self._others_unheld = False  # too big to hold: a rewrite reads the head back
        self._saved_at: float | None = None
        self._last_at: float | None = None
        self._thinning_noted = False
        self._dirty = False
        self._data_at: float | None = None  # the newest tick with a verdict among the lines
        self.data_through: float | None = None  # ... among the lines saved (RecordSink's)
        # gives the metric source's state to save beside the record (None: nothing now)
        self.carry: Callable[[], str | None] | None = None
        # gives the runner's analysis state, as of the lines added so far (None: none to
        # carry); when set, each write saves it and the index (ANALYSIS_KEY, INDEX_KEY)
        self.analysis: Callable[[], str | None] | None = None
        self._tick_at: float | None = None  # the newest tick among the lines

    @property
    def dirty(self) -> bool:
        """Whether something was added since the last save."""
        return self._dirty

    @property
    def pending_bytes(self) -> int:
        """The tail's size as JSON lines: a chunk is sealed from it at `seal_bytes`."""
        return self._members_bytes + self._lines_bytes

    @property
    def pending(self) -> int:
        """How many entries the tail holds (in memory and in the head)."""
        return self._members_lines + len(self._lines)

    @property
    def held_bytes(self) -> int:
        """What the tail costs in memory: the lines added since the last save, as held."""
        return sum(len(h) for h in self._lines)

    def _add_line(self, line: str) -> None:
        held = _hold_line(line)
        self._lines.append(held)
        size = len(line.encode("utf-8")) + 1
        self._line_sizes.append(size)
        self._lines_bytes += size
        self.written_bytes += size
        self._dirty = True

    def add(self, entry: Entry) -> None:
        """Add an entry to the tail (ticks thinned past the budget), without saving."""
        self._last_at = entry.at
        if isinstance(entry, EndEntry):
            self._ended = True
        if isinstance(entry, TickEntry):
            if self.written_bytes >= self.budget_bytes:
                if (
                    self._kept_tick_at is not None
                    and entry.at - self._kept_tick_at < self.thin_every_s
                ):
                    self._held = entry  # counts are cumulative: only the latest one matters
                    return
                if not self._thinning_noted:
                    self._thinning_noted = True
                    note = NoteEntry(
                        at=entry.at,
                        rollout=entry.rollout,
                        level="info",
                        message=(
                            f"record past {self.budget_bytes} bytes: from here one tick every "
                            f"{self.thin_every_s:g}s is kept, and every tick a decision follows "
                            "(counts are cumulative, so totals are exact)"
                        ),
                    )
                    self._add_line(dump_entry(note))
            self._held = None
            self._kept_tick_at = entry.at
        elif self._held is not None:  # the tick a transition or an end follows
            held, self._held = self._held, None
            self._add_entry(held)
        self._add_entry(entry)

    def _add_entry(self, entry: Entry) -> None:
        self._add_line(dump_entry(entry))
        if isinstance(entry, TickEntry):
            self._tick_at = entry.at
            if entry.verdict is not None:
                self._data_at = entry.at

    async def append(self, entry: Entry) -> str | None:
        """Add an entry and save when due. Returns why the save failed, or None."""
        self.add(entry)
        due = (
            not isinstance(entry, TickEntry)
            or self._saved_at is None
            or entry.at - self._saved_at >= self.save_every_s
        )
        return await self.flush() if due else None

    async def flush(self) -> str | None:
        """Save the record if anything is pending. Returns why it failed, or None."""
        if not self._dirty:
            return None
        return await self.save()

    def _plan(
        self, members: list[bytes], held: int, held_lines: list[bytes]
    ) -> tuple[list[str], int, list[bytes], str]:
        """Chunks to seal, how many of `lines` they hold, the tail's members after them, and
        the packed tail. `members` (of `held` JSON bytes) are the tail's packed part, `lines`
        the new lines. A chunk closes once it reaches `seal_bytes` of lines: the first one is
        the packed tail plus new lines, the next ones new lines only (a resumed old record);
        and the packed tail alone becomes a chunk when the new lines would take it past the
        object limit (members compress less well than one stream). What is left short of a
        chunk becomes the tail's next member; past MERGE_MEMBERS members, they are packed
        again as one. Pure CPU: run off the event loop."""
        lines = [_held_line(h) for h in held_lines]
        chunks: list[str] = []
        sealed = 0
        group: list[str] = []
        size = held
        limit = self.max_bytes - 200

        def add(packed: bytes) -> list[bytes]:
            """The members with `packed` added, sealing the old ones first if need be."""
            nonlocal members
            if members and _b64_len([*members, packed]) > limit:
                chunks.append(_b64(members))
                members = []
            return [*members, packed]

        for line in lines:
            group.append(line)
            size += len(line) + 1
            if size >= self.seal_bytes:
                chunks.append(_b64(add(_gzip_lines(group))))
                sealed += len(group)
                members, group, size = [], [], 0
        if group:
            members = add(_gzip_lines(group))
        if len(members) > MERGE_MEMBERS:
            merged = gzip.compress(gzip.decompress(b"".join(members)), compresslevel=6, mtime=0)
            if len(merged) < sum(len(m) for m in members):
                members = [merged]
        for packed in chunks:
            if len(packed) + 200 > self.max_bytes:
                raise RecordTooLarge(
                    f"a chunk of {self.rollout}'s record is {len(packed)} bytes packed; the "
                    f"limit is {self.max_bytes}"
                )
        tail = _b64(members) if members else _pack_lines([])
        if len(tail) + 200 > self.max_bytes:
            raise RecordTooLarge(
                f"the tail of {self.rollout}'s record is {len(tail)} bytes packed; the limit "
                f"is {self.max_bytes}"
            )
        return chunks, sealed, members, tail

    async def save(self) -> str | None:
        """Save now: add the new lines to the head as a part, or (past MERGE_MEMBERS parts,
        or once the tail is due to seal) read the head back, seal the tail into chunks if it
        is due and rewrite the head. Returns why it failed, or None. A failure changes
        nothing: the next save does it all again (a chunk created by a failed save is
        overwritten; the head does not name it yet); a write whose answer was lost is
        settled first, from the head's WRITE_KEY."""
        where = f"record ConfigMap {self.namespace}/{self.name}"
        count = len(self._lines)
        new_bytes = sum(self._line_sizes[:count])
        if (
            count
            and self._attempt is None
            and not self._rewrite
            and self._resource_version is not None
            and self._fits_a_part(new_bytes)
        ):
            error, moved = await self._append(count, new_bytes)
            if error is None:
                return None
            if not moved:  # no answer, or refused: the next save settles it from the head
                return self._failed(f"{where}: {error}")
            # the head moved or went (Conflict, NotFound): read it, settle and rewrite it
        return await self._rewrite_head(where)

    def _fits_a_part(self, new_bytes: int) -> bool:
        """Whether a save of `new_bytes` of lines adds a part to the tail (else the head is
        rewritten: the parts are due to merge, or the tail to seal)."""
        return (
            self._tail_parts < MERGE_MEMBERS and self._members_bytes + new_bytes < self.seal_bytes
        )

    async def _append(self, count: int, new_bytes: int) -> tuple[str | None, bool]:
        """Add the first `count` held lines to the head as its next part (a merge patch
        guarded by the head's resourceVersion). Returns why it failed (or None), and whether
        the head moved or went."""
        from canary.kubernetes.client import Conflict, KubeError, NotFound

        self._kept = None  # kept only from this write's answer, if it lands
        lines = self._lines[:count]
        token = secrets.token_hex(6)
        attempt = _Attempt(
            token,
            lines=count,
            chunks=0,
            parts=self._tail_parts + 1,
            members_lines=self._members_lines + count,
            members_bytes=self._members_bytes + new_bytes,
            last_at=self._last_at,
            data_at=self._data_at,
        )
        # As of the lines this write saves: taken before anything awaits (only the runner,
        # whose state it is, adds lines, and it awaits this save).
        states = self._states(self._marks(), attempt, self._analysis())
        carried = self._carried()
        packed = await run_blocking("packing", _pack_held, lines)
        data = {_part_key(attempt.parts): packed, WRITE_KEY: token, **states}
        if carried is not None:
            data[CARRY_KEY] = carried  # else the head keeps the one it has
        self._attempt = attempt
        try:
            result = await self.api.patch_configmap(
                self.namespace, self.name, data, resource_version=self._resource_version
            )
        except (Conflict, NotFound) as exc:
            # Refused, unless it was the retry of a write that landed: the rewrite reads the
            # head and settles that from WRITE_KEY first.
            return str(exc), True
        except KubeError as exc:
            return str(exc), False
        metadata = result.get("metadata", {})
        self._resource_version = metadata.get("resourceVersion")
        self._uid = self._uid or metadata.get("uid")
        self._hold_others(metadata)
        self.last_write_bytes = sum(len(v) for v in data.values())
        self._settled(attempt)
        self._kept = self._keep_head(result, new_bytes)
        return None, False

    def _keep_head(self, head: Mapping[str, Any], new_bytes: int) -> _KeptHead | None:
        """The head a part's write left (its answer), if the next save will likely rewrite
        it: the tail's parts are due to merge, or a save like this one (and half again) would
        seal it. Only then (a full tail is ~25-35 KiB: at the operator's minute between
        saves, about one rollout in five holds one), within the process' budget
        (KEPT_HEADS_BYTES), and not once the record has ended (no save would come to use it,
        and a finished rollout's writer lives on)."""
        if self._ended or self._others_unheld or self._fits_a_part(new_bytes + new_bytes // 2):
            return None  # (_others_unheld: the rewrite reads the head back anyway)
        data = head.get("data")
        if (
            self._resource_version is None
            or not isinstance(data, dict)
            or data.get(ID_KEY) != self.record_id
        ):
            return None
        members: list[str] = []
        for key in [TAIL_KEY] + [_part_key(n) for n in range(1, self._tail_parts + 1)]:
            member = data.get(key)
            if not isinstance(member, str):
                return None
            members.append(member)
        kept = _KeptHead(self._resource_version, members, data.get(CARRY_KEY))
        return kept if KEPT_BUDGET.admit(kept) else None

    async def _rewrite_head(self, where: str) -> str | None:
        """Seal the tail if due and write the head again: from the head the last write left
        (_KeptHead), when nothing was written since, so without a GET; else (or if that
        head turns out to have moved: its chunk exists, or its version is not the head's
        any more) from the head read back."""
        known, self._kept = self._kept, None
        if (
            known is not None
            and not self._others_unheld  # what others set must be read back to be kept
            and self._attempt is None
            and not self._rewrite
            and known.resource_version == self._resource_version
        ):
            try:
                return await self._seal_and_write(where, known)
            except _Moved:
                pass
        return await self._seal_and_write(where, None)

    async def _seal_and_write(self, where: str, known: _KeptHead | None) -> str | None:
        from canary.kubernetes.client import KubeError, NotFound

        members: list[bytes] = []
        kept_carry: object = None
        keep = self._others  # what others set on the head, for its replace
        if known is not None:
            try:
                members = [
                    m for m in (base64.b64decode(k, validate=True) for k in known.members) if m
                ]
            except binascii.Error:
                raise _Moved from None
            kept_carry = known.carry
        elif self._resource_version is not None or self._attempt is not None:
            try:
                head: Mapping[str, Any] | None = await self.api.get_configmap(
                    self.namespace, self.name
                )
            except NotFound:
                head, self._resource_version = None, None
            except KubeError as exc:
                return self._failed(f"{where}: {exc}")
            if head is not None:
                metadata = head.get("metadata", {})
                self._resource_version = metadata.get("resourceVersion")
                self._uid = metadata.get("uid") or self._uid
                keep = self._hold_others(metadata)
                data = _data_of(head)
                if data.get(ID_KEY) == self.record_id:
                    kept_carry = data.get(CARRY_KEY)
                attempt, self._attempt = self._attempt, None
                if attempt is not None and data.get(WRITE_KEY) == attempt.token:
                    self._settled(attempt)  # it landed: those lines are in the head
                if self._rewrite:
                    pass  # the held lines are the whole tail
                elif not is_chunked(head) or data.get(ID_KEY) != self.record_id:
                    self._lost_tail("replaced by another writer")
                else:
                    try:
                        members = _stored_members(data, self._tail_parts, self.name)
                    except RecordError as exc:
                        self._lost_tail(f"unreadable ({exc})")
            else:
                self._attempt = None
                self._lost_tail("deleted")
        if not self._lines and not self._rewrite and self._resource_version is not None:
            self._dirty = False  # the settled write saved them all
            self.last_error = None
            return None
        lines = list(self._lines)
        last_at = self._last_at
        data_at = self._data_at
        marks, analysis = self._marks(), self._analysis()  # as of `lines` (see _append)
        try:
            # Gzip is CPU work: off the event loop. One flush's worth of new lines.
            chunks, sealed, _, tail = await run_blocking(
                "packing", self._plan, members, self._members_bytes, lines
            )
        except RecordError as exc:
            return self._failed(f"{where}: {exc}")
        written = 0
        if chunks and self._uid is None:
            error = await self._learn_uid(where)
            if error is not None:
                return self._failed(error)
        for offset, packed in enumerate(chunks, start=1):
            number = self.chunks + offset
            chunk = {
                CHUNK_KEY: packed,
                ID_KEY: self.record_id,
                CHUNK_NUMBER_KEY: str(number),
            }
            error = await self._put_chunk(
                chunk_name(self.name, number), chunk, overwrite=known is None
            )
            if error is not None:
                return self._failed(f"{where}: chunk {number}: {error}")
            written += sum(len(v) for v in chunk.values())
        kept = sum(self._line_sizes[sealed : len(lines)])
        attempt = _Attempt(
            secrets.token_hex(6),
            lines=len(lines),
            chunks=len(chunks),
            parts=0,
            members_lines=(0 if chunks else self._members_lines) + len(lines) - sealed,
            members_bytes=(0 if chunks else self._members_bytes) + kept,
            last_at=last_at,
            data_at=data_at,
        )
        head_data = {
            FORMAT_KEY: FORMAT,
            ID_KEY: self.record_id,
            CHUNKS_KEY: str(self.chunks + len(chunks)),
            TAIL_KEY: tail,
            WRITE_KEY: attempt.token,
            **self._states(marks, attempt, analysis),
        }
        carried = self._carried()
        if carried is None and isinstance(kept_carry, str):
            carried = kept_carry
        if carried is not None:
            head_data[CARRY_KEY] = carried
        self._attempt = attempt
        error = await self._put_head(head_data, settle=known is None, keep=keep)
        if error is not None:
            return self._failed(f"{where}: {error}")
        written += sum(len(v) for v in head_data.values())
        self.last_write_bytes = written
        self._rewrite = False
        self._settled(attempt)
        return None

    def _hold_others(self, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
        """Note what others set on the head as `metadata` shows it (held if small, else
        marked to be read back before a rewrite: _OTHERS_HELD_CHARS); returns all of it."""
        others = _others_of(metadata)
        self._others_unheld = (
            others is not None and len(json.dumps(others, default=str)) > _OTHERS_HELD_CHARS
        )
        self._others = None if self._others_unheld else others
        return others

    def _carried(self) -> str | None:
        """The metric source's state to save (None: the head keeps the one it has)."""
        return self._given(self.carry, "the metric source's state")

    def _analysis(self) -> str:
        """The runner's analysis state to save ("" for none)."""
        return self._given(self.analysis, "the analysis state") or ""

    def _given(self, source: Callable[[], str | None] | None, what: str) -> str | None:
        """What `source` gives to save with the head, if anything and if it leaves the head
        room: at most an eighth of the object limit (the tail's packed lines take at most a
        quarter)."""
        if source is None:
            return None
        try:
            given = source()
        except Exception:  # a bug there must not cost the record its write
            log.exception("record %s/%s: %s", self.namespace, self.name, what)
            return None
        return given if given is not None and len(given) <= self.max_bytes // 8 else None

    def _marks(self) -> tuple[int, float | None, float | None]:
        """Where the lines added so far end: their bytes, the last tick's time and the last
        kept while thinning (with an _Attempt, what the index says)."""
        return self.written_bytes, self._tick_at, self._kept_tick_at

    def _states(
        self, marks: tuple[int, float | None, float | None], attempt: _Attempt, analysis: str
    ) -> dict[str, str]:
        """ANALYSIS_KEY and INDEX_KEY for a write that leaves the writer as `attempt` says,
        of the lines as `marks` were taken (none while no analysis is given: the head then
        has neither)."""
        if self.analysis is None:
            return {}
        written_bytes, tick_at, kept_tick_at = marks
        index = _Index(
            written_bytes=written_bytes,
            tail_lines=attempt.members_lines,
            tail_bytes=attempt.members_bytes,
            last_at=attempt.last_at,
            tick_at=tick_at,
            data_at=attempt.data_at,
            kept_tick_at=kept_tick_at,
            token=attempt.token,
        )
        return {ANALYSIS_KEY: analysis, INDEX_KEY: index.text()}

    def _lost_tail(self, why: str) -> None:
        """The head's tail is gone (someone replaced or deleted the head): say so in the
        record, before the lines held, and start the tail afresh."""
        if self._members_lines:
            note = NoteEntry(
                at=self._saved_at if self._saved_at is not None else time.time(),
                rollout=self.rollout,
                level="warning",
                message=(
                    f"the record's head ConfigMap {self.namespace}/{self.name} was {why}: "
                    f"the {self._members_lines} entries of its tail after chunk {self.chunks} "
                    "were lost"
                ),
            )
            line = dump_entry(note)
            size = len(line.encode("utf-8")) + 1
            self._lines.insert(0, _hold_line(line))
            self._line_sizes.insert(0, size)
            self._lines_bytes += size
            self.written_bytes += size
        self._members_lines = self._members_bytes = self._tail_parts = 0
        self._kept = None

    def _settled(self, attempt: _Attempt) -> None:
        """A write landed: what it saved leaves the held lines; entries added while it
        awaited stay new."""
        self._attempt = None
        self.chunks += attempt.chunks
        self._tail_parts = attempt.parts
        self._members_lines = attempt.members_lines
        self._members_bytes = attempt.members_bytes
        del self._lines[: attempt.lines]
        del self._line_sizes[: attempt.lines]
        # Sizes as counted when the lines came (encoding them again was ~1% of the loop).
        self._lines_bytes = sum(self._line_sizes)
        self._dirty = bool(self._lines)
        self._saved_at = attempt.last_at
        self.data_through = attempt.data_at
        self.last_error = None

    async def _learn_uid(self, where: str) -> str | None:
        from canary.kubernetes.client import KubeError, NotFound

        try:
            head = await self.api.get_configmap(self.namespace, self.name)
        except NotFound:
            return None  # no head yet: the chunks go without an owner, labelled still
        except KubeError as exc:
            return f"{where}: {exc}"
        self._uid = head.get("metadata", {}).get("uid")
        return None

    async def _put_chunk(
        self, name: str, data: dict[str, str], *, overwrite: bool = True
    ) -> str | None:
        """Create the chunk; one that exists (left by a save that failed) is replaced, or
        (not `overwrite`) raises _Moved."""
        from canary.kubernetes.client import Conflict, KubeError, NotFound

        owner = (
            {"apiVersion": "v1", "kind": "ConfigMap", "name": self.name, "uid": self._uid}
            if self._uid
            else None
        )
        labels = {RECORD_LABEL: self.name}
        version: str | None = None
        keep: Mapping[str, Any] | None = None  # the replaced chunk's metadata (a replace)
        for _ in range(3):
            try:
                await self.api.put_configmap(
                    self.namespace,
                    name,
                    data,
                    resource_version=version,
                    labels=labels,
                    owner=owner,
                    keep=keep,
                )
                return None
            except Conflict:  # left by a save that failed or was killed: not named, ours
                if not overwrite:
                    raise _Moved from None
                try:
                    keep = (await self.api.get_configmap(self.namespace, name))["metadata"]
                    version = keep["resourceVersion"]
                except NotFound:
                    version = None
                except KubeError as exc:
                    return str(exc)
            except NotFound:
                version = None
            except KubeError as exc:
                return str(exc)
        return "kept changing while being written"

    async def _put_head(
        self, data: dict[str, str], *, settle: bool = True, keep: Mapping[str, Any] | None
    ) -> str | None:
        """Write the head over the version read, with `keep` (others' metadata on it as
        read); with `settle`, a Conflict re-reads the version (and what others set) and a
        NotFound creates it again (else they raise _Moved)."""
        from canary.kubernetes.client import Conflict, KubeError, NotFound

        for _ in range(3):  # a conflict re-reads the version: this record is ours
            try:
                result = await self.api.put_configmap(
                    self.namespace,
                    self.name,
                    data,
                    resource_version=self._resource_version,
                    labels={RECORD_LABEL: self.name},
                    keep=keep,
                )
            except (Conflict, NotFound) as exc:
                if not settle:
                    raise _Moved from None
                if isinstance(exc, NotFound):  # deleted under us: create it again
                    self._resource_version = None
                    continue
                # created before (a restart), or written by an earlier attempt
                try:
                    current = await self.api.get_configmap(self.namespace, self.name)
                    self._resource_version = current["metadata"]["resourceVersion"]
                    self._uid = current["metadata"].get("uid") or self._uid
                    keep = self._hold_others(current["metadata"])
                except NotFound:
                    self._resource_version = None
                except KubeError as exc:
                    return str(exc)
                continue
            except KubeError as exc:
                return str(exc)
            metadata = result.get("metadata", {})
            self._resource_version = metadata.get("resourceVersion")
            self._uid = metadata.get("uid") or self._uid
            self._hold_others(metadata)
            return None
        return "kept changing while being written"

    def resume(
        self, head: Mapping[str, Any], entries: Sequence[Entry], *, record_bytes: int | None = None
    ) -> None:
        """Carry on the record read from `head`: its chunks and its tail stay where they
        are, the next save adds to them. A record in the whole format (an older canary's)
        becomes held lines: the next save seals them into chunks and rewrites the head in
        this format. `record_bytes`: the chunked record's lines in UTF-8 as read (else the
        entries are serialized again to count them: most of this method's cost)."""
        metadata = head.get("metadata", {})
        self._resource_version = metadata.get("resourceVersion")
        self._uid = metadata.get("uid")
        self._hold_others(metadata)
        data = _data_of(head)
        self._lines, self._line_sizes, self._lines_bytes = [], [], 0
        self._members_lines = self._members_bytes = self._tail_parts = 0
        self._attempt = self._kept = None
        if is_chunked(head):
            self.record_id = str(data.get(ID_KEY) or self.record_id)
            self.chunks = _chunk_count(head, _name_of(head))
            parts = _parts(data, self.name)
            self._tail_parts = parts[-1][0] if parts else 0
            budget = MAX_UNPACKED_RECORD_BYTES
            for key in [TAIL_KEY] + [key for _, key in parts]:
                tail = _unpack_text(data.get(key), name=self.name, key=key, budget=budget)
                budget -= len(tail)
                for line in tail.splitlines():
                    if line.strip():
                        self._members_lines += 1
                        self._members_bytes += len(line.encode("utf-8")) + 1
            self.written_bytes = (
                record_bytes
                if record_bytes is not None
                else sum(len(dump_entry(e).encode("utf-8")) + 1 for e in entries)
            )
            self._rewrite = False
        else:
            self.chunks = 0
            self.written_bytes = 0
            for entry in entries:
                self._add_line(dump_entry(entry))
            self._rewrite = True  # converted: save it in this format
        self._dirty = self._rewrite
        ticks = [e for e in entries if isinstance(e, TickEntry)]
        self._kept_tick_at = self._tick_at = ticks[-1].at if ticks else None
        self._data_at = max((t.at for t in ticks if t.verdict is not None), default=None)
        self._thinning_noted = self.written_bytes >= self.budget_bytes
        self._last_at = self._saved_at = entries[-1].at if entries else None

    def resume_head(self, head: Mapping[str, Any], index: _Index) -> None:
        """Carry on the chunked record whose head is `head` from its index alone: as
        resume() does, without reading, unpacking or counting any of its lines."""
        metadata = head.get("metadata", {})
        data = _data_of(head)
        name = _name_of(head)
        chunks = _chunk_count(head, name)
        parts = _parts(data, self.name)
        self._resource_version = metadata.get("resourceVersion")
        self._uid = metadata.get("uid")
        self._hold_others(metadata)
        self._lines, self._line_sizes, self._lines_bytes = [], [], 0
        self._attempt = self._kept = None
        self._rewrite = self._dirty = False
        self.record_id = str(data.get(ID_KEY) or self.record_id)
        self.chunks = chunks
        self._tail_parts = parts[-1][0] if parts else 0
        self._members_lines, self._members_bytes = index.tail_lines, index.tail_bytes
        self.written_bytes = index.written_bytes
        self._kept_tick_at, self._tick_at = index.kept_tick_at, index.tick_at
        self._data_at = index.data_at
        self._thinning_noted = self.written_bytes >= self.budget_bytes
        self._last_at = self._saved_at = index.last_at

    def _failed(self, message: str) -> str:
        self.last_error = message
        return message


async def load_record_configmap(
    api: ConfigMapApi, *, namespace: str, rollout: str, gaps: bool = False
) -> list[Entry]:
    """A rollout's record read from its ConfigMaps. Raises RecordError naming them (with
    `gaps`, as read_record_configmap's, only for its head)."""
    from canary.kubernetes.client import KubeError

    name = configmap_name(rollout)
    try:
        configmap = await api.get_configmap(namespace, name)
    except KubeError as exc:
        raise RecordError(f"record ConfigMap {namespace}/{name}: {exc}") from None
    return await read_record_configmap(api, configmap, gaps=gaps)


class ConfigMapRecord:
    """The runner's RecordSink on ConfigMaps (canary.runner.seams.RecordSink).

    Entries go to the writer's tail (bounded: see ConfigMapRecordWriter), and the record is
    saved at most every `flush_s` (on the monotonic clock), at once after any entry that is
    not a tick (a decision must not wait), and whenever the runner forces it. Only while
    `may_write()`: a replica that lost its Lease writes nothing. A failed write raises
    RecordWriteError; the runner counts it, shows it in the status and sends a Warning Event.
    """

    def __init__(
        self,
        api: ConfigMapApi,
        *,
        namespace: str,
        rollout: str,
        max_bytes: int = MAX_CONFIGMAP_BYTES,
        flush_s: float = 60.0,
        may_write: Callable[[], bool] = lambda: True,
        ref: str | None = None,
        seal_bytes: int = SEAL_BYTES,
    ) -> None:
        self.writer = ConfigMapRecordWriter(
            api, namespace=namespace, rollout=rollout, max_bytes=max_bytes, seal_bytes=seal_bytes
        )
        self.api = api
        self.flush_s = flush_s
        self.may_write = may_write
        self._read_ref = ref  # the record a saved state names, read back on resume
        self._flushed_at = 0.0
        self._important = False
        self._carried: str | None = None  # the metric source's state read with the head

    def carry_from(self, source: Callable[[], str | None]) -> None:
        """Save what `source` gives (the metric source's counting state) with each write of
        the head, for the replica that carries the rollout on (canary.runner.seams)."""
        self.writer.carry = source

    def take_carried(self) -> str | None:
        """The metric source's state that `read` found with the record, once."""
        carried, self._carried = self._carried, None
        return carried

    def keep_analysis_with(self, source: Callable[[], str | None]) -> None:
        """Save what `source` gives (the runner's analysis state, as of the lines appended
        so far) and where the record ends with each write of the head, so that a resume
        reads the head alone (read_head)."""
        self.writer.analysis = source

    async def read_head(self) -> SavedHead | None:
        """What a resume needs from the saved record without reading it: the analysis state
        and the index its last write saved with the head. The writer then carries on from
        the head, as after read(). None when the head holds none (a record an older canary
        wrote, a write without the state, a head that cannot be read: read() says why)."""
        from canary.kubernetes.client import KubeError  # the adapter's only seam

        if not self._read_ref:
            return None
        namespace, _, name = self._read_ref.partition("/")
        try:
            head = await self.api.get_configmap(namespace, name)
        except KubeError:
            return None
        data = _data_of(head)
        analysis = data.get(ANALYSIS_KEY)
        if not is_chunked(head) or not isinstance(analysis, str) or not analysis:
            return None
        try:
            index = _Index.parse(data.get(INDEX_KEY), _name_of(head), data.get(WRITE_KEY))
            self.writer.resume_head(head, index)
            tail = _Assembler(head)  # holds the tail's packed text alone, not the head
        except RecordError as exc:
            log.info("record %s: its head alone cannot resume it: %s", self._read_ref, exc)
            return None
        carried = data.get(CARRY_KEY)
        self._carried = carried if isinstance(carried, str) else None
        return SavedHead(
            analysis=analysis,
            tick_at=index.tick_at,
            data_at=index.data_at,
            recent=functools.partial(_recent_entries, tail),
        )

    @property
    def ref(self) -> str:
        return f"{self.writer.namespace}/{self.writer.name}"

    @property
    def label(self) -> str:
        return f"configmap {self.ref}"

    @property
    def data_through(self) -> float | None:
        return self.writer.data_through

    async def append(self, entry: Entry) -> None:
        self.writer.add(entry)
        if not isinstance(entry, TickEntry):
            self._important = True

    async def flush(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        due = now - self._flushed_at >= self.flush_s
        if not (force or due or self._important) or not self.writer.dirty:
            return False
        if not self.may_write():
            return False
        error = await self.writer.save()
        if error is not None:
            raise RecordWriteError(error)
        self._flushed_at = now
        self._important = False
        return True

    async def read(self) -> list[Entry]:
        """The saved record's entries (a resumed rollout carries on in the same record); an
        unreadable one is logged and the analysis restarts from Prometheus. The entries are
        the caller's to replay and drop: this sink keeps only the tail."""
        from canary.kubernetes.client import KubeError  # the adapter's only seam

        if not self._read_ref:
            return []
        namespace, _, name = self._read_ref.partition("/")
        try:
            head = await self.api.get_configmap(namespace, name)
            entries, record_bytes = await _read_record(self.api, head)
            carried = _data_of(head).get(CARRY_KEY)
            self._carried = carried if isinstance(carried, str) else None
            # off the loop: it unpacks the head's tail parts (~1 ms; a thousand rollouts
            # resume at once when a shard moves)
            await run_blocking(
                "packing", self.writer.resume, head, entries, record_bytes=record_bytes
            )
        except (KubeError, RecordError) as exc:
            log.warning(
                "record %s unreadable, analysis restarts from Prometheus: %s", self._read_ref, exc
            )
            return []
        return entries
