"""Records packed into a ConfigMap: compressed, thinned to fit, and still reportable."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.kube_emulator import KubeEmulator
from support.report_records import Scenario, simulate

from canary.cli.report import main
from canary.core.records import Entry, NoteEntry, RecordError, TickEntry, parse_lines
from canary.kubernetes.client import Kube, RetryPolicy
from canary.kubernetes.record_store import (
    RECORD_KEY,
    ConfigMapRecordWriter,
    RecordTooLarge,
    configmap_name,
    downsample,
    load_record_configmap,
    pack_record,
    unpack_record,
)
from canary.reports import build_report


def _entries(scenario: Scenario) -> list[Entry]:
    return list(parse_lines(json.dumps(d) for d in simulate(scenario)))


@pytest.fixture(scope="module")
def rolled_back() -> list[Entry]:
    return _entries(Scenario(seed=12, canary_error_rate=0.014, failover_at_tick=2))


def _dicts(entries: list[Entry]) -> list[dict[str, object]]:
    return [e.model_dump(mode="json", by_alias=True) for e in entries]


def test_small_record_round_trips_exactly(rolled_back: list[Entry]) -> None:
    """A record that fits is stored whole, and packing is deterministic."""
    data = pack_record(rolled_back)
    assert list(data) == [RECORD_KEY]
    assert unpack_record({"data": data}) == rolled_back
    assert pack_record(rolled_back) == data


def test_large_record_is_thinned_to_fit_without_changing_the_story(
    rolled_back: list[Entry],
) -> None:
    """Under a tight limit old ticks are dropped, but the decision, the totals, the step
    changes, the other entries and the end stay; a note says what happened."""
    full = pack_record(rolled_back)[RECORD_KEY]
    limit = len(full) * 2 // 3
    data = pack_record(rolled_back, max_bytes=limit, keep_recent=3)
    assert len(data[RECORD_KEY]) + len(RECORD_KEY) <= limit
    thinned = unpack_record(data)
    ticks = [e for e in thinned if isinstance(e, TickEntry)]
    all_ticks = [e for e in rolled_back if isinstance(e, TickEntry)]
    assert 0 < len(ticks) < len(all_ticks)
    assert ticks[0] == all_ticks[0] and ticks[-1] == all_ticks[-1]
    others = [e for e in thinned if not isinstance(e, TickEntry | NoteEntry)]
    assert others == [e for e in rolled_back if not isinstance(e, TickEntry | NoteEntry)]
    assert thinned[-1] == rolled_back[-1]  # the end entry stays last
    before, after = build_report(_dicts(rolled_back)), build_report(_dicts(thinned))
    assert after.outcome == before.outcome == "rolled_back"
    assert after.decided == before.decided
    assert after.final_canary == before.final_canary
    assert [s.weight for s in after.step_spans] == [s.weight for s in before.step_spans]
    notes = [n.message for n in after.notes]
    assert any(
        re.fullmatch(
            rf"record downsampled for storage: kept {len(ticks)} of {len(all_ticks)} "
            r"ticks .*",
            n,
        )
        for n in notes
    )


def test_downsample_keeps_every_essential_tick(rolled_back: list[Entry]) -> None:
    """Even asked for one tick, the first, last and every verdict/step change remain."""
    ticks = [e for e in rolled_back if isinstance(e, TickEntry)]
    kept = [
        e for e in downsample(rolled_back, max_ticks=1, keep_recent=1) if isinstance(e, TickEntry)
    ]
    changes = [
        t
        for prev, t in itertools.pairwise(ticks)
        if (prev.verdict and prev.verdict.decision) != (t.verdict and t.verdict.decision)
        or prev.weight_set != t.weight_set
    ]
    assert kept[0] == ticks[0] and kept[-1] == ticks[-1]
    assert all(t in kept for t in changes)
    assert downsample(rolled_back, max_ticks=len(ticks)) == rolled_back


def test_record_that_cannot_fit_is_a_clear_error(rolled_back: list[Entry]) -> None:
    """A limit below the essential ticks' size names the rollout and the sizes."""
    with pytest.raises(
        RecordTooLarge, match=r"demo/app@00000c is \d+ bytes packed .* the limit is 500"
    ):
        pack_record(rolled_back, max_bytes=500)


def test_configmap_names_are_valid_dns_subdomains() -> None:
    """Rollout ids become lowercase DNS names, at most 253 characters."""
    assert configmap_name("demo/App@3f2a1c") == "canary-record-demo-app-3f2a1c"
    long = configmap_name("ns/" + "x" * 400 + "@1")
    assert len(long) <= 253
    for name in (long, configmap_name("a__b//c")):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name)


@pytest.mark.parametrize(
    ("configmap", "message"),
    [
        ({"metadata": {"name": "cm1"}, "data": {"other": "x"}}, "cm1: no record.jsonl.gz.b64 key"),
        ({"data": {RECORD_KEY: "not base64!"}}, "is not base64 gzip text"),
        ({"data": {RECORD_KEY: "aGVsbG8="}}, "is not base64 gzip text"),
    ],
)
def test_unreadable_configmaps_are_clear_errors(configmap: dict[str, object], message: str) -> None:
    """A ConfigMap without a readable record says which one and why."""
    with pytest.raises(RecordError, match=message):
        unpack_record(configmap)


def test_canary_report_reads_a_kubectl_configmap_dump(
    rolled_back: list[Entry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kubectl get configmap ... -o json > cm.json; canary report cm.json` renders it."""
    name = configmap_name(rolled_back[0].rollout)
    dump = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "canary-system"},
        "data": pack_record(rolled_back),
    }
    path = tmp_path / "cm.json"
    path.write_text(json.dumps(dump, indent=2))
    assert main([str(path), "--format", "json", "-o", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"] == "rolled_back" and report["rollout"] == rolled_back[0].rollout


# --- the ConfigMap adapter, against the API emulator with the real kubernetes-asyncio client


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


async def test_writer_keeps_the_record_in_its_configmap(
    kube: tuple[KubeEmulator, Kube], rolled_back: list[Entry]
) -> None:
    """Entries appended as a rollout goes are in the ConfigMap; non-tick entries are saved
    at once, ticks at most every save_every_s; the report read back is the whole story."""
    emulator, client = kube
    rollout = rolled_back[0].rollout
    writer = ConfigMapRecordWriter(
        client, namespace="canary-system", rollout=rollout, save_every_s=20
    )
    for entry in rolled_back:
        assert await writer.append(entry) is None
    puts = emulator.recorded(resource="configmaps", verb="update") + emulator.recorded(
        resource="configmaps", verb="create"
    )
    ticks = sum(isinstance(e, TickEntry) for e in rolled_back)
    assert 0 < len(puts) < len(rolled_back) - ticks // 2  # not one write per tick
    assert await writer.flush() is None
    entries = await load_record_configmap(client, namespace="canary-system", rollout=rollout)
    assert entries == rolled_back
    assert build_report(_dicts(entries)).outcome == "rolled_back"


async def test_writer_survives_conflicts_deletion_and_outages(
    kube: tuple[KubeEmulator, Kube], rolled_back: list[Entry]
) -> None:
    """Someone else's write (a conflict) and a deleted ConfigMap are recovered from, and the
    record says what they destroyed (the tail the head held: the writer holds only what it
    has not saved); an API outage is returned as a message, never raised, and the next save
    catches up."""
    emulator, client = kube
    rollout = rolled_back[0].rollout
    writer = ConfigMapRecordWriter(client, namespace="ns", rollout=rollout, save_every_s=0)
    assert await writer.append(rolled_back[0]) is None
    emulator.put(
        "",
        "v1",
        "configmaps",
        {"metadata": {"name": writer.name, "namespace": "ns"}, "data": {"meddled": "yes"}},
    )
    assert await writer.append(rolled_back[1]) is None  # conflict: re-read, write ours
    stored = await load_record_configmap(client, namespace="ns", rollout=rollout)
    assert [type(e) for e in stored] == [NoteEntry, type(rolled_back[1])]
    assert "was replaced by another writer: the 1 entries" in stored[0].message  # type: ignore[union-attr]
    assert stored[1] == rolled_back[1]
    emulator.delete("", "v1", "configmaps", "ns", writer.name)
    assert await writer.append(rolled_back[2]) is None  # gone: created again
    emulator.inject(503, times=10, resource="configmaps")
    error = await writer.append(rolled_back[3])
    assert error is not None and error.startswith(f"record ConfigMap ns/{writer.name}: ")
    assert writer.last_error == error
    emulator.faults.clear()
    for entry in rolled_back[4:]:
        assert await writer.append(entry) is None
    stored = await load_record_configmap(client, namespace="ns", rollout=rollout)
    assert isinstance(stored[0], NoteEntry) and "was deleted: the 2 entries" in stored[0].message
    assert stored[1:] == rolled_back[2:]


async def test_missing_record_configmap_is_a_clear_error(kube: tuple[KubeEmulator, Kube]) -> None:
    """Reading a rollout that has no record ConfigMap names the ConfigMap."""
    _, client = kube
    with pytest.raises(RecordError, match="record ConfigMap ns/canary-record-demo-app-1: "):
        await load_record_configmap(client, namespace="ns", rollout="demo/app@1")


async def test_canary_report_reads_a_record_from_the_cluster(
    kube: tuple[KubeEmulator, Kube], rolled_back: list[Entry], tmp_path: Path
) -> None:
    """`canary report ROLLOUT -n NS --kubeconfig K` (a child process, the real client) renders
    the record kept in the rollout's ConfigMap; an unknown rollout is a one-line error."""
    _, client = kube
    rollout = rolled_back[0].rollout
    writer = ConfigMapRecordWriter(client, namespace="ns", rollout=rollout)
    for entry in rolled_back:
        await writer.append(entry)
    assert await writer.flush() is None
    cluster = ["-n", "ns", "--kubeconfig", str(tmp_path / "kubeconfig"), "--context", "test"]

    async def canary_report(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "canary",
            "report",
            *args,
            *cluster,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await canary_report(rollout, "--format", "md", "-o", "-")
    assert code == 0, err
    assert out.startswith("### Canary demo/app: ❌ rolled back")
    code, out, err = await canary_report("demo/app@nope")
    assert code == 1 and out == ""
    assert err.startswith("canary report: error: record ConfigMap ns/canary-record-demo-app-nope")
