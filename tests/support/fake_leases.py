"""The Lease API in memory on a clock the test moves: for the electors' timing rules
(canary.kubernetes.shards, canary.kubernetes.client.LeaderElector), which the emulator's
real time would make slow and loose."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from canary.kubernetes.client import Conflict, NotFound


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Leases:
    """The Lease API in memory: a read takes `read_s` on the clock (served at its end, after
    `during_read` ran: a write landing while the read is under way), writes are instant."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.read_s = 0.0
        self.during_read: Callable[[], None] | None = None
        self.taken: list[tuple[float, str]] = []  # (when, by whom) of each acquisition

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.leases[stored["metadata"]["name"]] = stored
        return copy.deepcopy(stored)

    def renew(self, holder: str, name: str = "canary-shard-0-of-1", duration: int = 15) -> None:
        """`holder` (another replica) writes its renewal now."""
        self._store(
            {
                "metadata": {"name": name, "namespace": "canary-system"},
                "spec": {
                    "holderIdentity": holder,
                    "renewTime": f"renewed at {self.version}",  # records never repeat
                    "leaseDurationSeconds": duration,
                },
            }
        )

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        if isinstance(self.clock, Clock):
            self.clock.t += self.read_s
        if self.during_read is not None:
            self.during_read()
            self.during_read = None
        if name not in self.leases:
            raise NotFound(name)
        return copy.deepcopy(self.leases[name])

    async def replace_lease(
        self, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        current = self.leases.get(name)
        if current is None:
            raise NotFound(name)
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise Conflict(name)
        holder = body["spec"]["holderIdentity"]
        if holder != current["spec"]["holderIdentity"]:
            self.taken.append((self.clock(), holder))
        return self._store(body)

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["metadata"]["name"] in self.leases:
            raise Conflict(body["metadata"]["name"])
        self.taken.append((self.clock(), body["spec"]["holderIdentity"]))
        return self._store(body)
