"""canary.runtime.tune_malloc: the controller's threads share one malloc arena instead of
each holding its own (glibc keeps what a thread freed in that thread's arena: issue 13's
300 MiB). Measured in a child process, as glibc's malloc_stats() counts its arenas."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)

CHILD = """
import ctypes, threading, sys
from canary.runtime import MALLOC_ARENAS, tune_malloc
print(tune_malloc(), flush=True)
go = threading.Barrier(8)
def work():
    go.wait()
    held = [bytearray(100_000) for _ in range(20)]  # malloc's, not pymalloc's
    go.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()
"""


def arenas(**env: str) -> tuple[str, int]:
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return child.stdout.strip(), child.stderr.count("Arena ")


def test_the_threads_share_the_arenas_it_allows() -> None:
    told, tuned = arenas()
    assert told == "True" and tuned <= 2, (told, tuned)
    told, default = arenas(CANARY_MALLOC_DEFAULTS="1")
    assert told == "False" and default > 2, (told, default)


def test_the_environment_s_choice_wins() -> None:
    told, chosen = arenas(MALLOC_ARENA_MAX="4")
    assert told == "False" and 2 < chosen <= 4, (told, chosen)


TRIM_CHILD = """
import asyncio
from canary.runtime import trimming_malloc

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

# 200 MiB of malloc's blocks (under its mmap threshold: from the heap), every other one freed
# and the last kept, so no free top of the heap is left to give back on its own
held = [bytearray(64_000) for _ in range(3_200)]
del held[::2]
before = rss_kib()

async def main():
    async with trimming_malloc(period_s=0.05):
        await asyncio.sleep(0.5)
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

left = asyncio.run(main())
print(before, rss_kib(), len(left), len(held))
"""


def trim_child(**env: str) -> tuple[int, int, int]:
    child = subprocess.run(
        [sys.executable, "-c", TRIM_CHILD],
        env=dict(os.environ) | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    before, after, left, _ = (int(x) for x in child.stdout.split())
    return before, after, left


def test_the_free_memory_goes_back_to_the_system_while_trimming() -> None:
    before, after, left = trim_child()
    assert before - after > 80_000, (before, after)  # ~100 MiB freed in the heap's middle
    assert left == 0  # the trimming task is cancelled and awaited on the way out
    before, after, left = trim_child(CANARY_MALLOC_DEFAULTS="1")
    assert before - after < 20_000, (before, after)  # glibc alone keeps it
