"""Metric sources: both arms' cumulative counts, for the analysis.

``base`` holds the seam (``MetricSource``, ``ArmsCounts``, ``NoData``); ``prometheus`` the
Prometheus adapter, one per rollout; ``batched`` one reader per Prometheus that serves many
rollouts (Kubernetes mode) with the same counts. Errors become ``NoData`` values, never exceptions. May import:
``analysis`` types and ``canary.core.redact`` (reasons never show credentials); never the
runner or a supervisor.
"""
