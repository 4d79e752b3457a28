"""Process-wide settings of a long-running controller: garbage collection, malloc, TLS reads.

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

`tune_malloc()`: glibc gives each thread that allocates its own malloc arena (up to eight
a core), and memory freed in one is kept for that thread. The controller's threads (its
pools: Prometheus answers, record packing, planning; the Leases' loop) each held a few MiB
to ~10 MiB that way at 1,000 rollouts, most of it free (issue 13's 300 MiB). With the GIL
held for nearly every allocation they seldom contend, so MALLOC_ARENA_MAX arenas serve them
all. Set before any thread starts; MALLOC_ARENA_MAX in the environment wins (glibc reads
it), and CANARY_MALLOC_DEFAULTS=1 leaves glibc's own.

`trimming_malloc()`: glibc keeps the memory a process frees (in its arenas' free lists, and
between chunks still in use) for its next allocations, returning to the system only a free
top of the heap larger than its trim threshold, which rises with the largest block freed.
`malloc_trim(0)` every TRIM_PERIOD_S gives every free page of every arena back (madvise;
0.1 ms in a 140 MiB process here). At 2,000 rollouts over 2 shards it changed the replicas'
RSS by no more than the runs' noise (benchmarks/RESULTS.md, issue 13): what they hold is in
use or in CPython's own arenas. It is kept for the free heap it does return (tested), at no
measurable cost. CANARY_MALLOC_DEFAULTS=1 leaves glibc's own.

`tune_tls_reads()`: asyncio's TLS protocol (Python 3.11's `asyncio.sslproto`) allocates a
256 KiB read buffer for every connection when it is made, zero-filled, so resident: the
controller keeps ~45 connections to the API server open at 1,000 rollouts (its requests in
flight, its watches), ~12 MiB of buffers against issue 13's 300 MiB. Reads of 64 KiB at a
time serve its answers (a record's head is at most ~100 KiB: two reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "MALLOC_ARENAS",
    "TLS_READ_BYTES",
    "TRIM_PERIOD_S",
    "YOUNG_THRESHOLD",
    "gc_collections",
    "gc_seconds",
    "malloc_trimmer",
    "trimmed",
    "trimming_malloc",
    "tune_gc",
    "tune_malloc",
    "tune_tls_reads",
    "watch_gc",
]

YOUNG_THRESHOLD = 20_000  # tick_cost at 1,000 rollouts: GC 4.8% -> 0.6% of the CPU
TLS_READ_BYTES = 64 * 1024
MALLOC_ARENAS = 2  # the main one and one for all the other threads
_M_ARENA_MAX = -8  # glibc's malloc.h
TRIM_PERIOD_S = 30.0

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


def _glibc(name: str, argtypes: list[Any]) -> Any | None:
    """glibc's malloc function `name` (a ctypes function returning an int), or None where it
    is not there (musl, macOS) or CANARY_MALLOC_DEFAULTS=1 asks for glibc's own settings."""
    if os.environ.get("CANARY_MALLOC_DEFAULTS") == "1":
        return None
    try:
        import ctypes

        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def tune_malloc() -> bool:
    """At most MALLOC_ARENAS malloc arenas for the process (see the module's docstring).
    True if set; False where glibc's mallopt is not there (musl, macOS), when the
    environment chose, or when glibc refused."""
    import ctypes

    mallopt = None if "MALLOC_ARENA_MAX" in os.environ else _glibc("mallopt", [ctypes.c_int] * 2)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


def malloc_trimmer() -> Callable[[], bool] | None:
    """glibc's `malloc_trim(0)` as a call (True when it gave memory back), or None where
    there is none (musl, macOS) or CANARY_MALLOC_DEFAULTS=1 asks for glibc's defaults."""
    import ctypes

    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return None
    return lambda: bool(trim(0))


@contextlib.asynccontextmanager
async def trimming_malloc(period_s: float = TRIM_PERIOD_S) -> AsyncIterator[None]:
    """While the block runs, give glibc's free memory back every `period_s` (see the
    module's docstring). The trim runs on the loop: it is short, and ctypes lets the pools'
    threads run meanwhile. Nothing happens where there is no trim."""
    trim = malloc_trimmer()
    if trim is None:
        yield
        return

    async def every() -> None:
        while True:
            await asyncio.sleep(period_s)
            trim()

    task = asyncio.create_task(every(), name="canary-malloc-trim")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])  # a cancel of our own caller still reaches it


async def trimmed(awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, with trimming_malloc() around it (for asyncio.run)."""
    async with trimming_malloc():
        return await awaitable


def tune_tls_reads() -> None:
    """Make asyncio's TLS connections read (and buffer) TLS_READ_BYTES at a time, not 256
    KiB (see the module's docstring); connections made before keep theirs. A Python whose
    sslproto has no such setting is left as it is; CANARY_TLS_DEFAULTS=1 leaves it too."""
    import asyncio.sslproto

    protocol = asyncio.sslproto.SSLProtocol
    if os.environ.get("CANARY_TLS_DEFAULTS") == "1" or not hasattr(protocol, "max_size"):
        return
    protocol.max_size = min(protocol.max_size, TLS_READ_BYTES)


def gc_seconds() -> tuple[float, float, float]:
    """Seconds spent in collections, by generation, since watch_gc()."""
    return (_seconds[0], _seconds[1], _seconds[2])


def gc_collections() -> tuple[int, int, int]:
    """Collections, by generation, since watch_gc()."""
    return (_collections[0], _collections[1], _collections[2])
