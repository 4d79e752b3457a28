"""Record lines written by pydantic's encoder (canary.core.records.dump_entry) say what
json.dumps of model_dump said before: the same values, NaN and infinities included (pydantic
writes them as null unless each model says otherwise), so reports read old and new lines alike."""

from __future__ import annotations

import gzip
import json
import math
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from analysis import ArmCounts
from canary.core import records
from canary.core.records import TickEntry, dump_entry, parse_lines

DATA = Path(__file__).resolve().parent.parent / "reports" / "data"


def old_dump(entry: BaseModel) -> str:
    return json.dumps(entry.model_dump(mode="json", by_alias=True), separators=(",", ":"))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


def test_every_line_of_real_records_is_written_as_before() -> None:
    lines = 0
    for path in sorted(DATA.glob("*.jsonl.gz")):
        text = gzip.decompress(path.read_bytes()).decode()
        for entry in parse_lines(text.splitlines()):
            assert same(json.loads(dump_entry(entry)), json.loads(old_dump(entry)))
            lines += 1
    assert lines > 20


def test_nan_and_infinities_are_written_as_json_dumps_writes_them() -> None:
    line = gzip.decompress(next(DATA.glob("*.jsonl.gz")).read_bytes()).decode().splitlines()
    tick = next(e for e in parse_lines(line) if isinstance(e, TickEntry))
    assert tick.verdict is not None
    metrics = {
        name: result.model_copy(
            update={"estimate": math.nan, "upper": math.inf, "e_value_pass": math.inf}
        )
        for name, result in tick.verdict.metrics.items()
    }
    odd = tick.model_copy(
        update={
            "observed_canary_share": math.nan,
            "elapsed_s": math.inf,
            "canary": ArmCounts(requests=1.0, errors=0.0, latency_buckets={math.inf: 1.0}),
            "verdict": tick.verdict.model_copy(update={"metrics": metrics}),
        }
    )
    new, old = dump_entry(odd), old_dump(odd)
    assert same(json.loads(new), json.loads(old))
    assert json.loads(new)["observed_canary_share"] != json.loads(new)["observed_canary_share"]


def _models(tp: Any, seen: set[type]) -> None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp in seen:
            return
        seen.add(tp)
        for field in tp.model_fields.values():
            _models(field.annotation, seen)
        return
    for arg in typing.get_args(tp):
        _models(arg, seen)


def test_every_model_inside_an_entry_writes_nan_as_json_dumps_does() -> None:
    seen: set[type] = set()
    _models(records.Entry, seen)
    assert TickEntry in seen and ArmCounts in seen and len(seen) >= 8
    wrong = [m.__name__ for m in seen if m.model_config.get("ser_json_inf_nan") != "constants"]
    assert not wrong, f"models that would write NaN/inf as null in records: {wrong}"
