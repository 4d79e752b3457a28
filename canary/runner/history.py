"""The recent ticks of one rollout for the live page's charts, held compactly.

Flat arrays of numbers, a fixed number per tick, instead of a dict per tick: a dict of a
tick with three metrics took ~0.7 KiB, so 1,000 rollouts an hour old held 250 MiB of them
(issue 13). The times and the cumulative counts are doubles (`_exact`: they come back as
they went in); the step, the weights and each metric's estimate, bounds and decision are
single precision (`_rest`: small integers exactly, the charts' estimates to 7 digits),
which took a tick with three metrics from 168 to 108 bytes (13 KiB for 120 ticks). At most
`max_points` ticks are kept: when full, every other tick of the older half is dropped, so the
charts cover the whole rollout, finely for the recent ticks and coarser further back.
`points()` gives them back as the dicts the live page reads (`/rollouts?history=1`).
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from analysis import ArmCounts
from canary.core.records import TickEntry

__all__ = ["TickHistory"]

_EXACT = 6  # at, elapsed_s, primary (requests, errors), canary (requests, errors)
_FIXED = 3  # step, weight_set, weight_read
_PER_METRIC = 4  # estimate, lower, upper, decision (an index into _decisions)


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _out(value: float) -> float | None:
    return None if math.isnan(value) else value


class TickHistory:
    """The current rollout's recent ticks; a tick of another rollout starts afresh."""

    __slots__ = ("_decisions", "_exact", "_metrics", "_rest", "_stride", "max_points", "rollout")

    def __init__(self, max_points: int = 240) -> None:
        if max_points < 4:
            raise ValueError(f"max_points must be at least 4, got {max_points}")
        self.max_points = max_points
        self.rollout = ""
        self._metrics: tuple[str, ...] = ()
        self._decisions: list[str] = []
        self._stride = _FIXED  # of _rest
        self._exact = array("d")
        self._rest = array("f")

    def __len__(self) -> int:
        return len(self._exact) // _EXACT

    def clear(self) -> None:
        self._exact = array("d")
        self._rest = array("f")

    def _decision(self, value: str) -> float:
        if value not in self._decisions:
            self._decisions.append(value)
        return float(self._decisions.index(value))

    def append(self, entry: TickEntry) -> None:
        verdict = entry.verdict
        if entry.rollout != self.rollout:
            self.rollout, self._metrics, self._stride = entry.rollout, (), _FIXED
            self._decisions = []
            self.clear()
        if verdict is not None and tuple(verdict.metrics) != self._metrics:
            self._relayout(tuple(verdict.metrics))

        def arm(counts: ArmCounts | None) -> tuple[float, float]:
            if counts is None:
                return math.nan, math.nan
            return counts.requests, counts.errors

        row = [float(entry.step), float(entry.weight_set), _num(entry.weight_read)]
        for name in self._metrics:
            m = verdict.metrics.get(name) if verdict is not None else None
            if m is None:
                row += [math.nan] * _PER_METRIC
            else:
                decision = self._decision(m.decision.value)
                row += [_num(m.estimate), _num(m.lower), _num(m.upper), decision]
        if len(self) >= self.max_points:
            self._thin()
        self._exact.extend((entry.at, entry.elapsed_s, *arm(entry.primary), *arm(entry.canary)))
        self._rest.extend(row)

    def _relayout(self, names: tuple[str, ...]) -> None:
        """Another set of metrics (the first verdict, usually): the ticks so far keep their
        numbers, and the metrics they lack are NaN."""
        stride = _FIXED + _PER_METRIC * len(names)
        rest = array("f")
        for i in range(len(self)):
            row = self._rest[i * self._stride : (i + 1) * self._stride]
            rest.extend(row[:_FIXED])
            for name in names:
                if name in self._metrics:
                    k = _FIXED + _PER_METRIC * self._metrics.index(name)
                    rest.extend(row[k : k + _PER_METRIC])
                else:
                    rest.extend([math.nan] * _PER_METRIC)
        self._metrics, self._stride, self._rest = names, stride, rest

    def _thin(self) -> None:
        """Drop every other tick of the older half."""
        n, stride = len(self), self._stride
        half = n // 2
        exact, rest = array("d"), array("f")
        for i in range(0, half, 2):
            exact.extend(self._exact[i * _EXACT : (i + 1) * _EXACT])
            rest.extend(self._rest[i * stride : (i + 1) * stride])
        exact.extend(self._exact[half * _EXACT :])
        rest.extend(self._rest[half * stride :])
        self._exact, self._rest = exact, rest

    def points(self) -> list[dict[str, Any]]:
        """The ticks as the live page reads them, oldest first."""
        out = []
        stride = self._stride
        exact, rest = self._exact, self._rest
        for i in range(len(self)):
            t = exact[i * _EXACT : (i + 1) * _EXACT]
            r = rest[i * stride : (i + 1) * stride]
            weight_read = _out(r[2])
            metrics: dict[str, list[Any]] = {}
            for k, name in enumerate(self._metrics):
                est, lo, hi, dec = r[_FIXED + _PER_METRIC * k : _FIXED + _PER_METRIC * (k + 1)]
                if not math.isnan(dec):
                    metrics[name] = [_out(est), _out(lo), _out(hi), self._decisions[int(dec)]]
            out.append(
                {
                    "rollout": self.rollout,
                    "at": t[0],
                    "elapsed_s": t[1],
                    "step": int(r[0]),
                    "weight_set": int(r[1]),
                    "weight_read": None if weight_read is None else int(weight_read),
                    "primary": None if math.isnan(t[2]) else [t[2], t[3]],  # cumulative
                    "canary": None if math.isnan(t[4]) else [t[4], t[5]],
                    "metrics": metrics,  # each metric: [estimate, lower, upper, decision]
                }
            )
        return out
