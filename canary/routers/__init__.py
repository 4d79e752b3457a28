"""Traffic routers: where the weights go. The protocol lives in `base`, one module per backend
beside it (HAProxy, ingress-nginx, Gateway API, PowerDNS, external-dns), as in Flagger's
`pkg/router`.

May import: ``canary.kubernetes.client`` (the cluster seam, for the Kubernetes-backed
routers), ``canary.core.redact`` (errors never show credentials), the shared retry helper and
the standard library; never the runner or a supervisor.
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
