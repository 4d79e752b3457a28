"""Shard Leases: replicas split the shards fairly, never hold one at once, and a stalled
holder stops acting before another takes its shard (canary.kubernetes.shards).

On the emulator because the fencing test needs a fault that the real API server cannot be
made to give one client only (its Lease writes failing); the end-to-end split, SIGKILL and
join are on the real control plane (tests/cluster/test_shards_on_cluster.py)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fake_leases import Clock, Leases
from support.kube import FAST_RETRY, THEIRS
from support.kube_emulator import KubeEmulator

from canary.kubernetes.client import Kube
from canary.kubernetes.lease_thread import LeaseThread
from canary.kubernetes.operator import Operator, OperatorSettings
from canary.kubernetes.shards import (
    SAFETY_S,
    WANTED_BY,
    ShardElector,
    shard_lease_name,
    shard_of,
)

LEASES = ("coordination.k8s.io", "v1", "leases")
NS = "canary-system"


class Replica:
    """A shard elector with its own client (and token), and what `on_release` was told."""

    def __init__(self, kube: Kube, identity: str, shards: int) -> None:
        self.token = f"token-{identity}"
        self.stop = asyncio.Event()
        self.released: list[int] = []
        self.elector = ShardElector(
            kube,
            namespace=NS,
            prefix="canary-shard",
            shards=shards,
            identity=identity,
            lease_duration_s=1,
            renew_deadline_s=0.6,
            retry_period_s=0.1,
            on_release=self._on_release,
        )
        self.task: asyncio.Task[None] | None = None

    async def _on_release(self, index: int) -> None:
        assert not self.elector.holds(index), "released while still acting"
        self.released.append(index)

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run(self.stop))

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)

    def held(self) -> set[int]:
        return set(self.elector.held())


class Cluster:
    def __init__(self, api: KubeEmulator, tmp_path: Path) -> None:
        self.api = api
        self.tmp_path = tmp_path
        self.clients: list[Kube] = []
        self.replicas: dict[str, Replica] = {}
        # (time, identity -> shards held) every 10 ms while a test runs
        self.samples: list[tuple[float, dict[str, set[int]]]] = []

    async def add(self, identity: str, shards: int = 2) -> Replica:
        config = self.api.write_kubeconfig(
            self.tmp_path / f"kc-{identity}", token=f"token-{identity}"
        )
        kube = await Kube.connect(kubeconfig=str(config), retry=FAST_RETRY)
        self.clients.append(kube)
        replica = Replica(kube, identity, shards)
        self.replicas[identity] = replica
        return replica

    def sample(self) -> dict[str, set[int]]:
        now = {name: r.held() for name, r in self.replicas.items()}
        self.samples.append((time.monotonic(), now))
        return now

    async def until(self, what: str, probe: object, within_s: float = 8.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            now = self.sample()
            if callable(probe) and probe(now):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not within {within_s}s: {what}; last {self.samples[-1:]}")

    async def watch(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sample()
            await asyncio.sleep(0.01)

    def assert_never_shared(self) -> None:
        for at, held in self.samples:
            counts = Counter(i for shards in held.values() for i in shards)
            assert all(n == 1 for n in counts.values()), f"a shard held twice at {at}: {held}"

    def holders(self, shards: int = 2) -> list[str]:
        out = []
        for index in range(shards):
            lease = self.api.get(*LEASES, NS, shard_lease_name("canary-shard", index, shards))
            out.append(str(lease["spec"]["holderIdentity"]))
        return out


@pytest.fixture
async def cluster(api: KubeEmulator, tmp_path: Path) -> AsyncIterator[Cluster]:
    shared = Cluster(api, tmp_path)
    try:
        yield shared
    finally:
        for replica in shared.replicas.values():
            if replica.task is not None and not replica.task.done():
                replica.task.cancel()
                await asyncio.gather(replica.task, return_exceptions=True)
        for kube in shared.clients:
            await kube.close()


def test_shard_of_is_a_stable_hash_that_spreads() -> None:
    """sha256 of namespace/name mod N: the same in every process (pinned values, unlike
    Python's salted hash()), about even over many names, namespace and name not swappable."""
    pinned = {ns: shard_of(ns, "app", 7) for ns in ("shop", "cart", "search")}
    assert pinned == {"shop": 4, "cart": 3, "search": 0}
    counts = Counter(shard_of(f"ns-{i}", "app", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 900, counts
    assert shard_of("a", "b", 1000) != shard_of("b", "a", 1000)
    assert shard_lease_name("canary-shard", 1, 2) == "canary-shard-1-of-2"


def test_timings_must_be_ordered(api: KubeEmulator) -> None:
    """retry < renew deadline < lease duration, else a holder could act after a takeover."""
    with pytest.raises(ValueError, match="renew_deadline_s < lease_duration_s"):
        ShardElector(
            None,  # type: ignore[arg-type]
            namespace=NS,
            prefix="p",
            shards=2,
            identity="a",
            lease_duration_s=2,
            renew_deadline_s=2.0,
        )
    with pytest.raises(ValueError, match="shards must be between 1 and"):
        ShardElector(None, namespace=NS, prefix="p", shards=0, identity="a")  # type: ignore[arg-type]


async def test_two_replicas_split_two_shards_and_a_third_takes_nothing(cluster: Cluster) -> None:
    """a alone holds both shards; b asks and a hands one over (stopping it first), so each
    holds one; c joining holds nothing and asks for nothing, as everybody is at a fair
    share; at no instant is a shard held by two."""
    a, b, c = [await cluster.add(name) for name in "abc"]
    a.start()
    await cluster.until("a holds both", lambda h: h["a"] == {0, 1})
    b.start()
    await cluster.until("one each", lambda h: len(h["a"]) == 1 and len(h["b"]) == 1)
    assert a.released == [1] and cluster.holders() == ["a", "b"]
    asks = [
        r
        for r in cluster.api.recorded(verb="update", resource="leases", token=b.token, status=200)
        if (r.body["metadata"].get("annotations") or {}).get(WANTED_BY) == "b"
    ]
    assert len(asks) == 1
    c.start()
    await cluster.watch(1.5)  # 15 rounds, a lease duration and a half
    assert cluster.sample() == {"a": {0}, "b": {1}, "c": set()}
    assert not [
        r
        for r in cluster.api.recorded(resource="leases", token=c.token, status=200)
        if r.verb in ("update", "create")
    ], "c wrote a shard Lease"
    for replica in (a, b, c):
        await replica.finish()
    cluster.assert_never_shared()


async def test_a_stalled_holder_stops_acting_before_another_takes_its_shard(
    cluster: Cluster,
) -> None:
    """a's Lease writes fail (503 for its token only): a stops holding its shard at the
    renew deadline, b takes it only once the Lease expired (a whole Lease duration after
    a's last renewal), and at no instant do both hold it."""
    a, b = await cluster.add("a"), await cluster.add("b")
    a.start()
    await cluster.until("a holds both", lambda h: h["a"] == {0, 1})
    b.start()
    await cluster.until("one each", lambda h: h["a"] == {0} and h["b"] == {1})
    fault = cluster.api.inject(503, times=10_000, resource="leases", token=a.token)
    await cluster.until("b holds both", lambda h: h["b"] == {0, 1})
    fault.times = 0
    await cluster.watch(0.5)
    for replica in (a, b):
        await replica.finish()
    cluster.assert_never_shared()
    last_renewal = max(
        r.at
        for r in cluster.api.recorded(resource="leases", token=a.token)
        if r.verb == "update" and r.status == 200 and r.name == "canary-shard-0-of-2"
    )
    takeover = min(
        r.at
        for r in cluster.api.recorded(resource="leases", token=b.token)
        if r.verb == "update"
        and r.status == 200
        and r.name == "canary-shard-0-of-2"
        and r.body["spec"]["holderIdentity"] == "b"
    )
    assert takeover - last_renewal >= 1.0
    lapsed = min(at for at, held in cluster.samples if at > last_renewal and 0 not in held["a"])
    assert lapsed <= last_renewal + 0.6 + 0.05  # the renew deadline, not the Lease's expiry
    assert lapsed < takeover


async def test_on_sigterm_the_shards_are_released_and_taken_at_once(cluster: Cluster) -> None:
    """A replica that stops gives its shards up (an empty holder) after stopping their
    rollouts; the other takes them without waiting for the Lease to expire."""
    a, b = await cluster.add("a"), await cluster.add("b")
    a.start()
    await cluster.until("a holds both", lambda h: h["a"] == {0, 1})
    b.start()
    await cluster.until("one each", lambda h: h["a"] == {0} and h["b"] == {1})
    stopped = time.monotonic()
    await a.finish()
    assert sorted(a.released) == [0, 1]
    await cluster.until("b holds both", lambda h: h["b"] == {0, 1})
    assert time.monotonic() - stopped < 1.0  # less than the Lease duration
    await b.finish()
    assert cluster.holders() == ["", ""]
    cluster.assert_never_shared()


async def test_an_asker_that_died_leaves_no_shard_unheld(cluster: Cluster) -> None:
    """A request from a replica that is gone makes the holder release a shard for nobody;
    the holder takes it back once it has been free for a Lease duration, clearing the
    request, and keeps both from then on."""
    a = await cluster.add("a")
    a.start()
    await cluster.until("a holds both", lambda h: h["a"] == {0, 1})
    name = shard_lease_name("canary-shard", 1, 2)
    lease = cluster.api.get(*LEASES, NS, name)
    lease["metadata"].setdefault("annotations", {})[WANTED_BY] = "ghost"
    cluster.api.put(*LEASES, lease)
    await cluster.until("a released shard 1", lambda h: h["a"] == {0})
    await cluster.until("a took it back", lambda h: h["a"] == {0, 1})
    await cluster.watch(1.5)
    assert cluster.sample()["a"] == {0, 1} and a.released == [1]
    assert WANTED_BY not in (
        cluster.api.get(*LEASES, NS, name)["metadata"].get("annotations") or {}
    )
    await a.finish()


async def test_a_request_the_holder_will_not_answer_is_cleared(cluster: Cluster) -> None:
    """a and b hold one shard each: a request for a's shard (from c, which is gone) leaves a
    at its fair share, so a keeps the shard and clears the request at its next renewal, and
    no shard changes hands."""
    a, b = await cluster.add("a"), await cluster.add("b")
    a.start()
    await cluster.until("a holds both", lambda h: h["a"] == {0, 1})
    b.start()
    await cluster.until("one each", lambda h: h["a"] == {0} and h["b"] == {1})
    name = shard_lease_name("canary-shard", 0, 2)
    lease = cluster.api.get(*LEASES, NS, name)
    lease["metadata"].setdefault("annotations", {})[WANTED_BY] = "c"
    cluster.api.put(*LEASES, lease)

    def cleared() -> bool:
        meta = cluster.api.get(*LEASES, NS, name)["metadata"]
        return WANTED_BY not in (meta.get("annotations") or {})

    await cluster.until("the request cleared", lambda h: cleared())
    await cluster.watch(1.5)
    assert cluster.sample() == {"a": {0}, "b": {1}} and a.released == [1] and cleared()
    for replica in (a, b):
        await replica.finish()
    cluster.assert_never_shared()


def survivor(leases: Leases, clock: Callable[[], float], **timings: Any) -> ShardElector:
    """Replica b, standing by for shard 0 of 1 (held by a): the CLI's timings by default."""
    return ShardElector(
        leases,  # type: ignore[arg-type]
        namespace=NS,
        prefix="canary-shard",
        shards=1,
        identity="b",
        clock=clock,
        **{"lease_duration_s": 15, "renew_deadline_s": 10.0, "retry_period_s": 2.0, **timings},
    )


async def rounds_at(b: ShardElector, clock: Clock, *times: float) -> None:
    for at in times:
        clock.t = at
        await b.round()


async def test_a_takeover_counts_from_the_previous_read_when_reads_are_regular() -> None:
    """Reads every 2 s (50 ms each): a's last renewal (at 2.5) is first seen by the read of
    the round at 4 (F = 4.05); the round at 2 (P) saw the record before it. b counts the
    Lease from P: it takes over in the first round from P + 15 = 17, within the Lease duration
    of a's last renewal (17.5). Counted from F (client-go, the old rule) it came at 19.05 or
    later: 1.5 s past that renewal's expiry."""
    clock = Clock()
    leases = Leases(clock)
    leases.read_s = 0.05
    leases.renew("a")
    b = survivor(leases, clock)
    await rounds_at(b, clock, 0.0, 2.0)
    clock.t = 2.5
    leases.renew("a")  # a's last renewal; then it dies
    last_renewal = clock.t
    await rounds_at(b, clock, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 16.9)
    assert leases.taken == [] and b.held() == {}
    await rounds_at(b, clock, 17.0)
    assert leases.taken == [(17.05, "b")]
    assert leases.taken[0][0] <= last_renewal + 15
    assert b.held() == {0: 1}
    # a stopped acting by 2.5 + 10 at the latest (its round started before its write):
    # 4.55 s before b's first write, more than SAFETY_S
    assert leases.taken[0][0] - (last_renewal + 10.0) >= SAFETY_S


@pytest.mark.parametrize(
    ("previous", "read_s", "since"),
    [
        (2.0, 0.05, "P"),  # regular: F - P = 2.05
        (2.0, 2.0, "P"),  # F - P = 4.0 = 15 - 10 - SAFETY_S: the last that counts from P
        (2.0, 2.01, "F"),  # F - P = 4.01: a slow read
        (0.0, 5.0, "F"),  # a stalled round: the read before is 5 s old when the renewal is seen
        (None, 0.05, "F"),  # first sight: no read before
    ],
)
async def test_a_takeover_never_comes_before_the_holder_stopped_acting_by_safety_s(
    previous: float | None, read_s: float, since: str
) -> None:
    """a renews while b's read is under way (the worst case: written just before b's read
    returns at F). a holds until its write + 10 s at the latest. b counts from the previous
    read's round start P only when F - P <= 15 - 10 - SAFETY_S, so that its first write
    (P + 15 or later) comes SAFETY_S or more after a stopped acting; else from F."""
    clock = Clock()
    leases = Leases(clock)
    leases.renew("a")
    b = survivor(leases, clock)
    if previous is not None:
        await rounds_at(b, clock, previous)  # reads a's record before the renewal
    started = 4.0 if previous is None else previous + 2.0
    leases.read_s = read_s

    def renewal() -> None:
        leases.renew("a")  # written at F, as late as it can be and not seen before

    leases.during_read = renewal
    await rounds_at(b, clock, started)
    seen = clock.t  # F
    leases.read_s = 0.0
    count_from = previous if since == "P" and previous is not None else seen
    expiry = count_from + 15
    # the last round before the expiry takes nothing, the one at it takes the Lease
    await rounds_at(b, clock, *[t for t in range(int(seen) + 1, int(expiry) + 1) if t < expiry])
    assert leases.taken == []
    await rounds_at(b, clock, expiry)
    assert leases.taken == [(expiry, "b")]
    assert expiry - (seen + 10.0) >= SAFETY_S


def test_timings_with_no_room_for_the_margin_count_from_when_the_renewal_was_seen() -> None:
    """Lease 3 s, renew deadline 2 s: 1 s between them, all of it SAFETY_S, so counting from
    the previous read never leaves the margin: every count starts at F. A safety_s of 0 or
    less is refused."""
    clock = Clock()
    leases = Leases(clock)
    b = survivor(leases, clock, lease_duration_s=3, renew_deadline_s=2.0, retry_period_s=0.5)
    assert b._from_previous_within is None
    assert survivor(leases, clock)._from_previous_within == 15 - 10 - SAFETY_S
    with pytest.raises(ValueError, match="safety_s must be > 0"):
        survivor(leases, clock, safety_s=0.0)


async def test_no_room_counts_from_f() -> None:
    """The timings above, reads regular: the takeover comes 3 s after F, not after P."""
    clock = Clock()
    leases = Leases(clock)
    leases.renew("a", duration=3)
    b = survivor(leases, clock, lease_duration_s=3, renew_deadline_s=2.0, retry_period_s=0.5)
    await rounds_at(b, clock, 0.0)
    clock.t = 0.25
    leases.renew("a", duration=3)
    await rounds_at(b, clock, 0.5, 3.0, 3.49)
    assert leases.taken == []
    await rounds_at(b, clock, 3.5)
    assert leases.taken == [(3.5, "b")]


async def test_the_loop_wakes_when_an_observed_lease_expires() -> None:
    """b's rounds are 2 s apart, but after the round at 16 it looks again at 17, when a's
    record (counted from 2) expires, not at 18; before that only every retry period. On
    the real loop (Lease 2 s, retry 0.9 s): b first sees a's record at t0 and takes it over
    at t0 + 2, not in the round at t0 + 2.7."""
    clock = Clock()
    leases = Leases(clock)
    leases.renew("a")
    b = survivor(leases, clock)
    await rounds_at(b, clock, 0.0)
    assert b.wake_at() == 2.0
    await rounds_at(b, clock, 2.0)
    clock.t = 3.0
    leases.renew("a")
    await rounds_at(b, clock, 4.0)
    assert b.wake_at() == 6.0
    await rounds_at(b, clock, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0)
    assert b.wake_at() == 17.0
    clock.t = 16.5
    assert b.wake_at() == 17.0
    await rounds_at(b, clock, 17.0)
    assert leases.taken == [(17.0, "b")] and b.wake_at() == 17.0 + 2.0

    real = Leases(time.monotonic)
    real.renew("a", duration=2)
    b = survivor(
        real,
        time.monotonic,
        lease_duration_s=2,
        renew_deadline_s=1.0,
        retry_period_s=0.9,
        safety_s=0.1,
    )
    stop = asyncio.Event()
    t0 = time.monotonic()
    task = asyncio.create_task(b.run(stop))
    try:
        for _ in range(400):
            if real.taken:
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert real.taken, "b never took the Lease"
    took = real.taken[0][0] - t0
    assert 2.0 <= took < 2.4, took  # rounds at 0, 0.9, 1.8, 2.7: the next one was 2.7


@pytest.fixture
def api_on_a_thread() -> Iterator[KubeEmulator]:
    """The emulator on a loop of its own, so that it answers while the test's loop is blocked
    (as the API server does while a controller's loop is busy)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="emulator", daemon=True)
    thread.start()
    emulator = KubeEmulator()
    asyncio.run_coroutine_threadsafe(emulator.start(), loop).result(10)
    try:
        yield emulator
    finally:
        asyncio.run_coroutine_threadsafe(emulator.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class Busy:
    """Replica a as `canary kubernetes --shards N` runs it: an operator whose elector runs on
    the canary-leases thread; and replica b, an elector on a thread of its own. The emulator
    answers from its own thread, so the test's loop (a's) can be blocked."""

    def __init__(self, api: KubeEmulator, tmp_path: Path, shards: int) -> None:
        self.api = api
        self.tmp_path = tmp_path
        self.shards = shards
        self.released: list[int] = []  # what a's on_release was told, on a's loop
        self.stops = {"a": asyncio.Event(), "b": asyncio.Event()}
        self.tasks: list[asyncio.Task[None]] = []

    def connect(self, identity: str) -> Callable[[], Awaitable[Kube]]:
        config = self.api.write_kubeconfig(
            self.tmp_path / f"kc-{identity}", token=f"token-{identity}"
        )
        return functools.partial(Kube.connect, kubeconfig=str(config), retry=FAST_RETRY)

    def elector(self, identity: str) -> ShardElector:
        return ShardElector(
            self.kube,  # a's loop's client: the elector's thread swaps in its own
            namespace=NS,
            prefix="canary-shard",
            shards=self.shards,
            identity=identity,
            lease_duration_s=3,
            renew_deadline_s=2.0,
            retry_period_s=0.5,
        )

    async def start_a(self) -> dict[int, int]:
        self.kube = await self.connect("a")()
        settings = OperatorSettings(
            prometheus_url="http://127.0.0.1:9", record_namespace=NS, tick_s=0.2, identity="a"
        )
        self.a = self.elector("a")
        self.operator = Operator(self.kube, settings, shards=self.a, lease_kube=self.connect("a"))
        release_shard = self.operator._release_shard

        async def on_release(index: int) -> None:
            assert threading.current_thread() is threading.main_thread()  # on a's loop
            self.released.append(index)
            await release_shard(index)

        self.a.on_release = on_release
        self.tasks.append(asyncio.create_task(self.operator.run(self.stops["a"])))
        for _ in range(200):
            if len(self.a.held()) == self.shards and self.operator._terms:
                break
            await asyncio.sleep(0.05)
        held = self.a.held()
        assert held == self.operator._terms and list(held) == list(range(self.shards)), held
        return held

    async def start_b(self) -> None:
        self.b = self.elector("b")
        self.tasks.append(
            asyncio.create_task(LeaseThread(self.b, self.connect("b")).run(self.stops["b"]))
        )
        await asyncio.sleep(0)  # b's thread starts

    def block(self, seconds: float) -> tuple[float, float]:
        """Saturate a's loop: nothing else runs on it meanwhile."""
        blocked = time.monotonic()
        time.sleep(seconds)  # synchronous, on the loop: the point
        return blocked, time.monotonic()

    def renewals(self, name: str, between: tuple[float, float]) -> list[float]:
        return [
            r.at
            for r in self.api.recorded(verb="update", resource="leases", token="token-a")
            if r.status == 200 and r.name == name and between[0] < r.at < between[1]
        ]

    def lease(self, index: int) -> dict[str, object]:
        name = shard_lease_name("canary-shard", index, self.shards)
        return dict(self.api.get(*LEASES, NS, name)["spec"])

    async def finish(self) -> None:
        for stop in self.stops.values():
            stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 10)
        await self.kube.close()


@pytest.fixture
async def busy(api_on_a_thread: KubeEmulator, tmp_path: Path) -> AsyncIterator[Busy]:
    replicas = Busy(api_on_a_thread, tmp_path, shards=1)
    try:
        yield replicas
    finally:
        if not all(stop.is_set() for stop in replicas.stops.values()):
            await replicas.finish()


async def test_a_saturated_loop_keeps_its_shard_when_the_leases_renew_on_their_own_thread(
    busy: Busy,
) -> None:
    """Issue 13: replica a's event loop blocked (a synchronous sleep) past the renew deadline and
    the Lease duration. Its elector renews from the canary-leases thread meanwhile, so a still
    holds the shard afterwards in the same term (its rollouts never stopped nor restarted) and
    b, waiting on a thread of its own, never took it. On the loop, a lost it (issue 13)."""
    held = await busy.start_a()
    await busy.start_b()
    await asyncio.sleep(1.0)  # b reads the Lease held: a standby
    before = busy.lease(0)

    blocked = busy.block(3.5)
    await asyncio.sleep(1.0)  # the operator follows what the elector holds now

    assert busy.a.held() == held and busy.operator._terms == held, busy.a.held()
    assert busy.released == []
    renewals = busy.renewals("canary-shard-0-of-1", blocked)
    assert len(renewals) >= 5, renewals  # every retry period (0.5 s) while blocked
    after = busy.lease(0)
    assert after["holderIdentity"] == "a"
    assert (after["acquireTime"], after["leaseTransitions"]) == (
        before["acquireTime"],
        before["leaseTransitions"],
    )
    assert busy.b.held() == {}
    assert not [
        r
        for r in busy.api.recorded(resource="leases", token="token-b", status=200)
        if r.verb in ("update", "create")
    ], "b wrote the shard Lease"
    assert "canary-leases" in {t.name for t in threading.enumerate()}
    await busy.finish()
    assert busy.released == [0]  # on the way out, after the rollouts stopped
    assert busy.lease(0)["holderIdentity"] == ""
    assert "canary-leases" not in {t.name for t in threading.enumerate()}


async def test_a_handover_waiting_for_a_saturated_loop_delays_no_other_renewal(
    busy: Busy,
) -> None:
    """a holds both shards; b asks for one while a's loop is blocked. a's elector stops acting
    on shard 1 at once and waits for a's loop to stop its rollouts before releasing it, but
    keeps renewing shard 0 meanwhile: after the block a holds shard 0 in the same term, and
    b holds shard 1 (released, or expired if the block outlasted the Lease)."""
    busy.shards = 2
    held = await busy.start_a()
    await busy.start_b()
    blocked = busy.block(3.5)
    assert busy.a.held() == {0: held[0]}  # shard 1 dropped already, shard 0 renewed
    for _ in range(100):
        if busy.b.held() == {1: 1} and busy.released:
            break
        await asyncio.sleep(0.05)
    assert busy.b.held() == {1: 1} and busy.released == [1]
    assert busy.a.held() == {0: held[0]} and busy.operator._terms == {0: held[0]}
    assert len(busy.renewals("canary-shard-0-of-2", blocked)) >= 5
    assert busy.lease(0)["holderIdentity"] == "a"
    await busy.finish()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shards", "0"], "--shards must be between 1 and 256, got 0"),
        (["--shards", "300"], "--shards must be between 1 and 256, got 300"),
        (["--shards", "2", "--leader-elect"], "--leader-elect and --shards exclude each other"),
        (["--shards", "2", "--lease-duration", "1"], "--lease-duration must be >= 2 seconds"),
    ],
)
def test_bad_shard_flags_are_refused_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`canary kubernetes` refuses them with exit status 2 before it connects anywhere."""
    from canary.cli.main import main

    assert main(["kubernetes", "--kubeconfig", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err


async def test_renewals_asks_and_takeovers_keep_what_others_set_on_the_leases(
    cluster: Cluster,
) -> None:
    """Every write of a shard Lease replaces it (PUT): the labels, annotations, owner and
    finalizer another party set on them stay through renewals, an ask, a hand-over and the
    taker's renewals (only the ask's own annotation comes and goes)."""
    a, b = await cluster.add("a"), await cluster.add("b")
    a.start()
    await cluster.until("a holds both", lambda h: h["a"] == {0, 1})
    theirs = THEIRS
    names = [shard_lease_name("canary-shard", index, 2) for index in range(2)]
    for name in names:
        lease = cluster.api.get(*LEASES, NS, name)
        lease["metadata"].update(theirs)
        cluster.api.put(*LEASES, lease)
    await cluster.watch(0.5)  # renewals
    b.start()
    await cluster.until("one each", lambda h: h["a"] == {0} and h["b"] == {1})
    await cluster.watch(0.5)  # the taker's renewals
    for name in names:
        metadata = cluster.api.get(*LEASES, NS, name)["metadata"]
        assert {key: metadata.get(key) for key in theirs} == theirs, name
    for replica in (a, b):
        await replica.finish()
    cluster.assert_never_shared()
