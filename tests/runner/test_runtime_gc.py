"""canary.runtime: the garbage collector's settings for a long-running controller, and the
time its collections take on /metrics (issue 13)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

from canary.runner.telemetry import Telemetry
from canary.runtime import YOUNG_THRESHOLD, gc_collections, gc_seconds, watch_gc

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import gc, json
from canary.runtime import tune_gc
before = gc.get_threshold()
tune_gc()
junk = [[i] for i in range(1000)]  # young objects: not frozen
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "timed": len(gc.callbacks)}))
"""


def _run(source: str, *args: str, **env: str) -> dict[str, object]:
    """`source`'s JSON line, run by a process of its own (freezing the test process' heap
    would keep its cyclic garbage; its malloc arenas are made already), without any
    MALLOC_ARENA_MAX of the test's environment but with `env`'s."""
    import json

    done = subprocess.run(
        [sys.executable, "-c", source, *args],
        env={
            **{k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"},
            **env,
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _probe(**env: str) -> dict[str, object]:
    return _run(_PROBE, **env)


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


_ARENAS = """
import ctypes, json, os, sys, tempfile, threading
from canary.runtime import limit_malloc_arenas
limited = limit_malloc_arenas() if sys.argv[1] == "limit" else False
together = threading.Barrier(8)
def work():
    held = [bytearray(64 << 10) for _ in range(64)]  # past pymalloc: malloc's own arenas
    together.wait()  # all eight alive at once: an exited thread's arena is reused
    del held
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
path = os.path.join(tempfile.mkdtemp(), "info.xml")
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(json.dumps({"limited": limited, "heaps": open(path).read().count("<heap nr=")}))
"""


def _arenas(mode: str, **env: str) -> dict[str, object]:
    return _run(_ARENAS, mode, **env)


def test_malloc_arenas_are_limited_unless_the_environment_says_otherwise() -> None:
    """Threads that allocate get glibc arenas of their own, up to eight per core, unless
    tune_gc's limit_malloc_arenas holds them to two; MALLOC_ARENA_MAX in the environment
    (the operator's own choice) is left to glibc."""
    free = _arenas("free")
    assert free["limited"] is False and int(str(free["heaps"])) > 2  # the probe makes arenas
    assert _arenas("limit") == {"limited": True, "heaps": 2}
    assert _arenas("limit", MALLOC_ARENA_MAX="3") == {"limited": False, "heaps": 3}
