"""The runner's clock: wall-clock-looking seconds that advance with the monotonic clock.

Timers and deadlines (a step's minimum time, the no-data and router deadlines) must not move
when the wall clock is stepped: stepping it back an hour froze every deadline, stepping it
forward rolled a healthy canary back. So the runner's `now` is the wall time read once, when
the clock is made, plus the monotonic time elapsed since: it never jumps, and it still reads
as a date in records and reports. Across a restart a new clock anchors on the wall time
again, which is the best a new process can know.

Prometheus stamps samples with the machine's wall clock, so queries are asked in that
domain: `wall_offset()` says how far the wall clock has moved from ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["MonotonicWallClock"]


class MonotonicWallClock:
    """Seconds since the epoch as of the anchor, advancing monotonically after it."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._anchor_wall = wall()
        self._anchor_monotonic = monotonic()

    def __call__(self) -> float:
        return self._anchor_wall + (self._monotonic() - self._anchor_monotonic)

    def wall_offset(self) -> float:
        """The wall clock minus this clock: 0 unless the wall clock was stepped."""
        return self._wall() - self()
