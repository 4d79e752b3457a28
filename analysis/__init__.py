"""Anytime-valid canary analysis: pure numpy, no I/O, no asyncio.

The contract (DESIGN.md, "The analysis contract")::

    from analysis import Analyzer, AnalysisConfig, Snapshot, ArmCounts
    verdict = Analyzer(AnalysisConfig()).observe(Snapshot(...))
    verdict.decision, verdict.reasons, verdict.metrics

Modules: counts.py (the conditional count test and rate bounds), latency.py (histogram
buckets -> slow-request counts), judge.py (metrics -> decision and reasons), config.py
(validated settings), planner.py (expected time to a decision, from assumed or observed rates, and whether a step
is long enough to pass a good canary), invgauss.py (the planner's inverse-Gaussian quantile, so
that the controller never imports scipy: ~70 MiB), analyzer.py (the glue).
"""

from analysis.analyzer import Analyzer
from analysis.config import AnalysisConfig, MetricConfig
from analysis.planner import MetricPlan, PassAdvice, Plan, pass_advice, plan, plan_from_counts
from analysis.types import ArmCounts, Decision, MetricResult, Snapshot, Verdict

__all__ = [
    "AnalysisConfig",
    "Analyzer",
    "ArmCounts",
    "Decision",
    "MetricConfig",
    "MetricPlan",
    "MetricResult",
    "PassAdvice",
    "Plan",
    "Snapshot",
    "Verdict",
    "pass_advice",
    "plan",
    "plan_from_counts",
]
