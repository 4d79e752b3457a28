"""The batcher's fast reading of Prometheus answers (canary.metrics.batched._scan and the
series cache) against json.loads: the same series, the same samples, the same counts, for
any label values (quotes, braces, backslashes, the answer's own tokens, non-ASCII); and any
answer not in Prometheus' exact compact shape goes to json.loads, never half-read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.metrics.base import ArmsCounts
from canary.metrics.batched import (
    PrometheusBatcher,
    _apply_family,
    _apply_family_decoded,
    _counts,
    _Registration,
    _scan,
    _SeriesCache,
)
from canary.metrics.prometheus import PromQueries

NASTY = st.sampled_from(
    ['"', "\\", "{", "}", "[", "]", ",", ":", '{"metric":', '},"values":[', "]}", "ü", "\n", "<&>"]
)
VALUES = st.lists(st.one_of(NASTY, st.text(max_size=3)), max_size=4).map("".join)
LABELS = st.dictionaries(
    st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(lambda n: n != "__name__"),
    VALUES,
    max_size=4,
)


def answer(result: list[dict[str, Any]], *, ascii: bool = False) -> bytes:
    body = {"status": "success", "data": {"resultType": "matrix", "result": result}}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=ascii).encode()


SAMPLES = st.lists(
    st.tuples(st.integers(1, 10**6), st.integers(0, 10**6)), min_size=1, max_size=4
).map(lambda xs: [[float(t) + 0.5 * (i % 2), str(v)] for i, (t, v) in enumerate(sorted(xs))])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(LABELS, SAMPLES), max_size=5), st.booleans())
def test_scan_splits_what_json_decodes(series: list[Any], ascii: bool) -> None:
    result = [{"metric": {"__name__": "m", **labels}, "values": v} for labels, v in series]
    raw = answer(result, ascii=ascii)
    scanned = _scan(raw)
    assert scanned is not None
    assert [json.loads(text) for text, _ in scanned] == [s["metric"] for s in result]
    assert [json.loads(b"[" + samples + b"]") for _, samples in scanned] == [
        s["values"] for s in result
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"status": "success", "data": {"resultType": "matrix", "result": []}}',  # spaced
        b'{"status":"success","data":{"resultType":"vector","result":[]}}',
        b'{"status":"error","errorType":"bad_data","error":"x"}',
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"1"]]}',
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"histograms":[[1,{"count":"1","sum":"1"}]]}]}}',
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"values":[[1,"1"]],"histograms":[[1,{"count":"1"}]]}]}}',
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"values":[[1,"1"]]}{"metric":{},"values":[[1,"1"]]}]}}',  # no comma between
        b'{"status":"success","data":{"resultType":"matrix","result":[x{"metric":{},'
        b'"values":[[1,"1"]]}]}}',
    ],
)
def test_other_shapes_are_not_scanned(raw: bytes) -> None:
    assert _scan(raw) is None


def test_prometheus_warnings_after_the_data_are_ignored() -> None:
    raw = (
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"a":"b"},'
        b'"values":[[1,"1"]]}]},"warnings":["x"]}'
    )
    assert _scan(raw) == [(b'{"a":"b"}', b'[1,"1"]')]


def registration(q: PromQueries, since: float) -> _Registration:
    return PrometheusBatcher("http://127.0.0.1:9")._register(q, since)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=2, max_size=6),
    st.lists(st.integers(0, 50), min_size=2, max_size=6),
    st.sampled_from(["", "ü", 'a"b\\c', '},"values":[']),
    st.booleans(),
)
def test_fast_and_decoded_paths_count_the_same(
    primary: list[int], canary: list[int], nasty: str, reset: bool
) -> None:
    """Two registrations read the same answers, one through each path, batch after batch
    (resets, _created births, buckets): equal tracks and equal counts throughout."""
    q = PromQueries(
        requests='reqs_total{service="{arm}"}',
        errors='reqs_total{service="{arm}",code="500"}',
        latency_buckets='lat_bucket{service="{arm}"}',
    )
    since = 1000.0
    fast, slow = registration(q, since), registration(q, since)
    cache = _SeriesCache()
    counts = {"primary": primary, "canary": canary}
    for step in range(1, 4):
        at = since + 10 * step
        members = {}
        for reg in (fast, slow):
            for sel in reg.selectors:
                members.setdefault(sel.family, []).append((reg, sel))
        for family in members:
            result = []
            for arm, values in counts.items():
                for k, base in enumerate(values):
                    labels = {"code": "500" if k % 2 else "200", "service": arm, "x": nasty}
                    t = at - 10 + 5 * (k % 3)
                    value = base * step if not (reset and step == 2 and k == 0) else 0
                    if family.name == "lat_bucket":
                        for le in ("0.1", "+Inf"):
                            result.append(
                                {
                                    "metric": {"__name__": "lat_bucket", **labels, "le": le},
                                    "values": [[t, str(value)]],
                                }
                            )
                    else:
                        name = family.name or "reqs_total"
                        if family.created_name is not None:
                            result.append(
                                {
                                    "metric": {"__name__": family.created_name, **labels},
                                    "values": [[t, str(900.0 + (step if reset else 0))]],
                                }
                            )
                        result.append(
                            {"metric": {"__name__": name, **labels}, "values": [[t, str(value)]]}
                        )
            raw = answer(sorted(result, key=lambda s: json.dumps(s["metric"])))
            fast_members = [m for m in members[family] if m[0] is fast]
            slow_members = [m for m in members[family] if m[0] is slow]
            assert _apply_family(family, raw, fast_members, cache) is None
            assert _apply_family_decoded(family, raw, slow_members) is None
        cache.next_generation()
        for (_, _, a), (_, _, b) in zip(fast.arms, slow.arms, strict=True):
            for sa, sb in zip(a, b, strict=True):
                assert (sa is None) == (sb is None)
                if sa is not None and sb is not None:
                    assert sa.tracks == sb.tracks
        got, want = _counts(fast, {}, "x"), _counts(slow, {}, "x")
        assert got == want
        assert isinstance(got, ArmsCounts)
    assert cache.decoded == 0 and cache.scanned > 0


def test_series_not_seen_for_a_whole_batch_are_forgotten() -> None:
    q = PromQueries(requests='reqs_total{service="{arm}"}')
    reg = registration(q, 1000.0)
    family = reg.selectors[0].family
    members = [(reg, sel) for sel in reg.selectors if sel.family == family]
    cache = _SeriesCache()

    def read(arms: list[str]) -> None:
        result = [
            {"metric": {"__name__": "reqs_total", "service": a}, "values": [[1010, "5"]]}
            for a in arms
        ]
        assert _apply_family(family, answer(result), members, cache) is None

    read(["primary", "canary"])
    assert len(cache) == 2
    cache.next_generation()
    read(["primary"])
    assert len(cache) == 2  # the canary's series was seen by the last batch
    cache.next_generation()
    read(["primary"])
    assert len(cache) == 1
