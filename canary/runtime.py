"""Process-wide settings of a long-running controller: Python's cyclic garbage collector.

At a thousand rollouts the controller holds a large heap (watch caches, analysis states,
series caches) and allocates briskly (each tick decodes, judges and records). CPython's
default thresholds (700, 10, 10) then run a young collection every few hundred allocations
and an old one over the whole heap every few seconds: 3.75% of the controller's CPU at
1,000 rollouts in benchmarks/scale.py, 4.8% of the runners' in benchmarks/tick_cost.py
(issue 13; ~0 and 0.6% tuned, benchmarks/RESULTS.md).
The code makes few reference cycles (plain data, freed by reference counts), so collecting
less often costs little memory.

`tune_gc()` is called once, when a controller starts serving:
- what was created so far (modules, classes, settings) is frozen out of the collections:
  it lives as long as the process, and each old collection would walk it again;
- young collections run every `YOUNG_THRESHOLD` net allocations instead of 700.

`gc_seconds()` is the time spent collecting, by generation, for /metrics
(`canary_gc_seconds_total`): what the tuning saves, measured where it runs.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

__all__ = ["YOUNG_THRESHOLD", "gc_collections", "gc_seconds", "tune_gc", "watch_gc"]

YOUNG_THRESHOLD = 20_000  # tick_cost at 1,000 rollouts: GC 4.8% -> 0.6% of the CPU

_lock = threading.Lock()
_watching = False
_started: dict[int, float] = {}  # by thread: a collection runs in the thread that set it off
_seconds = [0.0, 0.0, 0.0]
_collections = [0, 0, 0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    # Runs with the GIL held, inside the collection: no lock, nothing that allocates much.
    ident = threading.get_ident()
    if phase == "start":
        _started[ident] = time.perf_counter()
        return
    began = _started.pop(ident, None)
    generation = info.get("generation", 2)
    if began is not None and generation in (0, 1, 2):
        _seconds[generation] += time.perf_counter() - began
        _collections[generation] += 1


def watch_gc() -> None:
    """Time the collections from now on (once per process, however often it is called)."""
    global _watching
    with _lock:
        if not _watching:
            gc.callbacks.append(_on_gc)
            _watching = True


def tune_gc() -> None:
    """Freeze what exists now out of the collections, collect young objects less often, and
    time the collections. Idempotent: a second call only freezes what was created since.
    With CANARY_GC_DEFAULTS=1 the collections are only timed (to measure what this saves)."""
    watch_gc()
    if os.environ.get("CANARY_GC_DEFAULTS") == "1":
        return
    gc.collect()  # garbage from start-up goes, rather than being frozen
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def gc_seconds() -> tuple[float, float, float]:
    """Seconds spent in collections, by generation, since watch_gc()."""
    return (_seconds[0], _seconds[1], _seconds[2])


def gc_collections() -> tuple[int, int, int]:
    """Collections, by generation, since watch_gc()."""
    return (_collections[0], _collections[1], _collections[2])
