"""Records in a Kubernetes ConfigMap: compressed, and kept under the size limit.

Why: in a cluster the analysis record must outlive the controller's pod, and a ConfigMap per
rollout is the storage the controller already has RBAC for. A ConfigMap holds at most 1 MiB,
and a long rollout ticking every 10 s can exceed that even gzipped, so old ticks are thinned.

Thinning loses no totals: counts in a record are cumulative since the analysis began, so a
kept tick carries everything before it, and the last tick's numbers are exact. What is lost
is time resolution of the older part of the charts. The ticks a report explains from are
always kept: the first, the last `keep_recent`, every tick whose verdict changed, and every
tick where the step or the weight changed. The record then says so in a note.

The packing is pure. `ConfigMapRecordWriter` is the thin adapter that keeps one rollout's
record in its ConfigMap through `canary.kubernetes.client.Kube` (or anything with its two ConfigMap
methods): it never raises, a failed write comes back as a message for the caller to log and
count, and the next write retries with the whole record. The operator keeps its rollouts'
records through it too, calling `save()` at the moments its own ordering needs. `canary
report` reads a ConfigMap dumped with `kubectl get configmap NAME -o json`, or
`load_record_configmap` reads it live.

Exception tree::

    RecordError (canary.core.records)
    ├── RecordTooLarge      even the thinnest record does not fit the limit
    └── (plain)             a ConfigMap that holds no readable record
"""

from __future__ import annotations

import base64
import binascii
import gzip
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from canary.core.inputs import InputError, decode_text, excerpt, gunzip_bounded, load_json
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
from canary.runner.seams import RecordWriteError

log = logging.getLogger("canary.kubernetes.record_store")

__all__ = [
    "MAX_CONFIGMAP_BYTES",
    "RECORD_KEY",
    "ConfigMapApi",
    "ConfigMapRecord",
    "ConfigMapRecordWriter",
    "RecordTooLarge",
    "configmap_name",
    "downsample",
    "load_record_configmap",
    "looks_like_configmap",
    "pack_record",
    "unpack_record",
]

RECORD_KEY = "record.jsonl.gz.b64"
# 1 MiB is the API server's limit for the whole object; leave room for metadata.
MAX_CONFIGMAP_BYTES = 1_000_000
# What `unpack_record` accepts (a dump read from a file is not held to the API's limit).
_MAX_PACKED_CHARS = 4 * MAX_CONFIGMAP_BYTES


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


def unpack_record(configmap: Mapping[str, Any]) -> list[Entry]:
    """The entries of a ConfigMap written from `pack_record`: either the whole object (as
    `kubectl get configmap -o json` prints it) or its `data`."""
    data = configmap.get("data", configmap)
    metadata = configmap.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    name = excerpt(name, 80).strip("'") if isinstance(name, str) and name else "configmap"
    if not isinstance(data, Mapping) or RECORD_KEY not in data:
        raise RecordError(f"{name}: no {RECORD_KEY} key: not a canary record ConfigMap")
    packed = data[RECORD_KEY]
    if not isinstance(packed, str | bytes) or len(packed) > _MAX_PACKED_CHARS:
        what = f"{len(packed)} characters" if isinstance(packed, str | bytes) else "not text"
        raise RecordError(f"{name}: {RECORD_KEY} is not base64 gzip text of a record ({what})")
    try:
        # Bounded: a gzip bomb of 1 MB would unpack to a gigabyte.
        unpacked = gunzip_bounded(base64.b64decode(packed, validate=True), source=name)
        text = decode_text(unpacked, source=name)
    except binascii.Error as exc:
        raise RecordError(f"{name}: {RECORD_KEY} is not base64 gzip text: {exc}") from None
    except InputError as exc:
        message = str(exc).removeprefix(f"{name}: ")
        raise RecordError(f"{name}: {RECORD_KEY} is not base64 gzip text: {message}") from None
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
    return None


class ConfigMapApi(Protocol):
    """The two calls of canary.kubernetes.client.Kube this adapter needs."""

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]: ...

    async def put_configmap(
        self,
        namespace: str,
        name: str,
        data: dict[str, str],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]: ...


class ConfigMapRecordWriter:
    """Keeps one rollout's record in its own ConfigMap. Never raises for API errors.

    Entries other than ticks are saved at once (a decision must not be lost); ticks at most
    every `save_every_s` of record time, so a 10 s cadence does not rewrite a large object
    each tick. `flush()` saves whatever is pending.
    """

    def __init__(
        self,
        api: ConfigMapApi,
        *,
        namespace: str,
        rollout: str,
        max_bytes: int = MAX_CONFIGMAP_BYTES,
        save_every_s: float = 30.0,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = configmap_name(rollout)
        self.max_bytes = max_bytes
        self.save_every_s = save_every_s
        self.entries: list[Entry] = []
        self.last_error: str | None = None
        self._resource_version: str | None = None
        self._saved_at: float | None = None
        self._dirty = False

    async def append(self, entry: Entry) -> str | None:
        """Add an entry and save when due. Returns why the save failed, or None."""
        self.entries.append(entry)
        self._dirty = True
        due = (
            not isinstance(entry, TickEntry)
            or self._saved_at is None
            or entry.at - self._saved_at >= self.save_every_s
        )
        return await self.flush() if due else None

    async def flush(self) -> str | None:
        """Save the record if anything is pending. Returns why it failed, or None."""
        if not self._dirty or not self.entries:
            return None
        return await self.save()

    async def save(self) -> str | None:
        """Save the whole record now, pending or not. Returns why it failed, or None."""
        from canary.kubernetes.client import (  # the adapter's only seam
            Conflict,
            KubeError,
            NotFound,
        )

        where = f"record ConfigMap {self.namespace}/{self.name}"
        try:
            # Gzip of up to a MiB of record is CPU work: off the event loop.
            data = await run_blocking(
                "packing", pack_record, list(self.entries), max_bytes=self.max_bytes
            )
        except RecordError as exc:
            return self._failed(f"{where}: {exc}")
        for _ in range(3):  # a conflict re-reads the version: this record is ours
            try:
                result = await self.api.put_configmap(
                    self.namespace, self.name, data, resource_version=self._resource_version
                )
            except Conflict:  # created before (a restart), or written by an earlier attempt
                try:
                    current = await self.api.get_configmap(self.namespace, self.name)
                    self._resource_version = current["metadata"]["resourceVersion"]
                except NotFound:
                    self._resource_version = None
                except KubeError as exc:
                    return self._failed(f"{where}: {exc}")
                continue
            except NotFound:  # deleted under us: create it again
                self._resource_version = None
                continue
            except KubeError as exc:
                return self._failed(f"{where}: {exc}")
            self._resource_version = result.get("metadata", {}).get("resourceVersion")
            self._saved_at = self.entries[-1].at
            self._dirty = False
            self.last_error = None
            return None
        return self._failed(f"{where}: kept changing while being written")

    def _failed(self, message: str) -> str:
        self.last_error = message
        return message


async def load_record_configmap(api: ConfigMapApi, *, namespace: str, rollout: str) -> list[Entry]:
    """A rollout's record read from its ConfigMap. Raises RecordError naming it."""
    from canary.kubernetes.client import KubeError

    name = configmap_name(rollout)
    try:
        configmap = await api.get_configmap(namespace, name)
    except KubeError as exc:
        raise RecordError(f"record ConfigMap {namespace}/{name}: {exc}") from None
    return unpack_record(configmap)


class ConfigMapRecord:
    """The runner's RecordSink on a ConfigMap (canary.runner.seams.RecordSink).

    Entries are kept in memory and the ConfigMap is rewritten at most every `flush_s` (on
    the monotonic clock), at once after any entry that is not a tick (a decision must not
    wait), and whenever the runner forces it. Only while `may_write()`: a replica that lost
    its Lease writes nothing. A failed write raises RecordWriteError; the runner counts it,
    shows it in the status and sends a Warning Event.
    """

    def __init__(
        self,
        api: ConfigMapApi,
        *,
        namespace: str,
        rollout: str,
        max_bytes: int = MAX_CONFIGMAP_BYTES,
        flush_s: float = 30.0,
        may_write: Callable[[], bool] = lambda: True,
        ref: str | None = None,
    ) -> None:
        self.writer = ConfigMapRecordWriter(
            api, namespace=namespace, rollout=rollout, max_bytes=max_bytes
        )
        self.api = api
        self.flush_s = flush_s
        self.may_write = may_write
        self._read_ref = ref  # the record a saved state names, read back on resume
        self._flushed_at = 0.0
        self._important = False

    @property
    def ref(self) -> str:
        return f"{self.writer.namespace}/{self.writer.name}"

    @property
    def label(self) -> str:
        return f"configmap {self.ref}"

    @property
    def entries(self) -> list[Entry]:
        return self.writer.entries

    async def append(self, entry: Entry) -> None:
        self.writer.entries.append(entry)
        if not isinstance(entry, TickEntry):
            self._important = True

    async def flush(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        due = now - self._flushed_at >= self.flush_s
        if not (force or due or self._important) or not self.writer.entries:
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
        """The saved record's entries (a resumed rollout carries on in the same list); an
        unreadable one is logged and the analysis restarts from Prometheus."""
        from canary.kubernetes.client import KubeError  # the adapter's only seam

        if not self._read_ref:
            return list(self.writer.entries)
        namespace, _, name = self._read_ref.partition("/")
        try:
            configmap = await self.api.get_configmap(namespace, name)
            entries = await run_blocking("packing", unpack_record, configmap)
        except (KubeError, RecordError) as exc:
            log.warning(
                "record %s unreadable, analysis restarts from Prometheus: %s", self._read_ref, exc
            )
            return []
        self.writer.entries[:0] = entries
        return entries
