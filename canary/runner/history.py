"""The recent ticks of one rollout for the live page's charts, held compactly.

One flat array of doubles, a fixed number per tick, instead of a dict per tick: a dict of a
tick with three metrics took ~0.7 KiB, so 1,000 rollouts an hour old held 250 MiB of them
(issue 13); here a tick is 8 bytes a number (21 numbers with three metrics: 20 KiB for 120 ticks). At most
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

_FIXED = 9  # at, elapsed_s, step, weight_set, weight_read, primary (2), canary (2)
_PER_METRIC = 4  # estimate, lower, upper, decision (an index into _decisions)


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _out(value: float) -> float | None:
    return None if math.isnan(value) else value


class TickHistory:
    """The current rollout's recent ticks; a tick of another rollout starts afresh."""

    __slots__ = ("_data", "_decisions", "_metrics", "_stride", "max_points", "rollout")

    def __init__(self, max_points: int = 240) -> None:
        if max_points < 4:
            raise ValueError(f"max_points must be at least 4, got {max_points}")
        self.max_points = max_points
        self.rollout = ""
        self._metrics: tuple[str, ...] = ()
        self._decisions: list[str] = []
        self._stride = _FIXED
        self._data = array("d")

    def __len__(self) -> int:
        return len(self._data) // self._stride

    def clear(self) -> None:
        self._data = array("d")

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

        row = [
            entry.at,
            entry.elapsed_s,
            float(entry.step),
            float(entry.weight_set),
            _num(entry.weight_read),
            *arm(entry.primary),
            *arm(entry.canary),
        ]
        for name in self._metrics:
            m = verdict.metrics.get(name) if verdict is not None else None
            if m is None:
                row += [math.nan] * _PER_METRIC
            else:
                row += [_num(m.estimate), _num(m.lower), _num(m.upper), self._decision(m.decision.value)]
        if len(self) >= self.max_points:
            self._thin()
        self._data.extend(row)

    def _relayout(self, names: tuple[str, ...]) -> None:
        """Another set of metrics (the first verdict, usually): the ticks so far keep their
        numbers, and the metrics they lack are NaN."""
        stride = _FIXED + _PER_METRIC * len(names)
        data = array("d")
        for i in range(len(self)):
            row = self._data[i * self._stride : (i + 1) * self._stride]
            data.extend(row[:_FIXED])
            for name in names:
                if name in self._metrics:
                    k = _FIXED + _PER_METRIC * self._metrics.index(name)
                    data.extend(row[k : k + _PER_METRIC])
                else:
                    data.extend([math.nan] * _PER_METRIC)
        self._metrics, self._stride, self._data = names, stride, data

    def _thin(self) -> None:
        """Drop every other tick of the older half."""
        n, stride = len(self), self._stride
        half = n // 2
        kept = array("d")
        for i in range(0, half, 2):
            kept.extend(self._data[i * stride : (i + 1) * stride])
        kept.extend(self._data[half * stride :])
        self._data = kept

    def points(self) -> list[dict[str, Any]]:
        """The ticks as the live page reads them, oldest first."""
        out = []
        stride = self._stride
        data = self._data
        for i in range(len(self)):
            r = data[i * stride : (i + 1) * stride]
            weight_read = _out(r[4])
            metrics: dict[str, list[Any]] = {}
            for k, name in enumerate(self._metrics):
                est, lo, hi, dec = r[_FIXED + _PER_METRIC * k : _FIXED + _PER_METRIC * (k + 1)]
                if not math.isnan(dec):
                    metrics[name] = [_out(est), _out(lo), _out(hi), self._decisions[int(dec)]]
            out.append(
                {
                    "rollout": self.rollout,
                    "at": r[0],
                    "elapsed_s": r[1],
                    "step": int(r[2]),
                    "weight_set": int(r[3]),
                    "weight_read": None if weight_read is None else int(weight_read),
                    "primary": None if math.isnan(r[5]) else [r[5], r[6]],  # cumulative
                    "canary": None if math.isnan(r[7]) else [r[7], r[8]],
                    "metrics": metrics,  # each metric: [estimate, lower, upper, decision]
                }
            )
        return out
