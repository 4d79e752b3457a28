"""Records written in chunks (canary.kubernetes.record_store), against the API emulator with
the real kubernetes-asyncio client: each write stays small whatever the record's age, the
writer holds only its tail, a record reads back whole (live, or from a `kubectl` dump), an
older whole-format record is still read and carried on, a write cut between a chunk and the
head leaves a readable record, and hostile chunks are clear errors. The same on the real
control plane, with a SIGKILL and a resume: tests/cluster/test_records_on_cluster.py."""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.kube import THEIRS
from support.kube_emulator import KubeEmulator
from support.report_records import Scenario, simulate

from canary.cli.report import main as report_main
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
from canary.kubernetes import record_store
from canary.kubernetes.client import Conflict, Kube, KubeError, RetryPolicy, Unavailable
from canary.kubernetes.record_store import (
    ANALYSIS_KEY,
    CARRY_KEY,
    CHUNK_READS,
    INDEX_KEY,
    MERGE_MEMBERS,
    RECORD_LABEL,
    WRITE_KEY,
    ConfigMapRecord,
    ConfigMapRecordWriter,
    chunk_name,
    configmap_name,
    is_chunked,
    load_record_configmap,
    pack_record,
    read_record_configmap,
    unpack_record,
)

NS = "canary-system"
SEAL = 32 << 10  # small chunks, so a short test makes many


@pytest.fixture(scope="module")
def long_record() -> list[Entry]:
    """120 ticks of a rollout that never decides (about 4.7 KB of JSON a tick), then an end."""
    dicts = simulate(
        Scenario(seed=5, canary_error_rate=0.01, ticks_per_step=10**9, max_ticks=120, tick_s=10)
    )
    entries = list(parse_lines(json.dumps(d) for d in dicts))
    assert isinstance(entries[-1], TickEntry)
    return entries


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[tuple[KubeEmulator, Kube]]:
    async with KubeEmulator() as emulator:
        config = emulator.write_kubeconfig(tmp_path / "kubeconfig", token="t", context="test")
        client = await Kube.connect(
            kubeconfig=str(config),
            context="test",
            retry=RetryPolicy(attempts=2, initial_delay_s=0.01, max_delay_s=0.02),
        )
        try:
            yield emulator, client
        finally:
            await client.close()


def _writes(emulator: KubeEmulator) -> list[Any]:
    return [
        r
        for r in emulator.requests
        if r.resource == "configmaps" and r.verb in ("create", "update") and r.status < 300
    ]


def _name(write: Any) -> str:
    return str(write.name or write.body["metadata"]["name"])  # a create names it in its body


def _record_objects(emulator: KubeEmulator, head: str) -> list[dict[str, Any]]:
    return [
        o
        for k, o in emulator.objects.items()
        if k[2] == "configmaps" and (o["metadata"].get("labels") or {}).get(RECORD_LABEL) == head
    ]


async def test_a_long_record_is_written_in_small_writes_and_reads_back_whole(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """Every 30 s of ticks is one small write (the head, and now and then one new chunk);
    no write grows with the record's age, the writer holds only its tail, and the record
    read back (live, and by `canary report` from a labelled dump) is every entry in order."""
    emulator, client = kube
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(
        client, namespace=NS, rollout=rollout, save_every_s=30, seal_bytes=SEAL
    )
    most_pending = most_held = 0
    for entry in long_record:
        assert await writer.append(entry) is None
        most_pending = max(most_pending, writer.pending)
        most_held = max(most_held, writer.held_bytes)
    assert await writer.flush() is None

    head = configmap_name(rollout)
    raw = sum(len(json.dumps(e.model_dump(mode="json", by_alias=True))) for e in long_record)
    # a chunk closes once it reaches SEAL: between SEAL and SEAL plus one save's worth
    assert raw // SEAL >= writer.chunks >= raw // SEAL * 3 // 4 >= 10, (writer.chunks, raw)
    writes = _writes(emulator)
    assert len(writes) <= len(long_record) // 3 + writer.chunks + 2  # one save per 30 s
    sizes = [len(json.dumps(w.body["data"])) for w in writes]
    # A write is one chunk or the head's tail: both under a sealed chunk's packed size, and
    # the last writes are no bigger than the first ones (nothing is rewritten).
    assert max(sizes) < SEAL // 3, sizes
    assert max(sizes[-20:]) <= 2 * max(sizes[:20]), sizes
    chunk_writes = [w for w in writes if _name(w) != head]
    assert [_name(w) for w in chunk_writes] == [
        chunk_name(head, n) for n in range(1, writer.chunks + 1)
    ]
    assert all(w.verb == "create" for w in chunk_writes), "a chunk is written once"
    # The tail in memory is bounded by the seal size, not by the record's age.
    assert most_pending * 4000 < 2 * SEAL, most_pending
    # ... and held packed: what is saved stays gzipped in memory, only new lines are not
    assert most_held < SEAL // 2, most_held

    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record

    # The chunks are owned by the head (deleting it deletes them) and labelled with it.
    objects = _record_objects(emulator, head)
    assert len(objects) == writer.chunks + 1
    uid = emulator.get("", "v1", "configmaps", NS, head)["metadata"]["uid"]
    for obj in objects:
        if obj["metadata"]["name"] != head:
            (owner,) = obj["metadata"]["ownerReferences"]
            assert owner == {"apiVersion": "v1", "kind": "ConfigMap", "name": head, "uid": uid}
    dump = {"apiVersion": "v1", "kind": "List", "items": objects[::-1]}
    assert unpack_record(dump) == long_record
    with pytest.raises(RecordError, match=rf"{head}: the record has {writer.chunks} chunks"):
        unpack_record(emulator.get("", "v1", "configmaps", NS, head))


@pytest.mark.parametrize("save_every_s", [30, 60])
async def test_the_tail_is_stored_about_as_small_as_one_gzip_stream(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry], save_every_s: float
) -> None:
    """Each save adds its lines to the head as a gzip member of their own (a part), and
    members compress apart worse than one stream (three ticks a member: ~1.45x; six, the
    operator's minute between saves: ~1.2x); past MERGE_MEMBERS parts the head is rewritten
    with them packed again as one, so the tail in the head stays close to one stream's
    size. The writer holds none of it: only the lines added since its last save."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, save_every_s=save_every_s)
    stored, one_stream, most_parts = 0, 0, 0
    for entry in long_record:
        assert await writer.append(entry) is None
        if not writer.dirty:  # just saved: the writer holds nothing
            assert writer.held_bytes == 0
            data = emulator.get("", "v1", "configmaps", NS, head)["data"]
            keys = sorted(k for k in data if k.startswith("record.tail."))
            most_parts = max(most_parts, len(keys) - 1)
            packed = b"".join(base64.b64decode(data[k]) for k in keys)
            stored += len(packed)
            one_stream += len(gzip.compress(gzip.decompress(packed), compresslevel=6, mtime=0))
    assert writer.chunks >= 3
    assert 2 <= most_parts <= MERGE_MEMBERS
    assert stored < 1.25 * one_stream, stored / one_stream  # summed over every save
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record


async def test_lines_waiting_for_a_save_are_held_deflated_and_saved_exactly(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """Between saves (a minute of ticks at 1,000 rollouts is ~25 MiB of JSON) the new lines
    are held deflated against a dictionary: several times smaller than their JSON, and the
    record saved from them is the same entries."""
    _, client = kube
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, save_every_s=1e9)
    ticks = [e for e in long_record if isinstance(e, TickEntry)][:40]
    for entry in ticks:
        writer.add(entry)
    assert writer.pending == len(ticks) and writer.dirty
    as_json = writer._lines_bytes
    assert writer.held_bytes * 4 < as_json, (writer.held_bytes, as_json)
    assert await writer.flush() is None
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == ticks


def test_a_held_line_is_what_a_new_compressor_gives_and_reads_back(
    long_record: list[Entry],
) -> None:
    """Lines are held with copies of one compressor primed with the dictionary: the bytes a
    compressor made for each line would give, whatever lines came before (a copy never
    carries one line's history into the next), and each reads back as its line."""
    lines = [dump_entry(e) for e in long_record[:60]] + ["", "{}", "\u00e9" * 5000]
    for line in lines + lines[::-1]:
        fresh = zlib.compressobj(
            6, zlib.DEFLATED, -13, 6, zlib.Z_DEFAULT_STRATEGY, record_store._pending_dict()
        )
        held = record_store._hold_line(line)
        assert held == fresh.compress(line.encode("utf-8")) + fresh.flush()
        assert record_store._held_line(held) == line


async def test_canary_report_reads_a_chunked_record_and_a_labelled_dump(
    kube: tuple[KubeEmulator, Kube],
    long_record: list[Entry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`canary report ROLLOUT -n NS` reassembles the chunks from the cluster, and `canary
    report dump.json` from `kubectl get configmap -l canary.io/record=HEAD -o json`."""
    emulator, client = kube
    rollout = long_record[0].rollout
    writer = await _written(client, long_record)
    assert writer.chunks > 3
    config = emulator.write_kubeconfig(tmp_path / "kc", token="t", context="test")
    code = await asyncio.to_thread(
        report_main,
        [rollout, "-n", NS, "--kubeconfig", str(config), "--format", "json", "-o", "-"],
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rollout"] == rollout
    assert report["tick_count"] == sum(isinstance(e, TickEntry) for e in long_record)
    assert report["started_at"] == long_record[0].at
    assert report["final_canary"]["requests"] == long_record[-1].canary.requests  # type: ignore[union-attr]
    dump = tmp_path / "dump.json"
    items = _record_objects(emulator, configmap_name(rollout))
    dump.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    assert report_main([str(dump), "--format", "json", "-o", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == report


async def test_an_old_whole_record_is_read_and_resumed_into_chunks(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A record an older canary wrote whole (`record.jsonl.gz.b64`) is read as before; a
    rollout resumed on it carries on, and its next save rewrites it as chunks + head without
    losing an entry."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    half = len(long_record) // 2
    old = {"metadata": {"name": head, "namespace": NS}, "data": pack_record(long_record[:half])}
    emulator.put("", "v1", "configmaps", old)
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record[:half]

    sink = ConfigMapRecord(
        client, namespace=NS, rollout=rollout, ref=f"{NS}/{head}", seal_bytes=SEAL
    )
    assert await sink.read() == long_record[:half]
    for entry in long_record[half:]:
        await sink.append(entry)
        await sink.flush(force=True)
    stored = emulator.get("", "v1", "configmaps", NS, head)
    assert is_chunked(stored) and sink.writer.chunks >= 3
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record


async def test_a_resumed_chunked_record_carries_on_in_the_same_chunks(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A restarted controller reads the chunks and the tail, keeps only the tail, and its
    saves go on from the next chunk: the record is whole, no chunk is written twice."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    first = ConfigMapRecord(client, namespace=NS, rollout=rollout, seal_bytes=SEAL, flush_s=0)
    cut = len(long_record) * 2 // 3
    for entry in long_record[:cut]:
        await first.append(entry)
        await first.flush()
    chunks_before = first.writer.chunks
    assert chunks_before >= 3 and first.writer.pending > 0
    stored = emulator.get("", "v1", "configmaps", NS, head)["data"]
    assert any(key.startswith("record.tail.0") for key in stored), "the tail has parts"

    second = ConfigMapRecord(
        client, namespace=NS, rollout=rollout, ref=f"{NS}/{head}", seal_bytes=SEAL, flush_s=0
    )
    assert await second.read() == long_record[:cut]
    assert second.writer.chunks == chunks_before
    assert second.writer.pending == first.writer.pending  # the tail only is held again
    # counted from the chunks as read, not by serializing every entry again
    assert second.writer.written_bytes == first.writer.written_bytes
    for entry in long_record[cut:]:
        await second.append(entry)
        await second.flush()
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record
    chunk_creates = [_name(w) for w in _writes(emulator) if _name(w) != head]
    assert len(chunk_creates) == len(set(chunk_creates)) == second.writer.chunks


async def test_the_metric_sources_state_is_saved_with_the_head_and_taken_once(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """What the metric source gives (canary.metrics.batched: its counting state) goes into
    the head with every save, appended or rewritten; a save when it has nothing (or fails)
    keeps the head's last one; chunks never hold it; readers of the record ignore it; one
    too large for the head is not saved; a resumed sink hands it over once."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    record = ConfigMapRecord(client, namespace=NS, rollout=rollout, seal_bytes=SEAL, flush_s=0)
    states = itertools.cycle(["state-a", None, "state-b", "boom", None, "state-c"])
    given: list[str | None] = []

    def source() -> str | None:
        state = next(states)
        given.append(state)
        if state == "boom":
            raise RuntimeError("a bug in the source")
        return state

    record.carry_from(source)
    latest: str | None = None
    for entry in long_record:
        await record.append(entry)
        assert await record.flush()
        if given[-1] not in (None, "boom"):
            latest = given[-1]
        stored = emulator.get("", "v1", "configmaps", NS, head)["data"]
        assert stored.get(CARRY_KEY) == latest, (len(given), given[-1])
    assert record.writer.chunks >= 3  # the head was rewritten (and chunks sealed) meanwhile
    assert set(given) == {"state-a", None, "state-b", "boom", "state-c"}
    for obj in _record_objects(emulator, head):
        if obj["metadata"]["name"] != head:
            assert CARRY_KEY not in obj["data"]
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record

    small = ConfigMapRecord(client, namespace=NS, rollout="small@1", max_bytes=8000)
    small.carry_from(lambda: "x" * 1001)  # over an eighth of its object limit: not saved
    await small.append(long_record[0].model_copy(update={"rollout": "small@1"}))
    assert await small.flush()
    assert (
        CARRY_KEY not in emulator.get("", "v1", "configmaps", NS, configmap_name("small@1"))["data"]
    )

    resumed = ConfigMapRecord(client, namespace=NS, rollout=rollout, ref=f"{NS}/{head}")
    assert resumed.take_carried() is None  # nothing read yet
    assert await resumed.read() == long_record
    assert resumed.take_carried() == latest
    assert resumed.take_carried() is None


_RESUMED_FIELDS = (
    "chunks",
    "record_id",
    "written_bytes",
    "_tail_parts",
    "_members_lines",
    "_members_bytes",
    "_kept_tick_at",
    "_tick_at",
    "_data_at",
    "_last_at",
    "_saved_at",
    "_resource_version",
    "_thinning_noted",
    "_rewrite",
    "_dirty",
)


async def test_the_head_alone_resumes_a_record_as_reading_it_whole_does(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the runner's analysis state given, every save puts in the head the state as of
    the very lines it saves, and an index of where the record ends that agrees with reading
    it whole. A resume from the head alone (read_head: one GET, no chunk read) leaves the
    writer as reading the whole record does, and the record it carries on is whole. A head
    without a state, or with a damaged index, is not resumed from alone."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    record = ConfigMapRecord(client, namespace=NS, rollout=rollout, seal_bytes=SEAL, flush_s=0)
    appended = 0
    record.keep_analysis_with(lambda: f"analysis after {appended} entries")
    cut = 70
    for entry in long_record[:cut]:
        await record.append(entry)
        appended += 1
        if appended % 3 == 0 or not isinstance(entry, TickEntry):
            assert await record.flush(force=True)
            data = emulator.get("", "v1", "configmaps", NS, head)["data"]
            assert data[ANALYSIS_KEY] == f"analysis after {appended} entries"
            entries, record_bytes = await record_store._read_record(
                client, emulator.get("", "v1", "configmaps", NS, head)
            )
            assert entries == long_record[:appended]
            index = record_store._Index.parse(data[INDEX_KEY], head, data[WRITE_KEY])
            ticks = [e for e in entries if isinstance(e, TickEntry)]
            assert index.written_bytes == record_bytes
            assert index.tick_at == (ticks[-1].at if ticks else None)
            assert index.data_at == max((t.at for t in ticks if t.verdict), default=None)
            assert index.last_at == entries[-1].at
    assert await record.flush(force=True)
    assert record.writer.chunks >= 2

    by_head = ConfigMapRecord(client, namespace=NS, rollout=rollout, ref=f"{NS}/{head}")
    whole = ConfigMapRecord(client, namespace=NS, rollout=rollout, ref=f"{NS}/{head}")
    gets = len(emulator.requests)
    saved = await by_head.read_head()
    assert len(emulator.requests) == gets + 1  # the head, and nothing else
    assert saved is not None and saved.analysis == f"analysis after {appended} entries"
    # the latest entries, for the live page (read later, off the loop): the tail's last
    # RECENT_LINES, after the sealed chunks
    assert saved.recent is not None
    recent = saved.recent()
    assert len(emulator.requests) == gets + 1
    assert 2 < len(recent) < cut  # the tail's (sealed chunks before it)
    assert recent == tuple(long_record[cut - len(recent) : cut])
    monkeypatch.setattr(record_store, "RECENT_LINES", 2)
    assert saved.recent() == tuple(long_record[cut - 2 : cut])
    assert await whole.read() == long_record[:cut]
    for field in _RESUMED_FIELDS:
        assert getattr(by_head.writer, field) == getattr(whole.writer, field), field
    by_head.keep_analysis_with(lambda: "carried on")
    for entry in long_record[cut:]:
        await by_head.append(entry)
    assert await by_head.flush(force=True)
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record

    stored = emulator.get("", "v1", "configmaps", NS, head)
    index_values = json.loads(stored["data"][INDEX_KEY])
    damage = (
        (ANALYSIS_KEY, ""),  # the last write had no state to save
        (INDEX_KEY, json.dumps([*index_values[:2], -5, *index_values[3:]])),  # a size < 0
        (WRITE_KEY, "0123abcd"),  # written since by a writer that saves no index
    )
    for key, value in damage:
        emulator.put("", "v1", "configmaps", {**stored, "data": {**stored["data"], key: value}})
        again = ConfigMapRecord(client, namespace=NS, rollout=rollout, ref=f"{NS}/{head}")
        assert await again.read_head() is None, key
        assert await again.read() == long_record  # read whole as before

    # A tail that cannot be read only leaves the live page without the latest ticks: the
    # head still resumes (the next save finds the tail unreadable and says so).
    emulator.put(
        "", "v1", "configmaps", {**stored, "data": {**stored["data"], record_store.TAIL_KEY: "%"}}
    )
    again = ConfigMapRecord(client, namespace=NS, rollout=rollout, ref=f"{NS}/{head}")
    saved = await again.read_head()
    assert saved is not None and saved.recent is not None and saved.recent() == ()


class _LostAnswers:
    """Kube's ConfigMap calls, where the next write of a verb in `lose` lands and then
    fails as if its answer were lost (a timeout), or as its retry would (a Conflict)."""

    def __init__(self, client: Kube, error: KubeError) -> None:
        self.client, self.error = client, error
        self.lose: set[str] = set()
        self.lost: list[str] = []

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        return await self.client.get_configmap(namespace, name)

    def _maybe_lose(self, verb: str, name: str) -> None:
        if verb in self.lose and "--" not in name:  # the head's writes
            self.lose.discard(verb)
            self.lost.append(verb)
            raise self.error

    async def put_configmap(
        self, namespace: str, name: str, data: dict[str, str], **kwargs: Any
    ) -> dict[str, Any]:
        result = await self.client.put_configmap(namespace, name, data, **kwargs)
        self._maybe_lose("put", name)
        return result

    async def patch_configmap(
        self, namespace: str, name: str, data: dict[str, str], **kwargs: Any
    ) -> dict[str, Any]:
        result = await self.client.patch_configmap(namespace, name, data, **kwargs)
        self._maybe_lose("patch", name)
        return result


@pytest.mark.parametrize("verb", ["patch", "put"])
@pytest.mark.parametrize("error", [Unavailable("timed out"), Conflict("conflict")])
async def test_a_save_whose_answer_is_lost_is_neither_lost_nor_written_twice(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry], verb: str, error: KubeError
) -> None:
    """A write to the head that lands but whose answer is lost (or whose retry meets the
    Conflict its own success made) is settled by the next save from the head's write
    token: every entry is in the record once."""
    _, client = kube
    api = _LostAnswers(client, error)
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(api, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    failed = 0
    for index, entry in enumerate(long_record):
        if index in (20, 60, 100):
            api.lose.add(verb)
        failed += await writer.append(entry) is not None
    assert await writer.flush() is None
    assert api.lost == [verb] * 3
    assert failed >= (3 if isinstance(error, Unavailable) else 0)
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record


async def _just_short_of_sealing(writer: ConfigMapRecordWriter, record: list[Entry]) -> int:
    """Save the record's first entries until a chunk is sealed and the tail holds a few, then
    up to just short of sealing again: the next entry makes a chunk. Returns its index."""
    index = 0
    while writer.chunks == 0 or writer.pending < 3:
        assert await writer.append(record[index]) is None
        index += 1
    while writer.pending_bytes + len(dump_entry(record[index])) + 1 < SEAL:
        assert await writer.append(record[index]) is None
        index += 1
    assert await writer.flush() is None
    return index


async def test_a_save_cut_between_chunk_and_head_leaves_a_readable_record(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A chunk created but the head write failing (as a kill between the two would leave
    it): the record reads as before the save, the unnamed chunk is ignored, and the next
    save overwrites it and names it."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    index = await _just_short_of_sealing(writer, long_record)
    before = await load_record_configmap(client, namespace=NS, rollout=rollout)
    assert before == long_record[:index]
    chunks = writer.chunks
    tick = long_record[index]
    emulator.inject(503, times=10, verb="update", resource="configmaps")
    error = await writer.append(long_record[index].model_copy(update={"at": tick.at + 60}))
    assert error is not None and f"record ConfigMap {NS}/{head}: " in error
    orphan = emulator.get("", "v1", "configmaps", NS, chunk_name(head, chunks + 1))
    assert orphan is not None, "the chunk was created before the head failed"
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == before
    emulator.faults.clear()
    assert await writer.flush() is None
    after = await load_record_configmap(client, namespace=NS, rollout=rollout)
    assert len(after) == index + 1 and writer.chunks == chunks + 1


def _gzip_b64(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data)).decode()


@pytest.mark.parametrize(
    ("chunk_data", "message"),
    [
        ({"record.chunk.jsonl.gz.b64": _gzip_b64(b"\0" * (64 << 20))}, "unpacks to more than"),
        ({"record.chunk.jsonl.gz.b64": "x" * (5 << 20)}, "5242880 characters"),
        ({"record.chunk.jsonl.gz.b64": "not base64!"}, "not base64 gzip text"),
        ({"record.id": "someone-else"}, "not chunk 1 of record"),
    ],
)
async def test_hostile_chunks_are_clear_errors(
    kube: tuple[KubeEmulator, Kube],
    long_record: list[Entry],
    chunk_data: dict[str, str],
    message: str,
) -> None:
    """A gzip bomb, an oversized or garbled chunk, or a chunk of another record is an error
    naming the chunk, never a gigabyte in memory; so is a head claiming a billion chunks."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    for entry in long_record[:30]:
        assert await writer.append(entry) is None
    assert await writer.flush() is None and writer.chunks >= 1
    name = chunk_name(head, 1)
    chunk = emulator.get("", "v1", "configmaps", NS, name)
    chunk["data"] = {**chunk["data"], **chunk_data}
    emulator.put("", "v1", "configmaps", chunk)
    with pytest.raises(RecordError, match=message) as caught:
        await load_record_configmap(client, namespace=NS, rollout=rollout)
    assert name in str(caught.value) or head in str(caught.value)

    stored = emulator.get("", "v1", "configmaps", NS, head)
    stored["data"]["record.chunks"] = "1000000000"
    emulator.put("", "v1", "configmaps", stored)
    with pytest.raises(RecordError, match=rf"{head}: record.chunks is '1000000000'"):
        await load_record_configmap(client, namespace=NS, rollout=rollout)


async def test_a_record_past_its_budget_keeps_sparser_ticks_and_the_last_one(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """Past the budget a tick is kept every thin_every_s, and the tick a decision follows
    is kept whatever its time (its counts are the totals); a note says so once."""
    _, client = kube
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(
        client,
        namespace=NS,
        rollout=rollout,
        seal_bytes=SEAL,
        budget_bytes=100_000,
        thin_every_s=120,
    )
    for entry in long_record:
        assert await writer.append(entry) is None
    last = long_record[-1]
    assert isinstance(last, TickEntry)
    end = NoteEntry(at=last.at + 1, rollout=rollout, message="decided")
    assert await writer.append(end) is None
    stored = await load_record_configmap(client, namespace=NS, rollout=rollout)
    ticks = [e for e in stored if isinstance(e, TickEntry)]
    all_ticks = [e for e in long_record if isinstance(e, TickEntry)]
    assert isinstance(stored[0], StartEntry) and stored[-1] == end
    assert ticks[-1] == last, "the tick before a decision is kept"
    assert 20 < len(ticks) < len(all_ticks) // 2
    late = [t.at for t in ticks if t.at > ticks[0].at + 600][:-1]
    assert all(b - a >= 120 for a, b in itertools.pairwise(late))
    notes = [e for e in stored if isinstance(e, NoteEntry) and "past 100000 bytes" in e.message]
    assert len(notes) == 1


async def test_a_long_rollout_name_keeps_its_chunks_apart(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A rollout id near the name limit: the head's name is cut to 253 characters, chunk
    names stay valid and distinct from any head, and the record reads back whole."""
    _, client = kube
    rollout = "a-namespace-" + "n" * 60 + "/app-" + "x" * 120 + "@0123456789abcdef"
    entries = [e.model_copy(update={"rollout": rollout}) for e in long_record[:40]]
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    for entry in entries:
        assert await writer.append(entry) is None
    assert writer.chunks >= 3
    head = configmap_name(rollout)
    names = {chunk_name(head, n) for n in range(1, writer.chunks + 1)}
    assert all(len(n) <= 253 and "--" in n and n != head for n in names)
    assert len(names) == writer.chunks
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == entries


async def test_a_small_object_limit_seals_the_packed_tail_before_it_outgrows_it(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """The tail is held as one gzip member per save, which packs less tightly than one
    stream: with an object limit below the seal size's packed size, the tail becomes a chunk
    before a save would take it past the limit; no save fails and nothing is lost."""
    emulator, client = kube
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(
        client, namespace=NS, rollout=rollout, max_bytes=6000, save_every_s=30
    )
    for entry in long_record[:200]:
        assert await writer.append(entry) is None
    assert await writer.flush() is None
    sizes = [sum(len(v) for v in w.body["data"].values()) for w in _writes(emulator)]
    assert max(sizes) <= 6000 - 200 + 100, max(sizes)  # the data, and the keys' few bytes
    assert writer.chunks >= 10
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record[:200]


async def test_data_through_is_the_newest_tick_with_data_that_a_save_stored(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """Issue 13: a resume reads the last data time from the record, so the status saves it
    only while the record lags (canary.runner.runner). The writer says how far the stored
    record goes: ticks held back (not saved yet, or thinned past the budget) do not count,
    nor does a save that failed."""
    emulator, client = kube
    rollout = long_record[0].rollout
    ticks = [e for e in long_record if isinstance(e, TickEntry) and e.verdict is not None]
    writer = ConfigMapRecordWriter(
        client, namespace=NS, rollout=rollout, seal_bytes=SEAL, save_every_s=30
    )
    assert writer.data_through is None
    start = long_record[0]
    assert await writer.append(start) is None  # not a tick: saved at once
    assert writer.data_through is None
    first, second = ticks[0], ticks[1]
    writer.add(first)
    assert writer.data_through is None, "added, not saved"
    assert await writer.flush() is None
    assert writer.data_through == first.at
    writer.add(second)
    emulator.inject(422, verb="patch", resource="configmaps")  # rejected: not retried
    assert await writer.flush() is not None
    assert writer.data_through == first.at, "a failed save stores nothing"
    assert await writer.flush() is None
    assert writer.data_through == second.at

    thinned = ConfigMapRecordWriter(
        client,
        namespace=NS,
        rollout=rollout + "-thin",
        seal_bytes=SEAL,
        budget_bytes=1,  # thinning from the first tick on
        thin_every_s=600,
    )
    thinned.add(ticks[0])
    thinned.add(ticks[1])  # 10 s later: held back
    assert await thinned.flush() is None
    assert thinned.data_through == ticks[0].at, "a thinned tick is not stored"


class _SlowGets:
    """The ConfigMap calls of a client, each GET held a moment; counts GETs in flight."""

    def __init__(self, api: Kube) -> None:
        self.api = api
        self.in_flight = 0
        self.most = 0

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            return await self.api.get_configmap(namespace, name)
        finally:
            self.in_flight -= 1

    async def put_configmap(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return await self.api.put_configmap(*args, **kwargs)


async def test_chunks_are_read_a_few_at_a_time_and_a_missing_one_is_named(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A resume waits for a round trip per CHUNK_READS chunks, not per chunk, and gets the
    record in order; a chunk gone from the middle is an error naming it."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    for entry in long_record:
        assert await writer.append(entry) is None
    assert await writer.flush() is None and writer.chunks > CHUNK_READS
    slow = _SlowGets(client)
    assert await load_record_configmap(slow, namespace=NS, rollout=rollout) == long_record
    assert slow.most == CHUNK_READS

    emulator.delete("", "v1", "configmaps", NS, chunk_name(head, 2))
    with pytest.raises(RecordError, match=rf"chunk 2 of {writer.chunks}"):
        await load_record_configmap(slow, namespace=NS, rollout=rollout)


async def test_a_report_shows_a_record_whose_chunk_is_gone_and_says_which_and_where(
    kube: tuple[KubeEmulator, Kube],
    long_record: list[Entry],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A chunk deleted from the middle (by hand, by a namespace cleanup) or replaced by
    another record's: a report (`canary report`, live or from a `kubectl` dump) still shows
    every other entry, in order, with a warning note where the chunk was that names it and
    says its entries are not shown. A resume (no `gaps`) still refuses the record."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    writer = await _written(client, long_record)
    assert await writer.flush() is None and writer.chunks > 3
    lines_of = {
        n: _chunk_lines(emulator.get("", "v1", "configmaps", NS, chunk_name(head, n)))
        for n in (1, 2, 3)
    }
    emulator.delete("", "v1", "configmaps", NS, chunk_name(head, 2))

    entries = await load_record_configmap(client, namespace=NS, rollout=rollout, gaps=True)
    before = len(lines_of[1])  # the entries of chunk 1
    notes = [(i, e) for i, e in enumerate(entries) if isinstance(e, NoteEntry)]
    gap = [(i, e) for i, e in notes if "not shown" in e.message]
    assert len(gap) == 1
    at, note = gap[0]
    assert at == before and note.level == "warning"
    assert f"chunk 2 of {writer.chunks}" in note.message and "not found" in note.message.lower()
    kept = [e for e in entries if e is not note]
    missing = len(lines_of[2])
    assert kept == long_record[:before] + long_record[before + missing :]
    assert note.at == long_record[before - 1].at and note.rollout == rollout
    with pytest.raises(RecordError, match=rf"chunk 2 of {writer.chunks}"):
        await load_record_configmap(client, namespace=NS, rollout=rollout)

    # the same from a dump, and with chunk 3 another record's
    dump = tmp_path / "dump.json"
    items = _record_objects(emulator, head)
    dump.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    assert report_main([str(dump), "--format", "json", "-o", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tick_count"] == sum(isinstance(e, TickEntry) for e in kept)
    third = emulator.get("", "v1", "configmaps", NS, chunk_name(head, 3))
    third["data"] = {**third["data"], "record.id": "someone-else"}
    emulator.put("", "v1", "configmaps", third)
    entries = await load_record_configmap(client, namespace=NS, rollout=rollout, gaps=True)
    gaps = [e.message for e in entries if isinstance(e, NoteEntry) and "not shown" in e.message]
    assert len(gaps) == 2 and "not chunk 3" in gaps[1]
    assert len(entries) == len(long_record) - missing - len(lines_of[3]) + 2

    # `canary report` says so on stderr too
    config = emulator.write_kubeconfig(tmp_path / "kc", token="t", context="test")
    code = await asyncio.to_thread(
        report_main,
        [rollout, "-n", NS, "--kubeconfig", str(config), "--format", "json", "-o", "-"],
    )
    err = capsys.readouterr().err
    assert code == 0 and err.count("not shown") == 2 and f"chunk 2 of {writer.chunks}" in err

    # an error that may pass (a 503 on every try) is not a gap: a report server would keep it
    stored = await client.get_configmap(NS, head)
    emulator.inject(503, times=10, verb="get", resource="configmaps")
    with pytest.raises(RecordError, match=r"chunk 1 of .*HTTP 503"):
        await read_record_configmap(client, stored, gaps=True)
    emulator.faults.clear()

    # the first chunk holds the start entry: without it, an error naming the chunk
    emulator.delete("", "v1", "configmaps", NS, chunk_name(head, 1))
    with pytest.raises(RecordError, match=r"chunk 1 of .*the start entry among them"):
        await load_record_configmap(client, namespace=NS, rollout=rollout, gaps=True)


async def _written(client: Kube, entries: list[Entry]) -> ConfigMapRecordWriter:
    """A writer in small chunks (SEAL) that has appended `entries`, each append succeeding."""
    writer = ConfigMapRecordWriter(
        client, namespace=NS, rollout=entries[0].rollout, seal_bytes=SEAL
    )
    for entry in entries:
        assert await writer.append(entry) is None
    return writer


def _chunk_lines(configmap: dict[str, Any]) -> list[str]:
    packed = configmap["data"][record_store.CHUNK_KEY]
    return [
        line
        for line in gzip.decompress(base64.b64decode(packed)).decode().splitlines()
        if line.strip()
    ]


async def test_a_sealing_rewrite_seals_from_the_last_writes_answer_without_reading_the_head(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """When the head is as the last part's write left it, the rewrite that seals its tail
    takes the tail from that write's answer: no GET (issue 13: a third of a rewrite's
    requests). The record reads back whole, and each chunk is created once."""
    emulator, client = kube
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(
        client, namespace=NS, rollout=rollout, save_every_s=30, seal_bytes=SEAL
    )
    for entry in long_record:
        assert await writer.append(entry) is None
    assert await writer.flush() is None
    assert writer.chunks >= 10
    reads = emulator.recorded(verb="get", resource="configmaps")
    assert len(reads) <= 1, [r.name for r in reads]  # the first chunk's owner (its uid)
    chunk_writes = [w for w in _writes(emulator) if _name(w) != configmap_name(rollout)]
    assert [w.verb for w in chunk_writes] == ["create"] * writer.chunks
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == long_record


@pytest.mark.parametrize("moved", ["head written by another", "chunk left by a failed save"])
async def test_a_rewrite_whose_kept_head_moved_reads_the_head_back(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry], moved: str
) -> None:
    """The head written by someone else since the last part's write (its version moved),
    or the next chunk already there (left by a save that failed): the sealing rewrite does
    not write over them from what it kept; it reads the head back and seals from that, as
    any rewrite did before, in the same save and without an error."""
    emulator, client = kube
    rollout = long_record[0].rollout
    head = configmap_name(rollout)
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    index = await _just_short_of_sealing(writer, long_record)
    assert writer._kept is not None, "the last part's answer is kept: the next save seals"
    chunks = writer.chunks
    note = NoteEntry(at=long_record[index].at, rollout=rollout, level="info", message="else")
    if moved == "head written by another":
        # its tail now ends with another line: sealed from what was kept, it would be lost
        current = emulator.get("", "v1", "configmaps", NS, head)
        tail = base64.b64decode(current["data"][record_store.TAIL_KEY])
        tail += gzip.compress((dump_entry(note) + "\n").encode())
        current["data"][record_store.TAIL_KEY] = base64.b64encode(tail).decode()
        emulator.put("", "v1", "configmaps", current)
    else:
        await client.put_configmap(
            NS,
            chunk_name(head, chunks + 1),
            {"junk": "from a save that failed"},
            labels={"team": "shop"},  # set by someone since: the replace keeps it
        )
    gets = len(emulator.recorded(verb="get", resource="configmaps", name=head))
    assert await writer.append(long_record[index]) is None
    assert await writer.flush() is None
    assert len(emulator.recorded(verb="get", resource="configmaps", name=head)) == gets + 1
    assert writer.chunks == chunks + 1
    record = await load_record_configmap(client, namespace=NS, rollout=rollout)
    assert [e for e in record if e != note] == long_record[: index + 1]
    assert (note in record) == (moved == "head written by another")
    if moved == "chunk left by a failed save":
        chunk = emulator.get("", "v1", "configmaps", NS, chunk_name(head, chunks + 1))
        assert chunk["metadata"]["labels"] == {"team": "shop", record_store.RECORD_LABEL: head}
        assert [ref["name"] for ref in chunk["metadata"]["ownerReferences"]] == [head]


async def test_an_ended_record_keeps_no_head(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A record's end is its last save: the head its answer gives is not kept for a rewrite
    that will not come (a finished rollout's writer lives on with its Deployment)."""
    _, client = kube
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    index = await _just_short_of_sealing(writer, long_record)
    assert writer._kept is not None  # as a save just short of sealing does
    end = EndEntry(
        at=long_record[index].at, rollout=rollout, outcome="promoted", reason="", duration_s=1.0
    )
    assert await writer.append(end) is None
    assert writer._kept is None
    assert await load_record_configmap(client, namespace=NS, rollout=rollout) == [
        *long_record[:index],
        end,
    ]


async def test_kept_heads_stay_within_the_process_budget(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollouts started together seal together: each would keep its head in the same minute
    (issue 13: ~30 MiB of RSS at 1,000). Past the process' budget a writer keeps none, and
    its rewrite reads the head back as before; a head given up returns its bytes."""
    emulator, client = kube
    budget = record_store._KeptBudget(0)
    monkeypatch.setattr(record_store, "KEPT_BUDGET", budget)
    rollout = long_record[0].rollout
    writer = ConfigMapRecordWriter(client, namespace=NS, rollout=rollout, seal_bytes=SEAL)
    index = await _just_short_of_sealing(writer, long_record)
    assert writer._kept is None and budget.refused >= 1 and budget.held == 0
    head = configmap_name(rollout)
    gets = len(emulator.recorded(verb="get", resource="configmaps", name=head))
    chunks = writer.chunks
    assert await writer.append(long_record[index]) is None
    assert await writer.flush() is None
    assert writer.chunks == chunks + 1  # sealed, from the head read back
    assert len(emulator.recorded(verb="get", resource="configmaps", name=head)) == gets + 1
    assert (
        await load_record_configmap(client, namespace=NS, rollout=rollout)
        == long_record[: index + 1]
    )

    budget.limit = 1 << 30
    other = ConfigMapRecordWriter(client, namespace=NS, rollout=f"{rollout}-2", seal_bytes=SEAL)
    await _just_short_of_sealing(other, long_record)
    kept = other._kept
    assert kept is not None and budget.held == kept.size > 0
    other._kept = None
    del kept
    assert budget.held == 0  # given back when the head is freed, however it was let go


async def test_gap_notes_keep_their_order_after_a_torn_last_line(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A chunk whose last line is torn (dropped as a torn write), then two chunks gone: the
    two notes follow the kept entries in the chunks' order."""
    _, client = kube
    rollout = long_record[0].rollout
    writer = await _written(client, long_record[:5])
    assert await writer.flush() is None
    head = await client.get_configmap(NS, configmap_name(rollout))
    assembler = record_store._Assembler(head)
    assembler._tail = []
    assembler.lines = [dump_entry(e) for e in long_record[:3]] + ['{"kind": "ti']
    assembler.add_gap("chunk 2 gone")
    assembler.add_gap("chunk 3 gone")
    entries = assembler.entries()
    assert entries[:3] == long_record[:3]
    assert [e.message[:12] for e in entries[3:] if isinstance(e, NoteEntry)] == [
        "chunk 2 gone",
        "chunk 3 gone",
    ]


async def test_a_head_rewrite_keeps_what_others_set_on_it(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """A head rewrite is a replace (PUT), which drops whatever metadata it does not carry:
    the labels, annotations, owner and finalizer another party put on the head (a team's
    label, a backup tool's finalizer) are carried over by every rewrite after, whether the
    writer read the head back (the first save after the change is refused on the head's
    version) or sealed from its last write's answer; the record reads whole."""
    emulator, client = kube
    writer = await _written(client, long_record[:10])
    head = writer.name
    theirs = THEIRS
    stored = emulator.get("", "v1", "configmaps", NS, head)
    for key, value in theirs.items():
        value = {**stored["metadata"].get(key, {}), **value} if key == "labels" else value
        stored["metadata"][key] = value
    emulator.put("", "v1", "configmaps", stored)
    updates = len(emulator.recorded(verb="update", resource="configmaps", name=head))
    gets = len(emulator.recorded(verb="get", resource="configmaps", name=head))
    for entry in long_record[10:]:
        assert await writer.append(entry) is None
    rewrites = len(emulator.recorded(verb="update", resource="configmaps", name=head)) - updates
    read_back = len(emulator.recorded(verb="get", resource="configmaps", name=head)) - gets
    assert rewrites >= 3 and 1 <= read_back < rewrites  # both paths taken
    metadata = emulator.get("", "v1", "configmaps", NS, head)["metadata"]
    assert metadata["labels"] == {record_store.RECORD_LABEL: head, **theirs["labels"]}
    for key in ("annotations", "finalizers", "ownerReferences"):
        assert metadata[key] == theirs[key], key
    assert await load_record_configmap(client, namespace=NS, rollout=writer.rollout) == long_record


async def test_what_others_set_that_is_too_big_to_hold_is_read_back_and_kept(
    kube: tuple[KubeEmulator, Kube], long_record: list[Entry]
) -> None:
    """Others' metadata past _OTHERS_HELD_CHARS (here a 20 KB annotation) is not held by the
    writer (a thousand heads could hold megabytes each): every rewrite reads the head back,
    and the annotation is still kept."""
    emulator, client = kube
    writer = await _written(client, long_record[:10])
    head = writer.name
    stored = emulator.get("", "v1", "configmaps", NS, head)
    stored["metadata"]["annotations"] = {"big.example.com/notes": "x" * 20_000}
    emulator.put("", "v1", "configmaps", stored)
    updates = len(emulator.recorded(verb="update", resource="configmaps", name=head))
    gets = len(emulator.recorded(verb="get", resource="configmaps", name=head))
    for entry in long_record[10:]:
        assert await writer.append(entry) is None
        assert writer._others is None
    rewrites = len(emulator.recorded(verb="update", resource="configmaps", name=head)) - updates
    read_back = len(emulator.recorded(verb="get", resource="configmaps", name=head)) - gets
    assert rewrites >= 3 and read_back == rewrites  # no rewrite from the last write's answer
    metadata = emulator.get("", "v1", "configmaps", NS, head)["metadata"]
    assert metadata["annotations"] == {"big.example.com/notes": "x" * 20_000}
    assert await load_record_configmap(client, namespace=NS, rollout=writer.rollout) == long_record
