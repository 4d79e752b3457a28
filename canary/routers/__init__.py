"""Traffic routers: the protocol lives in `base`, one module per backend beside it."""

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
