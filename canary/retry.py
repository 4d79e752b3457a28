"""The one retry helper: bounded attempts, exponential backoff, a server's Retry-After honoured.

Why one helper: canary retries in several places (webhook deliveries, every Kubernetes API
call, a guarded write that met another writer), and each used to carry its own loop. Here
the loop is stamina's (hynek/stamina, on tenacity): jittered exponential backoff, a bounded
number of attempts, async-aware, and `stamina.set_testing()` for tests. What stamina leaves
to us is the policy, in `RetryPolicy`, and one rule it cannot know:

- a server's Retry-After (returned by the caller's `retry_after` for a failure) is a floor:
  the wait is the larger of it and the backoff (without jitter), never shorter than the
  server asked;
- a Retry-After wait is spread by up to a quarter of it (never shortened), so the clients a
  server turned away together do not all come back together;
- a Retry-After is still bounded: without `max_retry_after_s` the wait is capped at
  `wait_max_s` like any other; with it, a longer one ends the retries at once with
  `RetryAfterTooLong` (a server that says "come back in an hour" is down, not busy).

Failures that are not of the retried type pass straight through, on the first attempt. When
the attempts run out, the last failure itself is raised, so callers keep their own error
types and messages.

Scheduled retries are logged at DEBUG by this module (what was retried, the failure's type,
the wait): stamina's default instrumentation, which logs every retry at WARNING with the
failure's repr and counts them in the global Prometheus registry, is replaced on import.

A top-level utility: it may import nothing else from ``canary``.

Exception tree::

    RetryAfterTooLong   the server asked for a longer pause than `max_retry_after_s`;
                        `.error` is the failure that asked, also its __cause__
"""

from __future__ import annotations

import contextvars
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import stamina
from stamina.instrumentation import RetryDetails, set_on_retry_hooks

__all__ = ["ONCE_MORE", "RETRY_AFTER_SPREAD", "RetryAfterTooLong", "RetryPolicy", "retrying"]

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=Exception)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry.

    The wait before retry n (1-based) is ``min(wait_max_s, wait_initial_s * 2 ** (n - 1))``
    plus up to `wait_jitter_s` of random jitter, still capped at `wait_max_s`.
    """

    attempts: int  # in all, the first one included
    wait_initial_s: float
    wait_max_s: float
    wait_jitter_s: float = 0.0
    # None: a Retry-After wait is capped at wait_max_s. A number: Retry-After up to it is
    # waited in full (even beyond wait_max_s); a longer one raises RetryAfterTooLong.
    max_retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if not 0 <= self.wait_initial_s <= self.wait_max_s:
            raise ValueError(
                "need 0 <= wait_initial_s <= wait_max_s, got "
                f"{self.wait_initial_s} and {self.wait_max_s}"
            )
        if self.wait_jitter_s < 0:
            raise ValueError(f"wait_jitter_s must be >= 0, got {self.wait_jitter_s}")
        if self.max_retry_after_s is not None and self.max_retry_after_s < 0:
            raise ValueError(f"max_retry_after_s must be >= 0, got {self.max_retry_after_s}")


# A second try at once: for a guarded write that met another writer between its read and
# its write (re-read, write again). A second conflict is the caller's to report.
# A Retry-After of s seconds is waited for s to s * (1 + RETRY_AFTER_SPREAD) seconds.
RETRY_AFTER_SPREAD = 0.25

ONCE_MORE = RetryPolicy(attempts=2, wait_initial_s=0.0, wait_max_s=0.0)


class RetryAfterTooLong(Exception):
    """The server asked to wait longer than the policy allows; retrying stopped."""

    def __init__(self, error: Exception, retry_after_s: float, max_retry_after_s: float) -> None:
        super().__init__(
            f"{error}; server asks to retry after {retry_after_s:g}s, "
            f"more than the {max_retry_after_s:g}s allowed"
        )
        self.error = error
        self.retry_after_s = retry_after_s
        self.max_retry_after_s = max_retry_after_s


# What is being retried, for the log line of the instrumentation hook below.
_what: contextvars.ContextVar[str] = contextvars.ContextVar("canary_retry_what", default="")


def _log_retry(details: RetryDetails) -> None:
    log.debug(
        "%s: %s; retry %d in %.2fs",
        _what.get() or details.name,
        type(details.caused_by).__name__,
        details.retry_num,
        details.wait_for,
    )


set_on_retry_hooks([_log_retry])


@dataclass
class _Attempts:
    """What the backoff hook needs to know about the attempt that just failed."""

    last: bool = False  # no retry follows it, whatever the server asks
    next_wait: float = 0.0  # stamina's jitter-less backoff after it
    too_long: RetryAfterTooLong | None = None


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    on: type[E],
    retry_after: Callable[[E], float | None] | None = None,
    what: str = "",
) -> T:
    """Await `call()` until it returns, retrying failures of type `on` under `policy`.

    `retry_after` gives a failure's Retry-After in seconds (None: none given). Anything not
    an `on` passes straight through; after the last attempt its failure is raised as is.
    """
    attempts = _Attempts()

    def backoff(exc: Exception) -> bool | float:
        if not isinstance(exc, on):
            return False
        seconds = retry_after(exc) if retry_after is not None else None
        if seconds is None or attempts.last:
            return True  # stamina's own jittered backoff
        limit = policy.max_retry_after_s
        if limit is not None and seconds > limit:
            attempts.too_long = RetryAfterTooLong(exc, seconds, limit)
            return False
        floor = max(attempts.next_wait, seconds)
        if seconds > attempts.next_wait:
            # Spread the retries a Retry-After sends back: every client the server turned
            # away at once would otherwise come back at the same instant, be turned away
            # again, and be told to wait twice as long (seen with API Priority and Fairness).
            floor += random.uniform(0.0, RETRY_AFTER_SPREAD * seconds)
        if limit is None:
            return min(policy.wait_max_s, floor)
        return min(floor, max(limit, seconds))

    # The first attempt outside stamina: nearly every call succeeds at once, and a retry
    # context costs ~0.1 ms (tenacity's per-attempt machinery: ~5% of the controller's loop at
    # 1,000 rollouts, for 0.6 API calls per rollout-tick). A first failure of type `on` is
    # replayed as stamina's own first attempt, so the waits, the attempt count, the
    # Retry-After rule and the hooks are exactly the same as when stamina made it.
    try:
        return await call()
    except on as exc:
        first: BaseException | None = exc

    def again() -> Awaitable[T]:
        nonlocal first
        if first is not None:
            failure, first = first, None
            raise failure
        return call()

    token = _what.set(what)
    try:
        async for attempt in stamina.retry_context(
            on=backoff,
            attempts=policy.attempts,
            timeout=None,  # bounded by attempts; stamina's default 45 s would cut them short
            wait_initial=policy.wait_initial_s,
            wait_max=policy.wait_max_s,
            wait_jitter=policy.wait_jitter_s,
        ):
            with attempt:
                attempts.last = attempt.num >= policy.attempts
                attempts.next_wait = attempt.next_wait
                return await again()
    except Exception as exc:
        too_long = attempts.too_long
        if too_long is not None and too_long.error is exc:
            raise too_long from exc
        raise
    finally:
        _what.reset(token)
    raise AssertionError("unreachable")  # pragma: no cover
