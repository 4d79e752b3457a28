"""The shared retry helper: bounded attempts, exponential backoff, Retry-After as a floor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from canary.retry import ONCE_MORE, RETRY_AFTER_SPREAD, RetryAfterTooLong, RetryPolicy, retrying


class Busy(Exception):
    """A failure worth retrying, with the server's Retry-After if it sent one."""

    def __init__(self, message: str = "busy", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Refused(Exception):
    """A failure that retrying would not cure."""


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait the helper asks for, recorded instead of slept."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        recorded.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return recorded


def failing(
    *failures: Exception, result: str = "ok"
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A call that raises `failures` in turn, then returns `result`; and its call count."""
    calls = [0]

    async def call() -> str:
        calls[0] += 1
        if calls[0] <= len(failures):
            raise failures[calls[0] - 1]
        return result

    return call, calls


def retry_after(exc: Busy) -> float | None:
    return exc.retry_after


POLICY = RetryPolicy(attempts=4, wait_initial_s=0.1, wait_max_s=0.5)


async def test_a_success_after_failures_is_returned(waits: list[float]) -> None:
    """Failures of the retried type are retried until the call succeeds."""
    call, calls = failing(Busy(), Busy())
    assert await retrying(call, policy=POLICY, on=Busy) == "ok"
    assert calls[0] == 3


async def test_attempts_are_bounded_and_the_last_failure_is_raised(waits: list[float]) -> None:
    """A call that keeps failing is tried exactly `attempts` times; its own last error ends it."""
    last = Busy("the fourth")
    call, calls = failing(Busy(), Busy(), Busy(), last, Busy())
    with pytest.raises(Busy) as raised:
        await retrying(call, policy=POLICY, on=Busy)
    assert raised.value is last
    assert calls[0] == 4 and len(waits) == 3


async def test_non_retryable_errors_pass_straight_through(waits: list[float]) -> None:
    """A failure of another type is raised at once: one call, no wait."""
    refused = Refused("no")
    call, calls = failing(refused)
    with pytest.raises(Refused) as raised:
        await retrying(call, policy=POLICY, on=Busy, retry_after=retry_after)
    assert raised.value is refused
    assert calls[0] == 1 and waits == []


async def test_backoff_doubles_up_to_the_cap(waits: list[float]) -> None:
    """Without jitter the waits are wait_initial_s * 2**(n-1), capped at wait_max_s."""
    call, _ = failing(*[Busy()] * 5)
    policy = RetryPolicy(attempts=6, wait_initial_s=0.1, wait_max_s=0.5)
    await retrying(call, policy=policy, on=Busy)
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


async def test_jitter_stays_within_its_bounds(waits: list[float]) -> None:
    """Jitter adds at most wait_jitter_s to each wait, and never passes wait_max_s."""
    call, _ = failing(*[Busy()] * 5)
    policy = RetryPolicy(attempts=6, wait_initial_s=0.1, wait_max_s=0.5, wait_jitter_s=0.05)
    await retrying(call, policy=policy, on=Busy)
    for wait, base in zip(waits, [0.1, 0.2, 0.4, 0.5, 0.5], strict=True):
        assert base <= wait <= min(0.5, base + 0.05) + 1e-9


async def test_retry_after_is_a_floor(waits: list[float]) -> None:
    """A server's Retry-After longer than the backoff is waited in full; a shorter one does
    not shorten the backoff."""
    call, _ = failing(Busy(retry_after=0.3), Busy(retry_after=0.0), Busy())
    await retrying(call, policy=POLICY, on=Busy, retry_after=retry_after)
    assert 0.3 <= waits[0] <= 0.3 * (1 + RETRY_AFTER_SPREAD)  # spread, never shortened
    assert waits[1:] == pytest.approx([0.2, 0.4])


async def test_retry_after_is_capped_without_a_limit(waits: list[float]) -> None:
    """Without max_retry_after_s, a Retry-After of an hour waits wait_max_s and retries."""
    call, calls = failing(Busy(retry_after=3600))
    assert await retrying(call, policy=POLICY, on=Busy, retry_after=retry_after) == "ok"
    assert waits == pytest.approx([0.5]) and calls[0] == 2


async def test_retry_after_within_the_limit_may_exceed_the_backoff_cap(
    waits: list[float],
) -> None:
    """With max_retry_after_s, a Retry-After up to it is honoured in full, past wait_max_s."""
    call, _ = failing(Busy(retry_after=5))
    policy = RetryPolicy(attempts=3, wait_initial_s=0.1, wait_max_s=0.5, max_retry_after_s=60)
    await retrying(call, policy=policy, on=Busy, retry_after=retry_after)
    assert len(waits) == 1 and 5.0 <= waits[0] <= 5.0 * (1 + RETRY_AFTER_SPREAD)


async def test_clients_turned_away_together_do_not_come_back_together(
    waits: list[float],
) -> None:
    """100 calls told "Retry-After: 1" at once wait between 1 and 1.25 s, spread out: not all
    at the same instant (the herd a server would turn away again, with a doubled Retry-After),
    and none sooner than asked; a Retry-After at the limit is not spread past it."""
    policy = RetryPolicy(attempts=2, wait_initial_s=0.1, wait_max_s=0.5, max_retry_after_s=4)
    calls = [failing(Busy(retry_after=1))[0] for _ in range(100)]
    await asyncio.gather(
        *(retrying(c, policy=policy, on=Busy, retry_after=retry_after) for c in calls)
    )
    assert len(waits) == 100 and all(1.0 <= w <= 1.25 for w in waits), (min(waits), max(waits))
    assert max(waits) - min(waits) > 0.1 and len(set(waits)) > 90
    waits.clear()
    at_limit = failing(Busy(retry_after=4))[0]
    await retrying(at_limit, policy=policy, on=Busy, retry_after=retry_after)
    assert waits == [4.0]


async def test_retry_after_beyond_the_limit_gives_up_at_once(waits: list[float]) -> None:
    """A Retry-After longer than max_retry_after_s ends the retries without a wait."""
    busy = Busy("HTTP 429", retry_after=3600)
    call, calls = failing(busy)
    policy = RetryPolicy(attempts=3, wait_initial_s=0.1, wait_max_s=0.5, max_retry_after_s=60)
    with pytest.raises(RetryAfterTooLong, match="retry after 3600s, more than the 60s") as raised:
        await retrying(call, policy=policy, on=Busy, retry_after=retry_after)
    assert raised.value.error is busy and raised.value.__cause__ is busy
    assert str(raised.value).startswith("HTTP 429; ")
    assert calls[0] == 1 and waits == []


async def test_the_last_attempt_ends_as_exhausted_whatever_the_retry_after(
    waits: list[float],
) -> None:
    """On the last attempt a long Retry-After changes nothing: the failure itself is raised."""
    last = Busy("still busy", retry_after=3600)
    call, calls = failing(Busy(), last)
    policy = RetryPolicy(attempts=2, wait_initial_s=0.1, wait_max_s=0.5, max_retry_after_s=60)
    with pytest.raises(Busy) as raised:
        await retrying(call, policy=policy, on=Busy, retry_after=retry_after)
    assert raised.value is last and calls[0] == 2


async def test_once_more_tries_twice_without_waiting(waits: list[float]) -> None:
    """ONCE_MORE (a guarded write that met another writer): a second try at once, no third."""
    call, calls = failing(Busy(), Busy(), Busy())
    with pytest.raises(Busy):
        await retrying(call, policy=ONCE_MORE, on=Busy)
    assert calls[0] == 2 and waits == [0.0]


async def test_the_retry_log_never_holds_the_failure_message(
    waits: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduled retry is logged at DEBUG with what was retried and the failure's type,
    not its message (a transport error's text can carry a URL with a secret)."""
    call, _ = failing(Busy("https://hooks.example.test/T000/secret-token"))
    with caplog.at_level(logging.DEBUG, logger="canary.retry"):
        await retrying(call, policy=POLICY, on=Busy, what="webhook https://hooks.example.test/…")
    assert [r.getMessage() for r in caplog.records] == [
        "webhook https://hooks.example.test/…: Busy; retry 1 in 0.10s"
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert "secret-token" not in caplog.text


def test_policies_are_checked() -> None:
    """Nonsense policies are refused when built, not when first used."""
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0, wait_initial_s=0.1, wait_max_s=1)
    with pytest.raises(ValueError, match="wait_initial_s <= wait_max_s"):
        RetryPolicy(attempts=2, wait_initial_s=2, wait_max_s=1)
    with pytest.raises(ValueError, match="wait_jitter_s"):
        RetryPolicy(attempts=2, wait_initial_s=0.1, wait_max_s=1, wait_jitter_s=-1)


async def test_a_first_success_costs_no_retry_context(
    waits: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: nearly every call succeeds at once, and stamina's retry context is ~0.1 ms a
    call; it is entered only after a first failure, which it then counts as its attempt 1
    (same waits and attempt count as above: the other tests)."""
    import stamina

    entered = [0]
    real = stamina.retry_context

    def counting(*args: object, **kwargs: object) -> object:
        entered[0] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stamina, "retry_context", counting)
    call, calls = failing()
    assert await retrying(call, policy=POLICY, on=Busy) == "ok"
    assert (calls[0], entered[0]) == (1, 0)
    call, calls = failing(Busy())
    assert await retrying(call, policy=POLICY, on=Busy) == "ok"
    assert (calls[0], entered[0], len(waits)) == (2, 1, 1)
