"""canary.runtime: the garbage collector's settings for a long-running controller, and the
time its collections take on /metrics (issue 13)."""

from __future__ import annotations

import gc

from support.probe import run_probe

from canary.runner.telemetry import Telemetry
from canary.runtime import YOUNG_THRESHOLD, gc_collections, gc_seconds, watch_gc

_PROBE = """
import gc, json
from canary.runtime import tune_gc
before = gc.get_threshold()
tune_gc()
junk = [[i] for i in range(1000)]  # young objects: not frozen
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "timed": len(gc.callbacks)}))
"""


def _probe(**env: str) -> dict[str, object]:
    # A process of its own: freezing the test process' heap would keep its cyclic garbage.
    return run_probe(_PROBE, **env)


def test_a_controller_freezes_its_start_up_heap_and_collects_young_objects_less_often() -> None:
    tuned = _probe()
    assert tuned["before"] == [700, 10, 10]
    assert tuned["after"] == [YOUNG_THRESHOLD, 10, 10]
    assert isinstance(tuned["frozen"], int) and tuned["frozen"] > 5_000  # modules, classes
    assert tuned["timed"] == 1
    # CANARY_GC_DEFAULTS=1 keeps CPython's settings and only times the collections
    untuned = _probe(CANARY_GC_DEFAULTS="1")
    assert untuned["after"] == [700, 10, 10]
    assert untuned["frozen"] == 0
    assert untuned["timed"] == 1


def test_collections_are_timed_on_metrics() -> None:
    watch_gc()
    watch_gc()  # once per process, however often it is called
    assert gc.callbacks.count(gc.callbacks[-1]) == 1
    seconds, collections = gc_seconds(), gc_collections()
    gc.collect()
    assert gc_collections()[2] == collections[2] + 1
    assert gc_seconds()[2] > seconds[2]
    page = Telemetry("kubernetes").exposition().decode()
    shown = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in page.splitlines()
        if line.startswith(("canary_gc_seconds_total", "canary_gc_collections_total"))
    }
    assert shown['canary_gc_collections_total{generation="2"}'] == gc_collections()[2]
    assert shown['canary_gc_seconds_total{generation="2"}'] == gc_seconds()[2] > 0
    assert set(shown) == {
        f'canary_gc_{name}_total{{generation="{g}"}}'
        for name in ("seconds", "collections")
        for g in range(3)
    }
