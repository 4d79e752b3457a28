"""`canary loadtest`: generated load for low-traffic canaries, driven by rollout webhooks.

A service with little traffic never gives the analysis enough canary requests to decide
within a step (the planner's advice says how long it would take; canary.core.advice). Like
Flagger's flagger-loadtester, this is a small HTTP server that a rollout webhook calls every
tick with a Flagger-style payload; it then sends a fixed rate of requests to the canary
Service (or the entry point) for a bounded time. Repeated calls extend the load, never stack it.

    policy     what a payload asks for, checked: limits, the URLs it may target (pure)
    generator  one open-loop job: a fixed rate whatever the target's latency
    server     the aiohttp app (POST /, GET /jobs, /metrics, /healthz) and `serve`

May import: ``canary.core`` (redaction) and ``canary.notify.webhooks`` (the address check
shared with webhooks); never the runner or a supervisor.
"""

from canary.loadtest.generator import Job
from canary.loadtest.policy import (
    BadRequest,
    Limits,
    LoadRequest,
    TargetPolicy,
    parse_duration,
    parse_payload,
)
from canary.loadtest.server import JobManager, build_app, serve

__all__ = [
    "BadRequest",
    "Job",
    "JobManager",
    "Limits",
    "LoadRequest",
    "TargetPolicy",
    "build_app",
    "parse_duration",
    "parse_payload",
    "serve",
]
