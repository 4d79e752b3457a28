"""Traffic routers: the protocol lives in `base`, one module per backend beside it.

May import: ``canary.kubernetes.client`` (the Kubernetes routers' one API seam) and
``canary.clusters.dns`` (PowerDNS reads back its answers); never the runner or a supervisor.
"""

from canary.routers.base import (
    RouterError,
    RouterRejected,
    RouterUnreachable,
    TrafficRouter,
    WeightMismatch,
    set_and_verify,
)

__all__ = [
    "RouterError",
    "RouterRejected",
    "RouterUnreachable",
    "TrafficRouter",
    "WeightMismatch",
    "set_and_verify",
]
