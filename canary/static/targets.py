"""The static-target supervisor: one runner per target described by a YAML file.

The target's router is HAProxy's runtime API, its counts come from Prometheus, and its
status and record live in files beside each other (``record_dir``), so a restarted
`canary run` resumes the same rollout.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["BadTarget", "build_runner"]


class BadTarget(Exception):
    """A config that validated but could not be turned into a router or metrics provider."""


def build_runner(
    config: Any,
    *,
    stamp: str | None = None,
    fresh: bool = False,
    allow_webhook_hosts: tuple[str, ...] = (),
) -> Any:
    """A RolloutRunner for a static target (real HAProxy router, real Prometheus metrics,
    and its gate webhooks, if any: the runner closes their client)."""
    from analysis import Analyzer
    from canary.core.redact import redact_url
    from canary.metrics.prometheus import PrometheusMetrics
    from canary.notify.gates import GateCaller, load_from_gates
    from canary.routers.haproxy import HAProxyRouter
    from canary.runner import RolloutRunner

    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        analysis_config = config.analysis_config()
        router = HAProxyRouter(
            config.router.socket,
            config.router.backend,
            config.router.primary_server,
            config.router.canary_server,
            name=f"haproxy:{config.router.backend}",
            state_file=config.router.state_file,
            timeout_s=config.router.timeout_s,
            match=config.match,
            ab_map=config.router.ab_map,
            affinity=config.router.affinity,
        )
        metrics = PrometheusMetrics(
            config.metrics.url, queries=config.metrics.queries, timeout_s=config.metrics.timeout_s
        )
    except ValueError as exc:
        raise BadTarget(f"{config.name}: {exc}") from None
    return RolloutRunner(
        name=config.name,
        spec=config.rollout_spec(),
        router=router,
        metrics=metrics,
        record_path=Path(config.record_dir) / f"{config.name}-{stamp}.jsonl",
        # An unfinished rollout saved here is resumed (same record, same step) unless fresh.
        status_path=Path(config.record_dir) / f"{config.name}.status.json",
        resume_saved=not fresh,
        tick_s=config.tick_s,
        analyzer_factory=lambda: Analyzer(analysis_config),
        analysis=analysis_config,
        # with the load a rollout hook asks for (metadata rps/at)
        **config.runner_traffic(load_from_gates(config.gates)),
        revision=config.canary_version or stamp,
        primary_version=config.primary_version,
        canary_version=config.canary_version,
        config={
            "analysis": analysis_config.model_dump(mode="json"),
            "tick_s": config.tick_s,
            "router": config.router.model_dump(mode="json"),
            "metrics": {"url": redact_url(config.metrics.url)},
        },
        gates=GateCaller(config.gates, allow_hosts=allow_webhook_hosts) if config.gates else None,
    )
