"""Leader election on a Lease: two candidates in one event loop never lead at once."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fake_leases import Clock, Leases
from support.kube import FAST_RETRY, THEIRS
from support.kube_emulator import KubeEmulator

from canary.kubernetes.client import SAFETY_S, Kube, LeaderElector

LEASES = ("coordination.k8s.io", "v1", "leases")


class Candidate:
    """An elector with its own client (and bearer token) and a log of its terms."""

    def __init__(self, kube: Kube, identity: str, token: str) -> None:
        self.token = token
        self.terms: list[tuple[float, float]] = []
        self._start: float | None = None
        self.stop = asyncio.Event()
        self.elector = LeaderElector(
            kube,
            namespace="canary-system",
            name="canary-leader",
            identity=identity,
            lease_duration_s=1,
            renew_deadline_s=0.6,
            retry_period_s=0.1,
            on_change=self._changed,
        )
        self.task: asyncio.Task[None] | None = None

    def _changed(self, leading: bool) -> None:
        if leading:
            self._start = time.monotonic()
        else:
            assert self._start is not None
            # The term ended when is_leader turned False, which may precede this callback.
            self.terms.append((self._start, self.elector.leader_until))
            self._start = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run(self.stop))

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def candidates(
    api: KubeEmulator, tmp_path: Path
) -> AsyncIterator[tuple[Candidate, Candidate]]:
    clients = []
    pair = []
    for identity in ("a", "b"):
        config = api.write_kubeconfig(tmp_path / f"kc-{identity}", token=f"token-{identity}")
        kube = await Kube.connect(kubeconfig=str(config), retry=FAST_RETRY)
        clients.append(kube)
        pair.append(Candidate(kube, identity, f"token-{identity}"))
    try:
        yield pair[0], pair[1]
    finally:
        for c in pair:
            if c.task is not None and not c.task.done():
                c.task.cancel()
                await asyncio.gather(c.task, return_exceptions=True)
        for kube in clients:
            await kube.close()


async def sample_until(
    pair: tuple[Candidate, Candidate], condition: str, within_s: float = 8.0
) -> list[tuple[bool, bool]]:
    """Sample both candidates' is_leader until `condition` ('a', 'b' or 'any') leads."""
    samples: list[tuple[bool, bool]] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        state = (pair[0].elector.is_leader, pair[1].elector.is_leader)
        samples.append(state)
        if (condition == "any" and any(state)) or (
            condition in ("a", "b") and state[0 if condition == "a" else 1]
        ):
            return samples
        await asyncio.sleep(0.01)
    raise AssertionError(f"{condition} did not become leader within {within_s}s")


def assert_terms_disjoint(*candidates: Candidate) -> None:
    terms = sorted(t for c in candidates for t in c.terms)
    for (_, end), (start, _) in itertools.pairwise(terms):
        assert start >= end, f"overlapping leadership terms: {terms}"


async def test_a_stalled_leader_steps_down_before_the_other_takes_over(
    api: KubeEmulator, candidates: tuple[Candidate, Candidate]
) -> None:
    """The leader's renewals fail (503 for its token only): it stops leading, the other takes
    over only after the Lease expires, and at no instant do both lead."""
    a, b = candidates
    a.start()
    b.start()
    samples = await sample_until(candidates, "any")
    leader, follower = (a, b) if a.elector.is_leader else (b, a)
    fault = api.inject(503, times=10_000, resource="leases", token=leader.token)
    samples += await sample_until(candidates, "b" if follower is b else "a")
    fault.times = 0  # the old leader recovers and competes again
    for _ in range(50):
        await asyncio.sleep(0.01)
        samples.append((a.elector.is_leader, b.elector.is_leader))
    await a.finish()
    await b.finish()

    assert not any(x and y for x, y in samples)
    assert_terms_disjoint(a, b)
    assert leader.terms and follower.terms
    # The take-over waited for the whole lease: from the leader's last successful renewal.
    last_renewal = max(
        r.at
        for r in api.recorded(resource="leases", token=leader.token)
        if r.verb in ("create", "update") and r.status in (200, 201)
    )
    takeover = follower.terms[0][0]
    assert takeover - last_renewal >= 1.0
    lease = api.get(*LEASES, "canary-system", "canary-leader")
    assert lease["spec"]["leaseTransitions"] >= 1


async def test_release_hands_over_without_waiting_for_expiry(
    api: KubeEmulator, candidates: tuple[Candidate, Candidate]
) -> None:
    """A leader that stops releases the Lease (empty holder), and the other acquires it."""
    a, b = candidates
    a.start()
    await sample_until(candidates, "a")
    b.start()
    await asyncio.sleep(0.3)  # b is a candidate now, waiting on a's Lease
    await a.finish()
    assert not a.elector.is_leader
    releases = [
        r
        for r in api.recorded(verb="update", resource="leases", token="token-a", status=200)
        if r.body["spec"]["holderIdentity"] == ""
    ]
    assert len(releases) == 1
    await sample_until(candidates, "b")
    await b.finish()
    assert_terms_disjoint(a, b)
    holders = [
        r.body["spec"]["holderIdentity"]
        for r in api.recorded(resource="leases", status=200)
        if r.verb in ("create", "update")
    ]
    assert holders[0] == "a" and "b" in holders


async def test_concurrent_creation_has_one_winner(
    api: KubeEmulator, candidates: tuple[Candidate, Candidate]
) -> None:
    """With no Lease yet, both candidates try to create it; exactly one succeeds."""
    a, b = candidates
    results = await asyncio.gather(
        a.elector.try_acquire_or_renew(), b.elector.try_acquire_or_renew()
    )
    assert sorted(results) == [False, True]
    creates = api.recorded(verb="create", resource="leases")
    # The loser either lost the create race (409) or read the winner's Lease first.
    assert sorted(r.status for r in creates) in ([201], [201, 409])


def test_timings_must_be_ordered() -> None:
    """retry < renew deadline < lease duration, or leadership could overlap."""
    with pytest.raises(ValueError, match="retry_period_s < renew_deadline_s < lease_duration_s"):
        LeaderElector(
            None,  # type: ignore[arg-type]
            namespace="n",
            name="l",
            identity="a",
            lease_duration_s=1,
            renew_deadline_s=2,
            retry_period_s=0.1,
        )


async def test_a_standby_says_so_once_per_holder(
    api: KubeEmulator,
    candidates: tuple[Candidate, Candidate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The candidate that finds the Lease held logs that it is standby and who holds it,
    once, not on every retry (an operator reading a replica's log knows its role)."""
    a, b = candidates
    a.start()
    await sample_until(candidates, "a")
    caplog.set_level("INFO", logger="canary.kubernetes.client")
    b.start()
    await asyncio.sleep(0.5)  # several of b's retry periods
    await b.finish()
    await a.finish()
    standby = [r.getMessage() for r in caplog.records if "standby" in r.getMessage()]
    assert standby == ["lease canary-system/canary-leader: held by a; b is standby"]


async def test_on_a_thread_of_its_own_the_elector_calls_back_on_the_callers_loop(
    api: KubeEmulator, kube: Kube, tmp_path: Path
) -> None:
    """LeaseThread runs the elector on `canary-leases` with a client of its own: it leads,
    its `on_change` runs on the caller's thread, and on stop it releases the Lease, closes its
    client, ends its thread and gives the elector its own client and callback back."""
    from canary.kubernetes.lease_thread import LeaseThread

    config = api.write_kubeconfig(tmp_path / "kc-thread", token="token-thread")
    changes: list[tuple[bool, str]] = []

    def on_change(leading: bool) -> None:
        changes.append((leading, threading.current_thread().name))

    elector = LeaderElector(
        kube,
        namespace="canary-system",
        name="canary-leader",
        identity="threaded",
        lease_duration_s=1,
        renew_deadline_s=0.6,
        retry_period_s=0.1,
        on_change=on_change,
    )
    connect = functools.partial(Kube.connect, kubeconfig=str(config), retry=FAST_RETRY)
    stop = asyncio.Event()
    task = asyncio.create_task(LeaseThread(elector, connect).run(stop))
    for _ in range(100):
        if elector.is_leader:
            break
        await asyncio.sleep(0.05)
    assert elector.is_leader and "canary-leases" in {t.name for t in threading.enumerate()}
    stop.set()
    await asyncio.wait_for(task, 5)
    main = threading.current_thread().name
    assert changes == [(True, main), (False, main)]
    lease = api.get(*LEASES, "canary-system", "canary-leader")
    assert lease["spec"]["holderIdentity"] == ""
    assert {r.token for r in api.recorded(resource="leases")} == {"token-thread"}
    assert "canary-leases" not in {t.name for t in threading.enumerate()}
    assert elector.kube is kube and elector.on_change is on_change


def candidate(leases: Leases, clock: Clock) -> LeaderElector:
    """Candidate b, standing by while a leads: the CLI's timings (15 s, 10 s, 2 s)."""
    return LeaderElector(
        leases,  # type: ignore[arg-type]
        namespace="canary-system",
        name="canary-leader",
        identity="b",
        clock=clock,
    )


async def tries_at(b: LeaderElector, clock: Clock, *times: float) -> list[bool]:
    won = []
    for at in times:
        clock.t = at
        won.append(await b.try_acquire_or_renew())
    return won


async def test_a_candidate_counts_from_its_previous_read_and_wakes_at_the_expiry() -> None:
    """As the shards (canary.kubernetes.shards): a's last renewal (2.5) is first seen by the
    read started at 4 (F = 4.05), the read started at 2 (P) saw the record before it, so b
    counts from P, looks again at P + 15 = 17 rather than in the next round (18), and takes
    over then, within the Lease duration of a's last renewal. The old count, from F, made
    that 19.05 or later."""
    clock = Clock()
    leases = Leases(clock)
    leases.read_s = 0.05
    leases.renew("a", name="canary-leader")
    b = candidate(leases, clock)
    assert await tries_at(b, clock, 0.0, 2.0) == [False, False]
    clock.t = 2.5
    leases.renew("a", name="canary-leader")
    assert not any(await tries_at(b, clock, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0))
    assert b.wake_at() == 17.0
    assert await tries_at(b, clock, 16.9, 17.0) == [False, True]
    assert leases.taken == [(17.05, "b")]


async def test_a_candidate_whose_previous_read_is_too_old_counts_from_when_it_saw_it() -> None:
    """A stalled read: the one before started at 0, this one started at 2 and returned at 7
    with a renewal written just before. Counting from 0 would have b write at 15, while a may
    act until 7 + 10 (its write just before 7): F - P = 7 > 15 - 10 - SAFETY_S, so b counts
    from 7 and writes SAFETY_S or more after a's renew deadline."""
    clock = Clock()
    leases = Leases(clock)
    leases.renew("a", name="canary-leader")
    b = candidate(leases, clock)
    assert await tries_at(b, clock, 0.0) == [False]
    leases.read_s = 5.0
    leases.during_read = lambda: leases.renew("a", name="canary-leader")
    assert await tries_at(b, clock, 2.0) == [False]
    leases.read_s = 0.0
    assert not any(await tries_at(b, clock, *range(8, 22), 21.99))
    assert await tries_at(b, clock, 22.0) == [True]
    assert leases.taken == [(22.0, "b")] and 22.0 - (7.0 + 10.0) >= SAFETY_S


async def test_renewals_and_the_release_keep_what_others_set_on_the_lease(
    api: KubeEmulator, candidates: tuple[Candidate, Candidate]
) -> None:
    """A renewal replaces the Lease (PUT): the labels, annotations, owner and finalizer
    another party set on it stay through the renewals and the release (dropping another's
    ownerReference needs 'delete' under OwnerReferencesPermissionEnforcement: the renewal
    would be refused and the leader would step down)."""
    a, _ = candidates
    a.start()
    await sample_until(candidates, "a")
    theirs = THEIRS
    lease = api.get(*LEASES, "canary-system", "canary-leader")
    lease["metadata"].update(theirs)
    api.put(*LEASES, lease)
    renewals = len(api.recorded(verb="update", resource="leases", token="token-a", status=200))
    for _ in range(100):  # three renewals, every retry period (0.1 s)
        await asyncio.sleep(0.05)
        done = api.recorded(verb="update", resource="leases", token="token-a", status=200)
        if len(done) >= renewals + 3:
            break
    assert len(done) >= renewals + 3 and a.elector.is_leader
    metadata = api.get(*LEASES, "canary-system", "canary-leader")["metadata"]
    assert {key: metadata.get(key) for key in theirs} == theirs
    await a.finish()
    lease = api.get(*LEASES, "canary-system", "canary-leader")
    assert lease["spec"]["holderIdentity"] == ""  # released
    assert {key: lease["metadata"].get(key) for key in theirs} == theirs
