"""The batcher's fast reading of Prometheus answers (canary.metrics.batched._scan and the
series cache) against json.loads: the same series, the same samples, the same counts, for
any label values (quotes, braces, backslashes, the answer's own tokens, non-ASCII); and any
answer not in Prometheus' exact compact shape goes to json.loads, never half-read."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from canary.metrics.base import ArmsCounts, NoData
from canary.metrics.batched import (
    _HEAD,
    _NEXT,
    _OPEN,
    _SAMPLE,
    _VALUES,
    PrometheusBatcher,
    _apply,
    _apply_family,
    _apply_family_decoded,
    _count_series,
    _counts,
    _Registration,
    _sample_numbers,
    _scan,
    _SeriesCache,
)
from canary.metrics.prometheus import PromQueries


def split(raw: bytes) -> list[tuple[bytes, bytes]] | None:
    """_scan's offsets as (labels JSON, samples text) per series."""
    spans = _scan(raw)
    if spans is None:
        return None
    return [
        (raw[spans[k] : spans[k + 1]], raw[spans[k + 2] : spans[k + 3]])
        for k in range(0, len(spans), 4)
    ]


def walk(answer: bytes) -> list[int] | None:
    """The answer walked series by series, token after token: what _scan did before it ran
    in numpy, and what it must still give, answer for answer (None: not that shape)."""
    if not answer.startswith(_HEAD):
        return None
    spans: list[int] = []
    position = len(_HEAD)
    if answer.startswith(b"]}", position):
        return spans
    while True:
        if not answer.startswith(_OPEN, position):
            return None
        start = position + len(_OPEN)
        middle = answer.find(_VALUES, start)
        if middle < 0:
            return None
        samples = middle + len(_VALUES)
        end = answer.find(b"}", samples)
        if end < 0 or answer[end - 1] != 0x5D:
            return None
        spans.extend((start, middle + 1, samples, end - 1))
        if answer.startswith(_NEXT, end + 1):
            position = end + 2
        elif answer.startswith(b"]}", end + 1):
            return spans if answer.count(_OPEN) == len(spans) // 4 else None
        else:
            return None


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
    scanned = split(raw)
    assert scanned is not None
    assert [json.loads(text) for text, _ in scanned] == [s["metric"] for s in result]
    assert [json.loads(b"[" + samples + b"]") for _, samples in scanned] == [
        s["values"] for s in result
    ]


TOKENS = [b"{", b"}", b"[", b"]", b",", b'"', b"]}", b'{"metric":', b'},"values":[', b"x"]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(LABELS, SAMPLES), max_size=4),
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 10**6), st.integers(0, 3), st.sampled_from(TOKENS)),
        max_size=3,
    ),
)
def test_scan_gives_what_the_walk_gives_for_any_answer(
    series: list[Any], edits: list[tuple[bool, int, int, bytes]]
) -> None:
    """Valid answers, and answers with bytes cut out or tokens put in anywhere (or at one of
    the structure's bytes): _scan's offsets are the walk's, and where the walk refuses the
    shape, so does _scan."""
    result = [{"metric": {"__name__": "m", **labels}, "values": v} for labels, v in series]
    raw = bytearray(answer(result))
    for structural, at, cut, token in edits:
        marks = [i for i, byte in enumerate(raw) if byte in b"{}[],"]
        at = marks[at % len(marks)] if structural and marks else at % (len(raw) + 1)
        raw[at : at + cut] = token
    spans = _scan(bytes(raw))
    assert (None if spans is None else list(spans)) == walk(bytes(raw))


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
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"values":[[1,"1"]]}]},"x":{"metric":{}}}',  # the token after the data
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"values":[[1,{"metric":"1"]]}]}}',  # ... or inside a series' samples
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"values":[[1,"1"]]x}]}}',  # the samples' list does not end at the series' end
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"values":[[1,"1"]]}x{"metric":{},"values":[[1,"1"]]}]}}',  # no comma between
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},'
        b'"values":[[1,"1"]]},{"metric":{}}]}}',  # a series without its samples
    ],
)
def test_other_shapes_are_not_scanned(raw: bytes) -> None:
    assert split(raw) is None
    assert walk(raw) is None


def test_prometheus_warnings_after_the_data_are_ignored() -> None:
    raw = (
        b'{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"a":"b"},'
        b'"values":[[1,"1"]]}]},"warnings":["x"]}'
    )
    assert split(raw) == [(b'{"a":"b"}', b'[1,"1"]')]


def test_an_answer_full_of_braces_in_a_label_is_decoded_whole_not_indexed() -> None:
    """A label value of 300,000 braces (a tenant's exporter may send one): _scan would hold
    ~26 bytes of index a brace (~8 MB here, 13 times the answer; gigabytes at the answer
    limit), so it declines the answer having held no more than the answer's size again (the
    comparison it counts them in), and the batcher decodes it whole (the walk, which needed
    no index, split it); a few braces in labels are still scanned."""
    import tracemalloc

    nasty = "{}" * 150_000
    raw = answer([{"metric": {"__name__": "m", "path": nasty}, "values": [[1, "1"]]}])
    tracemalloc.start()
    try:
        assert _scan(raw) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(raw), (peak, len(raw))
    assert walk(raw) is not None
    few = answer([{"metric": {"__name__": "m", "path": "{a}/{b}"}, "values": [[1, "1"]]}])
    assert split(few) == [(b'{"__name__":"m","path":"{a}/{b}"}', b'[1,"1"]')]

    q = PromQueries(
        requests='reqs_total{service="{arm}"}', errors='reqs_total{service="{arm}",code="500"}'
    )
    reg = registration(q, 0.0)
    sel = reg.selectors[0]
    cache = _SeriesCache()
    metric = {"__name__": "reqs_total", "code": "500", "service": "canary", "path": nasty}
    raw = answer([{"metric": metric, "values": [[1, "1"], [2, "5"]]}])
    assert _apply_family(sel.family, raw, [(reg, sel)], cache) is None
    assert (cache.decoded, cache.scanned) == (1, 0)


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
                    assert sa.counted() == sb.counted()
        got, want = _counts(fast, {}, "x"), _counts(slow, {}, "x")
        assert got == want
        assert isinstance(got, ArmsCounts)
    assert cache.decoded == 0 and cache.scanned > 0


def read_answers(
    regs: list[_Registration], at: float, pods: set[int], value: Any, odd: str | None
) -> dict[Any, bytes]:
    """Each family's answer for these registrations' arms at `at`: one series per pod (and
    its `_created`), cumulative `value(pod)`; `odd` puts a NaN or a non-number in pod 0's."""
    arms = {a for reg in regs for _, a, _ in reg.arms}
    families = {sel.family for reg in regs for sel in reg.selectors}
    out = {}
    for family in families:
        result = []
        for arm in sorted(arms):
            for pod in sorted(pods):
                labels = {"code": "500" if pod % 2 else "200", "pod": str(pod), "service": arm}
                shown = odd if odd is not None and pod == 0 else str(value(pod))
                samples = [[at - 5, str(max(0, value(pod) - 3))], [at, shown]]
                if family.name == "lat_bucket":
                    for le in ("0.1", "+Inf"):
                        metric = {"__name__": "lat_bucket", **labels, "le": le}
                        result.append({"metric": metric, "values": samples})
                    continue
                if family.created_name is not None:
                    metric = {"__name__": family.created_name, **labels}
                    result.append({"metric": metric, "values": [[at, str(900.0 + pod)]]})
                metric = {"__name__": family.name or "reqs_total", **labels}
                result.append({"metric": metric, "values": samples})
        out[family] = answer(sorted(result, key=lambda s: json.dumps(s["metric"])))
    return out


def same_counting(fast: _Registration, slow: _Registration) -> None:
    for (_, _, a), (_, _, b) in zip(fast.arms, slow.arms, strict=True):
        for sa, sb in zip(a, b, strict=True):
            if sa is not None and sb is not None:
                assert sa.counted() == sb.counted()
                assert (sa.malformed is None) == (sb.malformed is None)  # (wording: bytes)
    got, want = _counts(fast, {}, "x"), _counts(slow, {}, "x")
    if isinstance(want, NoData):  # the scanned path shows a non-number as bytes
        assert isinstance(got, NoData) and got.reason.replace("b'", "'") == want.reason
    else:
        assert got == want


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.integers(0, 3), min_size=1),
            st.sampled_from([None, None, None, "NaN", "x", "reset"]),
            st.integers(0, 3),
        ),
        min_size=2,
        max_size=7,
    )
)
def test_a_planned_read_counts_as_the_decoded_path(
    steps: list[tuple[set[int], str | None, int]],
) -> None:
    """Reads through one series cache (so through a plan whenever an answer lists the same
    series as one before it, for the same selectors) count exactly as json.loads' path:
    pods coming and going, NaN and non-numbers, counter resets, and registrations reset
    between reads (their columns emptied: the plan made before must not be used)."""
    q = PromQueries(
        requests='reqs_total{service="{arm}"}',
        errors='reqs_total{service="{arm}",code="500"}',
        latency_buckets='lat_bucket{service="{arm}"}',
    )
    fast, slow = registration(q, 1000.0), registration(q, 1000.0)
    cache = _SeriesCache()
    for n, (pods, odd, drop) in enumerate(steps, start=1):
        if odd == "reset":
            fast.reset()
            slow.reset()
            odd = None

        def value(pod: int, n: int = n, drop: int = drop) -> int:
            return 7 * n + pod if pod != drop or n % 3 else 2  # now and then a reset

        answers = read_answers([fast], 1000.0 + 10 * n, pods, value, odd)
        for family, raw in answers.items():
            fast_members = [(fast, s) for s in fast.selectors if s.family == family]
            slow_members = [(slow, s) for s in slow.selectors if s.family == family]
            for _, sel in fast_members + slow_members:
                sel.malformed = None  # as _apply_answers does before each read
            assert _apply_family(family, raw, fast_members, cache) is None
            assert _apply_family_decoded(family, raw, slow_members) is None
        same_counting(fast, slow)
        cache.next_generation()


def test_the_same_series_are_read_by_their_plan_until_a_selector_is_emptied() -> None:
    q = PromQueries(requests='reqs_total{service="{arm}"}')
    reg, fresh = registration(q, 1000.0), registration(q, 1000.0)
    family = reg.selectors[0].family
    cache = _SeriesCache()

    def read(r: _Registration, n: int) -> None:
        raw = read_answers([r], 1000.0 + 10 * n, {0, 1}, lambda pod: 5 * n + pod, None)
        members = [(r, s) for s in r.selectors if s.family == family]
        assert _apply_family(family, raw[family], members, cache) is None

    read(reg, 1)
    assert cache.planned == 0 and cache.scanned == 1
    read(reg, 2)
    read(reg, 3)
    assert cache.planned == 2 and cache.scanned == 1  # the same series: no labels read
    reg.reset()  # its columns emptied: the plan's slots are not its own any more
    read(reg, 4)
    assert cache.planned == 2 and cache.scanned == 2
    read(fresh, 4)  # another registration's selectors: not the plan's
    assert cache.planned == 2 and cache.scanned == 3
    same_counting(reg, fresh)


SAMPLE_VALUES = st.one_of(
    st.integers(0, 10**6).map(str),
    st.floats(0, 1e6).map(repr),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e3", "x", "-0"]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 12), SAMPLE_VALUES), max_size=5),
    st.dictionaries(st.integers(0, 12), st.sampled_from([900.0, 901.0]), max_size=4),
    st.one_of(st.none(), st.tuples(st.floats(0, 1e6), st.floats(0, 1e6), st.integers(-1, 12))),
    st.one_of(st.none(), st.sampled_from([900.0, 901.0])),
    st.integers(0, 12),
)
def test_the_text_path_of_a_known_series_counts_as_apply(
    samples: list[tuple[int, str]],
    births: dict[int, float],
    state: tuple[float, float, int] | None,
    born: float | None,
    since_at: int,
) -> None:
    """_count_series (a series counted before, read from its samples' text) gives exactly
    _apply's state and the rule's (written out in the test), or declines with nothing
    changed: any samples (several, out of the window, before `since`, not numbers, NaN,
    infinities, non-integers), births and earlier state."""
    q = PromQueries(requests='reqs_total{service="{arm}"}')
    base = 1000.0
    reg = registration(q, base + since_at)
    sel = reg.selectors[0]
    text = ",".join(f'[{base + t:.3f},"{v}"]' for t, v in sorted(samples, key=lambda x: x[0]))
    pairs = _SAMPLE.findall(text.encode())
    key, labels = b"k", {"service": "x"}
    by_time = {base + t: b for t, b in births.items()}
    if state is not None:  # a series counted before, with this state
        previous, total, cursor = state
        sel.slots[key] = 0
        sel.numbers.extend(
            (previous, born or 0.0, total, -math.inf if cursor < 0 else base + cursor)
        )
        sel.born.append(0 if born is None else 1)
        sel.les.append(None)
    reference = copy.deepcopy(sel)
    before = sel.counted()
    slot = sel.slots.get(key)
    if slot is None or not _count_series(sel, slot, pairs, by_time, reg.since, reg.floor, None):
        assert sel.counted() == before  # declined: nothing changed
        return
    assert state is not None  # a series never counted is always declined
    decoded = [(float(t), float(v)) for t, v in pairs]
    _apply(reference, key, None, labels, decoded, by_time, since=reg.since, floor=reg.floor)
    assert sel.counted() == reference.counted()
    assert reference.broken is None  # what it declined is what _apply would mark
    # and both are the rule itself, written out here (not the code under test)
    previous, total, cursor = state
    cursor_t = -math.inf if cursor < 0 else base + cursor
    known = born
    for t, v in decoded:
        if t <= reg.floor or t <= cursor_t:
            continue
        cursor_t = t
        birth = by_time.get(t)
        if t <= reg.since:
            previous, known = v, birth
            continue
        if birth is not None and known is not None and birth != known:
            total += v  # reborn: the new life's count from zero
        elif v < previous:
            total += v  # a reset
        else:
            total += v - previous
        previous = v
        if birth is not None:
            known = birth
    assert sel.counted()[key] == (None, previous, known, total, cursor_t, None)


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


def test_the_state_of_a_series_is_small() -> None:
    """Issue 13: ~90,000 series at 1,000 rollouts. What the batcher keeps per series (its
    counting state, its entry in the series cache) after three batches stays under 320
    bytes: it was ~500 (a track object, boxed floats, a tuple of its labels, label strings)."""
    import gc
    import tracemalloc

    name = "lat_seconds"
    les = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "+Inf"]
    regs = [
        registration(
            PromQueries(
                requests=f'{name}_count{{namespace="team{i % 25}",service="{{arm}}"}}',
                errors=f'{name}_count{{namespace="team{i % 25}",service="{{arm}}",code=~"5.."}}',
                latency_buckets=f'{name}_bucket{{namespace="team{i % 25}",service="{{arm}}"}}',
                primary_arm=f"app{i}-primary",
                canary_arm=f"app{i}-canary",
            ),
            1000.0,
        )
        for i in range(50)
    ]
    members: dict[Any, list[Any]] = {}
    for reg in regs:
        for sel in reg.selectors:
            members.setdefault(sel.family, []).append((reg, sel))

    def read(family: Any, at: float) -> bytes:
        result = []
        for reg in regs:
            for arm in (reg.queries.primary_arm, reg.queries.canary_arm):
                for code in ["503"] if family.raw else ["200", "404", "503"]:
                    labels = {"code": code, "instance": "10.0.0.1:9100", "job": "app"}
                    labels |= {"namespace": reg.selectors[0].values[0], "service": arm}
                    values = [[at - 10 + 5 * k, str(int(at) + k)] for k in range(3)]
                    born = [[t, "900"] for t, _ in values]
                    result.append(
                        {"metric": {"__name__": f"{name}_created", **labels}, "values": born}
                    )
                    for le in les if family.name.endswith("_bucket") else [None]:
                        metric = {"__name__": family.name, **labels}
                        if le is not None:
                            metric = dict(sorted({**metric, "le": le}.items()))
                        result.append({"metric": metric, "values": values})
        return answer(result)

    cache = _SeriesCache()
    answers = [{f: read(f, 1000.0 + 10 * step) for f in members} for step in (1, 2, 3)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in answers:
            for family, raw in batch.items():
                assert _apply_family(family, raw, members[family], cache) is None
            cache.next_generation()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 50 * 2 * (3 + 3 + 1 + 1 + 3 * 12)  # counts, buckets and _created
    assert all(isinstance(_counts(reg, {}, "x"), ArmsCounts) for reg in regs)
    assert held / len(cache) < 320, held / len(cache)


@pytest.mark.parametrize("case", ["nan", "no le", "bad le"])
def test_reasons_name_the_series_on_both_paths(case: str) -> None:
    """A NaN sample or a bucket without a good `le` is no data, and the reason shows that
    series' labels, whichever path read the answer."""
    q = PromQueries(
        requests='reqs_total{service="{arm}"}', latency_buckets='lat_bucket{service="{arm}"}'
    )
    fast, slow = registration(q, 1000.0), registration(q, 1000.0)
    cache = _SeriesCache()
    for family in {sel.family for sel in fast.selectors}:
        result = []
        for arm in ("primary", "canary"):
            value = "NaN" if case == "nan" and arm == "canary" else "3"
            metric = {"__name__": family.name or "", "service": arm}
            if family.name == "lat_bucket" and not (case == "no le" and arm == "canary"):
                metric["le"] = "x" if case == "bad le" and arm == "canary" else "+Inf"
            result.append({"metric": metric, "values": [[1010, value]]})
        raw = answer(result)
        assert (
            _apply_family(
                family, raw, [(fast, s) for s in fast.selectors if s.family == family], cache
            )
            is None
        )
        assert (
            _apply_family_decoded(
                family, raw, [(slow, s) for s in slow.selectors if s.family == family]
            )
            is None
        )
    got, want = _counts(fast, {}, "x"), _counts(slow, {}, "x")
    assert got == want
    assert not isinstance(got, ArmsCounts)
    shown = {
        "nan": "series {'__name__': 'reqs_total', 'service': 'canary'}",
        "no le": "{'__name__': 'lat_bucket', 'service': 'canary'}",
        "bad le": "bad le='x'",
    }[case]
    assert shown in got.reason, got.reason


# --- a plan's rows counted together (_count_planned) against one by one (_count_series) ---

ROW_VALUES = st.one_of(
    st.integers(0, 60).map(str),
    st.floats(0, 60).map(repr),
    # a non-number anywhere sends the whole answer one by one: rarely, so that most are not
    st.sampled_from(["NaN", "+Inf", "1e1", "-0", "7", "x", *["8"] * 14]),
)
# a series' samples: (time offset from since, value's text); its `_created`'s: (offset, birth)
ROW = st.tuples(
    st.lists(st.tuples(st.integers(-320, 40), ROW_VALUES), max_size=4),
    st.lists(st.tuples(st.integers(-320, 40), st.sampled_from([900.0, 901.0, 902.0])), max_size=3),
)


def _columns_of(reg: _Registration) -> list[tuple[bytes, bytes, object, object, object]]:
    return [
        (sel.numbers.tobytes(), bytes(sel.born), sel.broken, sel.malformed, dict(sel.slots))
        for sel in reg.selectors
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.booleans(), min_size=1, max_size=4),  # each pod's series: listed twice or not
    st.lists(st.lists(ROW, min_size=4, max_size=4), min_size=2, max_size=4),
    st.integers(0, 30),
    st.sampled_from([True, True, True, False]),  # births in time order (else one by one)
)
def test_a_plans_rows_counted_together_count_as_one_by_one(
    twice: list[bool],
    reads: list[list[tuple[list[tuple[int, str]], list[tuple[int, float]]]]],
    later: int,
    sort_births: bool,
) -> None:
    """The same answers read through plans, the rows counted all together (numpy) and one
    series at a time (_count_series): the same columns, byte for byte, and the same reasons,
    read after read. Samples before the lookback, at and around `since`, repeated and out of
    order; births that match some samples' times and not others, changing (a new life) or
    not; NaN, infinities and non-numbers; a series listed twice; two registrations with
    different `since` in one answer."""
    import unittest.mock

    import canary.metrics.batched as batched

    def regs() -> list[_Registration]:
        return [
            PrometheusBatcher("http://127.0.0.1:9")._register(
                PromQueries(requests='reqs_total{service="{arm}"}', primary_arm=p, canary_arm=c),
                1000.0 + since,
            )
            for p, c, since in (("p1", "c1", 0), ("p2", "c2", later))
        ]

    together, alone = regs(), regs()
    caches = (_SeriesCache(), _SeriesCache())
    arms = ("c1", "c2", "p1", "p2")
    for n, rows in enumerate(reads):
        result = []
        for arm in arms:
            for pod, listed_twice in enumerate(twice):
                samples, births = rows[pod]
                labels = {"pod": str(pod), "service": arm}
                base = 1000.0 + 5 * n
                values = [[base + t, v] for t, v in samples]
                created = [[base + t, repr(b)] for t, b in births]
                if sort_births:
                    created = sorted({x[0]: x for x in created}.values())
                result.append({"metric": {"__name__": "reqs_created", **labels}, "values": created})
                for _ in range(2 if listed_twice else 1):
                    result.append(
                        {"metric": {"__name__": "reqs_total", **labels}, "values": values}
                    )
        raw = answer(sorted(result, key=lambda s: json.dumps(s["metric"])))
        for group, cache, vector in ((together, caches[0], True), (alone, caches[1], False)):
            family = group[0].selectors[0].family
            members = [(r, s) for r in group for s in r.selectors if s.family == family]
            for _, sel in members:
                sel.malformed = None
            off = None if vector else (lambda *_: None)
            with unittest.mock.patch.object(
                batched, "_count_planned", off or batched._count_planned
            ):
                assert _apply_family(family, raw, members, cache) is None
        for a, b in zip(together, alone, strict=True):
            assert _columns_of(a) == _columns_of(b)
        caches[0].next_generation()
        caches[1].next_generation()
    assert caches[0].planned == caches[1].planned == len(reads) - 1


# texts a time or a value may be: decimals of any shape, and what float() or _SAMPLE refuse
NUMBER_TEXTS = st.one_of(
    st.floats(allow_nan=False).map(repr),
    st.floats(0, 2e9).map(lambda x: f"{x:.3f}"),
    st.integers(-(10**17), 10**17).map(str),
    st.from_regex(r"[-+]?[0-9]{0,17}\.?[0-9]{0,17}", fullmatch=True),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e3", "1E-2", "", ".", "-", "1.2.3", "x", "1_0"]),
    st.sampled_from(["0", "-0", "+0", "5.", ".5", "-.5", "007", "1733355555.123"]),
    st.text(st.sampled_from('0123456789.-+eE[],"\\ x'), max_size=8),
)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.lists(st.tuples(NUMBER_TEXTS, NUMBER_TEXTS), max_size=4), max_size=6))
@example([[("1 2", "5")]])  # a space inside a time, a value, a birth: not padding
@example([[("5", "1 2")]])
@example([[("5", ". 5")], [("7", "9 1")]])
@example([[("5", "1 ")]])
def test_the_samples_parsed_in_numpy_are_what_sample_and_float_give(
    series: list[list[tuple[str, str]]],
) -> None:
    """_sample_numbers gives each series' samples exactly as _SAMPLE and float() do, bit for
    bit (-0.0 included), or declines where they would not take a sample as it is."""
    result = [
        {"metric": {"pod": str(i)}, "values": [[None, None]] * len(samples)}
        for i, samples in enumerate(series)
    ]
    raw = answer(result)
    for i, samples in enumerate(series):  # the texts as they are, not as JSON would write them
        raw = raw.replace(
            json.dumps(result[i]["values"], separators=(",", ":")).encode(),
            ",".join(f'[{t},"{v}"]' for t, v in samples).join("[]").encode(),
            1,
        )
    spans = _scan(raw)
    if spans is None:
        return  # not an answer _scan splits: nothing for _sample_numbers to read
    table = np.frombuffer(spans, np.int64).reshape(-1, 4)
    got = _sample_numbers(raw, table[:, 2], table[:, 3])
    want_times, want_values, counts = [], [], []
    taken = True
    for a, b in zip(table[:, 2].tolist(), table[:, 3].tolist(), strict=True):
        pairs = _SAMPLE.findall(raw, a, b)
        counts.append(len(pairs))
        if len(pairs) != raw.count(b"[", a, b):
            taken = False
        try:
            want_times += [float(t) for t, _ in pairs]
            want_values += [float(v) for _, v in pairs]
        except ValueError:
            taken = False
    if got is None:
        return
    assert taken  # what it took, the series' own reading takes
    per, times, values = got
    assert per.tolist() == counts
    assert times.tobytes() == np.array(want_times, np.float64).tobytes()
    assert values.tobytes() == np.array(want_values, np.float64).tobytes()


def test_a_quote_as_the_answers_last_byte_is_declined_not_an_index_error() -> None:
    raw = b'x[1,"5"'
    assert _sample_numbers(raw, np.array([1]), np.array([len(raw)])) is None


def test_spaces_inside_numbers_are_declined() -> None:
    """float() refuses `1 2`; read as padding it was 12."""
    for sample in (b'[1 2,"5"]', b'[5,"1 2"]', b'[5,". 5"]'):
        raw = b"x" + sample + b"y"
        assert _sample_numbers(raw, np.array([1]), np.array([1 + len(sample)])) is None


def test_prometheus_like_samples_are_parsed_in_numpy() -> None:
    """The plain decimals Prometheus writes (and NaN, infinities, long fractions: float()'s
    own) are taken, not declined: the counting above is then numpy's."""
    samples = [[1733355555.123, "12"], [1733355560, "-0"], [1733355565.5, "NaN"]]
    samples += [[1733355570.25, "+Inf"], [1733355575, "0.30000000000000004"], [7, "1e3"]]
    raw = answer([{"metric": {"pod": "0"}, "values": samples}, {"metric": {}, "values": []}])
    spans = _scan(raw)
    assert spans is not None
    table = np.frombuffer(spans, np.int64).reshape(-1, 4)
    got = _sample_numbers(raw, table[:, 2], table[:, 3])
    assert got is not None
    per, times, values = got
    assert per.tolist() == [6, 0]
    assert times.tolist() == [float(t) for t, _ in samples]
    assert [repr(v) for v in values.tolist()] == [repr(float(v)) for _, v in samples]
