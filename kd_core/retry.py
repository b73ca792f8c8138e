"""One retry loop for every call to a remote teacher (data generation's engine, the served teacher's scorer).

Each attempt waits for the rate limiter and a slot of the adaptive concurrency limit (:mod:`kd_core.limiter`), so
one limiter sees every attempt; a :class:`~kd_core.remote.TransientError` is retried after a full-jitter
exponential backoff, or after the server's ``Retry-After`` (which pauses every worker, not only the one told); a
:class:`~kd_core.remote.FatalError`, or the last transient one, ends the loop with :class:`RetriesExhausted`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kd_core.limiter import AdaptiveConcurrency, RateLimiter
from kd_core.remote import FatalError, TransientError

T = TypeVar("T")

# Transient failures that mean "too much in flight" and halve the adaptive concurrency limit. A 500, a cut body or
# a refused connection says nothing about load.
OVERLOAD_REASONS = frozenset({"timeout", "429", "503", "504", "408"})


class RetriesExhausted(Exception):
    """The call failed for good: ``fatal`` is True for a FatalError, False after the last transient failure."""

    def __init__(self, message: str, *, fatal: bool, last: Exception) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.last = last


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))


@dataclass
class Attempt(Generic[T]):
    """What a successful call reports back to the limits: its answer, the tokens it really used, and when its
    first token arrived (None when not streamed)."""

    value: T
    tokens_used: int
    first_token_s: float | None = None


async def call_with_retries(
    call: Callable[[Callable[[], None]], Awaitable[Attempt[T]]],
    *,
    policy: RetryPolicy,
    limiter: RateLimiter,
    concurrency: AdaptiveConcurrency,
    tokens: int,
    on_retry: Callable[[str], None] = lambda reason: None,
) -> T:
    """``await call(on_first_token)`` until it succeeds, at most ``policy.max_retries + 1`` times. ``tokens`` is the
    worst-case token count reserved against the rate limiter per attempt (settled with the real count)."""
    last: TransientError | None = None
    for attempt in range(policy.max_retries + 1):
        await limiter.acquire(tokens)
        async with concurrency.slot() as first_token:
            sent = time.monotonic()
            try:
                done = await call(first_token)
                limiter.settle(tokens, done.tokens_used)
                concurrency.on_success(sent, done.first_token_s)
                return done.value
            except FatalError as err:
                raise RetriesExhausted(str(err), fatal=True, last=err) from None
            except TransientError as err:
                last = err
                on_retry(err.reason)
                if err.reason in OVERLOAD_REASONS:  # the server has more than it can answer in time
                    concurrency.on_overload(sent)
        if last.retry_after is not None:
            limiter.pause(last.retry_after)
            delay = last.retry_after
        else:
            delay = policy.delay(attempt)
        if attempt < policy.max_retries:
            await asyncio.sleep(delay)
    raise RetriesExhausted(f"failed {policy.max_retries + 1} times (last: {last})", fatal=False, last=last)
