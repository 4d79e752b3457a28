"""Records packed into a ConfigMap: compressed, thinned to fit, and still reportable."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from report_records import Scenario, simulate

from analysis.report import build_report
from canary.record_store import (
    RECORD_KEY,
    RecordTooLarge,
    configmap_name,
    downsample,
    pack_record,
    unpack_record,
)
from canary.records import Entry, NoteEntry, RecordError, TickEntry, parse_lines
from canary.reports import main


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
