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
