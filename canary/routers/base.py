"""The TrafficRouter seam: one small protocol, one file per backend.

Modelled on Flagger's `pkg/router/router.go` and Argo Rollouts' SetWeight/VerifyWeight:
a weight only counts as applied once it has been read back from the router itself.

Exception tree::

    RouterError                 anything a router could not do
    ├── RouterUnreachable       no answer (socket gone, connection refused, timeout)
    ├── RouterRejected          the router answered with an error; `.server_message` is its text
    └── WeightMismatch          the weight read back differs from the one set
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = [
    "RouterError",
    "RouterRejected",
    "RouterUnreachable",
    "TrafficRouter",
    "WeightMismatch",
    "set_and_verify",
]


class RouterError(Exception):
    """A router could not do what was asked."""


class RouterUnreachable(RouterError):
    """The router did not answer."""


class RouterRejected(RouterError):
    """The router answered with an error; its own words are kept."""

    def __init__(self, command: str, server_message: str) -> None:
        super().__init__(f"{command!r} rejected: {server_message.strip()}")
        self.command = command
        self.server_message = server_message


class WeightMismatch(RouterError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"weight read back is {actual}%, expected {expected}%")
        self.expected = expected
        self.actual = actual


@runtime_checkable
class TrafficRouter(Protocol):
    """Splits traffic between primary and canary. Weights are canary percentages, 0..100."""

    name: str

    async def set_weight(self, canary_percent: int) -> None:
        """Send the weight to the router. Raises RouterError."""

    async def get_weight(self) -> int:
        """Read the canary's current share back from the router. Raises RouterError."""


async def set_and_verify(router: TrafficRouter, canary_percent: int) -> int:
    """Set a weight, read it back, and raise WeightMismatch unless it took."""
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"canary_percent must be within 0..100, got {canary_percent}")
    await router.set_weight(canary_percent)
    actual = await router.get_weight()
    if actual != canary_percent:
        raise WeightMismatch(canary_percent, actual)
    return actual
