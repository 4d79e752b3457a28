"""Anytime-valid canary analysis: pure numpy/scipy, no I/O, no asyncio."""

from analysis.types import ArmCounts, Decision, MetricResult, Snapshot, Verdict

__all__ = ["ArmCounts", "Decision", "MetricResult", "Snapshot", "Verdict"]
