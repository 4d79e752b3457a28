"""Shards: controller replicas split the rollouts, each shard held through its own Lease.

Why: one leader runs every rollout, so one process bounds how many there can be. With
`canary kubernetes --shards N` a rollout belongs to shard `shard_of(namespace, name, N)` (a
stable sha256, the same in every process, unlike Python's salted `hash()`), and a replica acts
on a rollout only while it holds that shard's coordination.k8s.io/v1 Lease
`<prefix>-<i>-of-<N>` in its own namespace. Kubernetes is the only coordination service.

Who holds what. Every `retry_period_s` a replica reads the N Leases. Its fair share is
ceil(N / members), members being the live holders, the replicas that asked for a shard (below)
and itself. It renews what it holds, and acquires:

- a free Lease (never created, or released) while it holds less than its fair share;
- any Lease whose record (holder, renewTime, ...) it has seen unchanged for the Lease's
  duration: an expired holder's, or one free that long (nobody took it), whatever its share.

A replica below its fair share with nothing free writes its identity into the annotation
`canary.dev/shard-wanted-by` of a Lease of the most loaded holder, if that holder is above its
fair share. The holder counts the asker as a member, so it is above its share, and releases
that Lease (an empty holder) after stopping its rollouts; the asker then takes it. Two replicas
thus split two shards one each, and a third one joining takes nothing: everybody is at its
share. A request is answered in the round that sees it: by the release, or else cleared by
the renewal (the asker asks again if it still should). An asker that died before its answer
makes the holder release for nobody; the holder takes the Lease back once it has been free
for a Lease duration. The annotation is left out of the liveness record, so asking never
looks like a renewal.

Fencing, the argument (as client-go's leaderelection, with an earlier start of the count).
A replica holds shard i until `started + renew_deadline_s`, where `started` is the monotonic
time *before* it read the Lease in the round whose renewal succeeded; the renewal was written
after `started`, so the holder stops acting at most `renew_deadline_s` after its write `w`.
Another replica takes the Lease over only once it has seen the record unchanged from a point
`since` of its own monotonic clock for `lease_duration_s`: it writes at the earliest at
`since + lease_duration_s`, after the holder stopped acting by at least
`since + lease_duration_s - (w + renew_deadline_s)`. Which `since`: let `F` be when the read
that first showed the record returned (so `w < F`), and `P` the `started` of the last round
whose read of that Lease returned the record before (it was served after `P` and did not show
the renewal, so `P < w`). client-go counts from `F`: the margin is then over
`lease_duration_s - renew_deadline_s` (5 s of 15; `renew_deadline_s < lease_duration_s` is
checked), but the takeover comes a Lease duration after the survivor
*saw* the renewal, up to a retry period late. So the count starts at `P` when
`F - P <= lease_duration_s - renew_deadline_s - SAFETY_S`: the margin is then more than
`lease_duration_s - renew_deadline_s - (F - P)`, so at least SAFETY_S (1 s) in the worst case
(the renewal written just before `F`), about 3 s with regular reads (`F - P` a retry period, 2 s,
plus a round); else (a first sight, no earlier read; a stalled or slow round; timings that
leave no room, checked) from `F`, as client-go. The margin is what is left for a write
already under way when `holds(i)` turned False and for the two clocks' rates. The rule
assumes the holder's renew deadline is this replica's: it applies only to a record whose
`leaseDurationSeconds` is this replica's own, the timings being derived from it
(canary.cli.kubernetes.lease_timings). A replica also wakes when a record it watches would
expire, not only every retry period, so that the takeover comes at `P + lease_duration_s`
(when reads are regular, within the Lease duration of the holder's last renewal), not a
round later. Reads are the API server's quorum reads (a GET without resourceVersion), so a
read started after another returned sees at least what that one saw; records never repeat
(renewTime moves). A takeover is a resourceVersion-guarded replace of the record it
observed, so a renewal in the meantime makes it fail. A release is written only after the
releaser stopped its rollouts (`on_release`, awaited), which is why a released Lease may be
taken at once.

The thread. `canary kubernetes` runs this loop on a thread of its own, `canary-leases`, with
its own event loop and Kube client (canary.kubernetes.lease_thread): on the controller's loop,
a loop saturated by a thousand rollouts delayed the renewals past their deadline, and a
replica let go of its shards and took them back over and over (issue 13). Nothing above
changes: `holds(i)` is still `clock() < started + renew_deadline_s` on the same monotonic
clock, read by the operator's loop from a snapshot the elector's thread swaps whole (never a
dict changed under a reader), and `on_release` still runs (on the operator's loop) and is
awaited before the release is written. A busy operator loop only makes its writes later,
each still checking `holds(i)` first; the Lease stays renewed meanwhile. A handover waits for
that loop to stop the shard's rollouts in a task of its own: `holds(i)` turned False before
it started, and the other shards are renewed meanwhile (awaited in the round, a thousand
rollouts stopping on a busy loop made them lapse too). Should the wait outlast the Lease, the
asker takes the unrenewed Lease as expired: fenced as any other takeover.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from canary.kubernetes.client import (
    SAFETY_S,
    Conflict,
    Kube,
    KubeError,
    NotFound,
    kept_metadata,
)

__all__ = ["SAFETY_S", "WANTED_BY", "ShardElector", "shard_lease_name", "shard_of"]

log = logging.getLogger("canary.kubernetes.shards")

JSON = dict[str, Any]
WANTED_BY = "canary.dev/shard-wanted-by"
MAX_SHARDS = 256  # a Lease read each per round: far more would cost more than it spreads


def shard_of(namespace: str, name: str, shards: int) -> int:
    """The shard of the rollout `namespace/name`: stable across processes and versions."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_lease_name(prefix: str, index: int, shards: int) -> str:
    return f"{prefix}-{index}-of-{shards}"


def _now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(lease: JSON | None) -> tuple[Any, ...]:
    """What a renewal changes (client-go compares the same): not the annotations."""
    if lease is None:
        return ("absent",)
    spec = lease.get("spec") or {}
    return tuple(
        spec.get(k)
        for k in (
            "holderIdentity",
            "renewTime",
            "acquireTime",
            "leaseDurationSeconds",
            "leaseTransitions",
        )
    )


def _holder(lease: JSON | None) -> str:
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def _wanted_by(lease: JSON | None) -> str:
    annotations = ((lease or {}).get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(WANTED_BY) or "")


@dataclass
class ShardElector:
    """Holds a fair share of the N shard Leases; `holds(i)` is the only truth (see above)."""

    kube: Kube
    namespace: str
    prefix: str
    shards: int
    identity: str
    lease_duration_s: int = 15
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    # Awaited before a Lease is released: stop acting on the shard's rollouts.
    on_release: Callable[[int], Awaitable[None]] | None = None
    clock: Callable[[], float] = time.monotonic
    safety_s: float = SAFETY_S
    # Read from other threads (the operator's loop, /metrics) while the elector's own thread
    # writes them (canary.kubernetes.lease_thread): each is swapped whole, never mutated.
    # shard -> (held until, term)
    _held: dict[int, tuple[float, int]] = field(default_factory=dict, init=False)
    _leases: dict[int, JSON | None] = field(default_factory=dict, init=False)
    # shard -> (record, since when it counts as unchanged); only this elector's thread
    _observed: dict[int, tuple[tuple[Any, ...], float]] = field(default_factory=dict, init=False)
    # shard -> `started` of the last round whose read of its Lease succeeded
    _last_read: dict[int, float] = field(default_factory=dict, init=False)
    # The longest `F - P` for which a record's count starts at `P`; None: never (no room)
    _from_previous_within: float | None = field(default=None, init=False)
    # The earliest time at which another holder's record, as observed, will have expired
    _next_expiry: float = field(default=math.inf, init=False)
    # Handovers under way: each waits for its shard's rollouts to stop, which may take long
    # on a busy operator loop; the other shards are renewed meanwhile.
    _releasing: dict[int, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _acquired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {self.shards}")
        if self.lease_duration_s < 1:
            raise ValueError(f"lease_duration_s must be >= 1, got {self.lease_duration_s}")
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError(
                "shard leases need 0 < retry_period_s < renew_deadline_s < lease_duration_s, "
                f"got {self.retry_period_s}, {self.renew_deadline_s}, {self.lease_duration_s}"
            )
        if not self.identity:
            raise ValueError("identity must not be empty")
        if self.safety_s <= 0:
            raise ValueError(f"safety_s must be > 0, got {self.safety_s}")
        room = self.lease_duration_s - self.renew_deadline_s - self.safety_s
        if room >= self.retry_period_s:
            self._from_previous_within = room
        else:  # a read a retry period after the previous one would never qualify
            log.info(
                "shard leases: a takeover counts from when the renewal was seen (Lease %ss, "
                "renew deadline %ss, retry %ss leave less than %ss of margin otherwise)",
                self.lease_duration_s,
                self.renew_deadline_s,
                self.retry_period_s,
                self.safety_s,
            )

    # ---- what this replica holds ----------------------------------------------------

    def name(self, index: int) -> str:
        return shard_lease_name(self.prefix, index, self.shards)

    def shard_of(self, namespace: str, name: str) -> int:
        return shard_of(namespace, name, self.shards)

    def holds(self, index: int) -> bool:
        """Whether this replica may act on shard `index` now (lapses by itself)."""
        return self.clock() < self._held.get(index, (0.0, 0))[0]

    def held(self) -> dict[int, int]:
        """The shards held now, each with its term (a new term on each acquisition)."""
        now = self.clock()
        return {i: term for i, (until, term) in self._held.items() if now < until}

    def holders(self) -> dict[int, str]:
        """Each shard's holder as last read ("" free or unknown)."""
        leases = self._leases
        return {i: _holder(leases.get(i)) for i in range(self.shards)}

    def _remember(self, index: int, lease: JSON | None) -> None:
        self._leases = {**self._leases, index: lease}

    def _drop(self, index: int) -> None:
        if index in self._held:
            self._held = {i: held for i, held in self._held.items() if i != index}
            log.info("shard lease %s: %s stops acting", self.name(index), self.identity)

    # ---- the loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire, renew, hand over until `stop` is set, then release every Lease held."""
        try:
            while not stop.is_set():
                try:
                    await self.round()
                except KubeError as exc:
                    log.warning("shard leases: %s", exc)
                wake = self.wake_at()
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, wake - self.clock()))
                except TimeoutError:
                    pass
                for index in [i for i in self._held if not self.holds(i)]:
                    self._drop(index)  # the renew deadline passed: fenced already
        finally:
            handovers = list(self._releasing.values())
            if not stop.is_set():
                for task in handovers:
                    task.cancel()
            await asyncio.gather(*handovers, return_exceptions=True)
            if stop.is_set():
                await self.release_all()
            self._held = {}

    def wake_at(self) -> float:
        """When the loop looks again: a retry period from now, or sooner when a shard held
        lapses or another holder's record would have expired (a takeover then, not a round
        later)."""
        now = self.clock()
        wake = now + self.retry_period_s
        if self._held:
            wake = min(wake, min(until for until, _ in self._held.values()))
        if now < self._next_expiry < wake:
            wake = self._next_expiry
        return wake

    def _since(self, index: int, lease: JSON | None, seen: float) -> float:
        """Where the count of a record first seen in a read that returned at `seen` starts:
        the previous read's round start when that is provably safe (module docstring)."""
        previous = self._last_read.get(index)
        duration = ((lease or {}).get("spec") or {}).get("leaseDurationSeconds")
        if (
            previous is not None
            and self._from_previous_within is not None
            and duration == self.lease_duration_s
            and seen - previous <= self._from_previous_within
        ):
            return previous
        return seen

    async def _read(self, index: int) -> JSON | KubeError | None:
        try:
            return await self.kube.get_lease(self.namespace, self.name(index))
        except NotFound:
            return None
        except KubeError as exc:
            return exc

    async def round(self) -> None:
        """One look at every shard Lease and what follows from it."""
        started = self.clock()
        read = await asyncio.gather(*(self._read(i) for i in range(self.shards)))
        now = self.clock()
        known: dict[int, JSON | None] = {}
        for index, got in enumerate(read):
            if isinstance(got, KubeError):
                log.warning("shard lease %s: %s", self.name(index), got)
                continue
            known[index] = got
            self._remember(index, got)
            record = _record(got)
            if self._observed.get(index, ((), 0.0))[0] != record:
                self._observed[index] = (record, self._since(index, got, now))
            self._last_read[index] = started

        def expires(index: int, duration: float) -> float:
            # the same sum as the wake-up's (wake_at), so that a round woken at it takes over
            return self._observed[index][1] + duration

        mine, free, expired, others = [], [], [], {}
        next_expiry = math.inf
        for index, lease in known.items():
            holder = _holder(lease)
            duration = float(((lease or {}).get("spec") or {}).get("leaseDurationSeconds") or 0)
            if index in self._releasing:
                continue  # being handed over: neither renewed nor counted as held
            if holder == self.identity:
                mine.append(index)
            elif not holder:
                free.append(index)
            elif now >= expires(index, duration or self.lease_duration_s):
                expired.append(index)
            else:
                others[index] = holder
                next_expiry = min(next_expiry, expires(index, duration or self.lease_duration_s))
        self._next_expiry = next_expiry
        wanters = {_wanted_by(lease) for lease in known.values()} - {""}
        members = {self.identity, *others.values(), *wanters}
        fair = math.ceil(self.shards / len(members))

        # Hand over what others asked for, down to the fair share, answering the other
        # requests with no when renewing. A release waits for its rollouts to stop, on the
        # operator's loop: it runs on its own, so that the renewals never wait for it.
        excess = len(mine) - fair
        handed: list[int] = []
        for index in sorted(mine, reverse=True):
            if excess > 0 and _wanted_by(known[index]) not in ("", self.identity):
                handed.append(index)
                excess -= 1
        mine = [i for i in mine if i not in handed]
        for index in handed:
            self._drop(index)  # stops acting now, whenever the rollouts have stopped
            self._releasing[index] = asyncio.create_task(
                self._release(index, asked_by=_wanted_by(known[index])),
                name=f"release {self.name(index)}",
            )
            self._releasing[index].add_done_callback(functools.partial(self._handed, index))
        await asyncio.gather(*(self._renew(i, known[i], started) for i in mine))

        # Expired shards are taken whatever the share; free ones up to it, or once nobody
        # took them for a whole Lease duration.
        count = len(mine)
        for index in expired:
            if await self._acquire(index, known[index], started, why="expired"):
                count += 1
        for index in free:
            abandoned = now >= expires(index, self.lease_duration_s)
            if count < fair or abandoned:
                why = "free for a lease duration" if abandoned and count >= fair else "free"
                if await self._acquire(index, known[index], started, why=why):
                    count += 1
        if count < fair and not free and not expired:
            await self._ask(others, fair)

    # ---- writes -----------------------------------------------------------------------

    def _body(self, index: int, current: JSON | None, *, acquire: bool, answered: str = "") -> JSON:
        spec = dict((current or {}).get("spec") or {})
        current_meta = (current or {}).get("metadata") or {}
        # a renewal replaces the Lease: what others set on it stays (KEPT_METADATA)
        meta: JSON = {
            **kept_metadata(current_meta),
            "name": self.name(index),
            "namespace": self.namespace,
        }
        annotations = dict(current_meta.get("annotations") or {})
        now = _now_micro()
        if acquire or (answered and annotations.get(WANTED_BY) == answered):
            annotations.pop(WANTED_BY, None)  # asked, and answered (yes or no)
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                current is not None
            )
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=self.lease_duration_s,
            renewTime=now,
        )
        if current is not None:
            meta["resourceVersion"] = current_meta.get("resourceVersion")
        meta.pop("annotations", None)
        if annotations:
            meta["annotations"] = annotations
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    def _held_from(self, index: int, started: float) -> None:
        until = started + self.renew_deadline_s
        if self.clock() >= until:
            return  # the write took past the deadline: not counted as held
        if self.holds(index):
            term = self._held[index][1]
        else:  # a new term: the operator starts the shard afresh
            self._acquired += 1
            term = self._acquired
        self._held = {**self._held, index: (until, term)}

    async def _renew(self, index: int, lease: JSON | None, started: float) -> None:
        # An asker's annotation write may land between our read and our write: read again
        # once rather than miss a renewal over it (and leave that new request for the next
        # round to answer: only the request this round saw is cleared).
        seen = _wanted_by(lease)
        for attempt in range(2):
            body = self._body(index, lease, acquire=False, answered=seen)
            try:
                self._remember(
                    index, await self.kube.replace_lease(self.namespace, self.name(index), body)
                )
            except Conflict:
                if attempt == 1:
                    return
                lease = await self.kube.get_lease(self.namespace, self.name(index))
                if _holder(lease) != self.identity:
                    self._drop(index)
                    return
                continue
            except KubeError as exc:
                log.warning("shard lease %s: renew failed: %s", self.name(index), exc)
                return
            self._held_from(index, started)
            return

    async def _acquire(self, index: int, lease: JSON | None, started: float, *, why: str) -> bool:
        body = self._body(index, lease, acquire=True)
        try:
            if lease is None:
                written = await self.kube.create_lease(self.namespace, body)
            else:
                written = await self.kube.replace_lease(self.namespace, self.name(index), body)
        except Conflict:
            return False  # someone else wrote it since we read it
        except KubeError as exc:
            log.warning("shard lease %s: acquire failed: %s", self.name(index), exc)
            return False
        self._remember(index, written)
        self._drop(index)  # whatever was held before, this is a new term
        self._held_from(index, started)
        log.info(
            "shard lease %s: %s acquired it (%s, was %s)",
            self.name(index),
            self.identity,
            why,
            _holder(lease) or "free",
        )
        return self.holds(index)

    async def _ask(self, others: dict[int, str], fair: int) -> None:
        """Ask the most loaded holder above its fair share for one of its shards."""
        load: dict[str, list[int]] = {}
        for index, holder in others.items():
            load.setdefault(holder, []).append(index)
        if not load:
            return
        holder, indices = max(load.items(), key=lambda item: (len(item[1]), item[0]))
        if len(indices) <= fair:
            return
        leases = {i: self._leases.get(i) for i in indices}
        if any(_wanted_by(lease) == self.identity for lease in leases.values()):
            return  # asked already
        unasked = [i for i, lease in leases.items() if not _wanted_by(lease)]
        if not unasked:
            return
        index = max(unasked)
        lease = leases[index]
        assert lease is not None
        meta = lease.get("metadata") or {}
        body = {
            **lease,
            "metadata": {
                **meta,
                "annotations": {**(meta.get("annotations") or {}), WANTED_BY: self.identity},
            },
        }
        try:
            self._remember(
                index, await self.kube.replace_lease(self.namespace, self.name(index), body)
            )
        except KubeError:
            return  # renewed or taken meanwhile: asked again next round if still needed
        log.info(
            "shard lease %s: %s asked %s for it (fair share %d)",
            self.name(index),
            self.identity,
            holder,
            fair,
        )

    def _handed(self, index: int, task: asyncio.Task[None]) -> None:
        self._releasing.pop(index, None)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "shard lease %s: handover failed", self.name(index), exc_info=task.exception()
            )

    async def _release(self, index: int, *, asked_by: str = "") -> None:
        """Stop acting on the shard, then give its Lease up."""
        self._drop(index)
        if self.on_release is not None:
            await self.on_release(index)
        lease = self._leases.get(index)
        if lease is None or _holder(lease) != self.identity:
            return
        meta = lease.get("metadata") or {}
        spec = {
            **(lease.get("spec") or {}),
            "holderIdentity": "",
            "renewTime": _now_micro(),
            "leaseDurationSeconds": 1,
        }
        body = {**lease, "metadata": {**meta}, "spec": spec}
        try:
            self._remember(
                index, await self.kube.replace_lease(self.namespace, self.name(index), body)
            )
        except KubeError as exc:
            log.info("shard lease %s: release failed (it will expire): %s", self.name(index), exc)
            return
        log.info(
            "shard lease %s: %s released it%s",
            self.name(index),
            self.identity,
            f" (asked by {asked_by})" if asked_by else "",
        )

    async def release_all(self) -> None:
        """Give up every Lease held (on the way out: the rollouts were stopped first)."""
        for index in sorted(self._held):
            await self._release(index)
