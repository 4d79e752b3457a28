"""Traffic routers: where the weights go, one module per backend behind the protocol in `base`.

HAProxy, ingress-nginx, Gateway API, PowerDNS and external-dns, as in Flagger's `pkg/router`.

May import: ``canary.kubernetes.client`` (the cluster seam, for the Kubernetes-backed
routers) and ``canary.kubernetes.informer`` (their read-back cache), ``canary.core.redact`` (errors never show credentials), the shared retry helper and
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
