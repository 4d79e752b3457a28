"""Waiting, in a test, for what a background task (a watch, a delivery) will make true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Return once `check()` holds; AssertionError naming `what` after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
