"""The named pools (canary.executors): work runs on the pool's own threads, which carry the
pool's name down to the OS (so /proc, `top -H` and profilers can tell the pools apart)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from canary.executors import POOLS, run_blocking


def _native_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc thread names")
async def test_each_pool_runs_on_threads_named_after_it() -> None:
    for pool in POOLS:
        native, python = await run_blocking(
            pool, lambda: (_native_name(), threading.current_thread().name)
        )
        assert native == f"canary-{pool}"[:15]
        assert python.startswith(f"canary-{pool}")
    assert _native_name() != "canary-prometheus"[:15]  # the loop's own thread keeps its name
