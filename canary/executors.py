"""Named, bounded thread pools for the blocking work the controller must do off the loop.

Why not asyncio.to_thread: it shares the loop's default pool (a handful of threads) between
everything, so a slow Prometheus, a large record being packed or a report being rendered
starves the ticks of every other rollout. Each kind of blocking work here gets its own pool,
sized for it and named in thread dumps (``canary-prometheus-3``), so one kind can only queue
behind itself. May import nothing else from canary.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["POOLS", "name_native_thread", "run_blocking"]

P = ParamSpec("P")
T = TypeVar("T")

# pool name -> threads. prometheus: the synchronous prometheus-api-client, one call per
# rollout per tick; files: record appends and status saves (short); packing: gzip of record
# ConfigMaps (CPU); state: failover state files and mirrors; planning: the planner's
# time-to-pass estimates (CPU, up to a few hundred ms, once a minute per rollout at most);
# scrape: /metrics text (~0.3 s at 1,000 rollouts: on the loop it made every tick late).
POOLS: dict[str, int] = {
    "prometheus": 8,
    "files": 4,
    "packing": 2,
    "state": 2,
    "planning": 1,
    "scrape": 1,
}

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def _pool(name: str) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            pool = ThreadPoolExecutor(
                max_workers=POOLS[name],
                thread_name_prefix=f"canary-{name}",
                initializer=name_native_thread,
                initargs=(f"canary-{name}",),
            )
            _pools[name] = pool
        return pool


def name_native_thread(name: str) -> None:
    """Give the OS thread the pool's (or thread's) name too (Linux: 15 bytes), so `top -H`, /proc and
    profilers attribute CPU to a pool, not to "python" (Python 3.11 names only its own
    Thread object)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux, or no prctl: the names are a convenience


async def run_blocking(pool: str, call: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `call(*args, **kwargs)` in the named pool and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(pool), functools.partial(call, *args, **kwargs))
