"""How hard a command may call a served teacher, and what it may spend: one config section and one budget.

:class:`ServedLimits` is the section a command that scores rows on a served teacher carries (``distill precompute``
with ``teacher_url``): calls in flight (an :class:`~kd_core.limiter.AdaptiveConcurrency` limit), rate limits, the
retry policy of :func:`kd_core.retry.call_with_retries`, and prices with a hard cap. :class:`Budget` is the
arithmetic of that cap, shared with data generation's engine: every call reserves its worst case before it is sent
and is charged what the server reports, so calls in flight together can never overrun the cap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kd_core.config import option
from kd_core.limiter import AdaptiveConcurrency, RateLimiter
from kd_core.retry import Attempt, RetryPolicy, call_with_retries
from kd_core.served import PromptLogprobs, PromptScorer

T = TypeVar("T")


class Budget:
    """Spent and reserved dollars against ``max_cost_usd`` (None: no cap), at per-million-token prices."""

    def __init__(self, price_input_per_m: float, price_output_per_m: float, max_cost_usd: float | None) -> None:
        self.price_input_per_m = price_input_per_m
        self.price_output_per_m = price_output_per_m
        self.max_cost_usd = max_cost_usd
        self.spent_usd = 0.0
        self.reserved_usd = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.price_input_per_m + output_tokens * self.price_output_per_m) / 1e6

    def fits(self, amount_usd: float) -> bool:
        """Whether ``amount_usd`` more can be committed beside what is spent and reserved."""
        return self.max_cost_usd is None or self.spent_usd + self.reserved_usd + amount_usd <= self.max_cost_usd

    def reserve(self, input_tokens: int, output_tokens: int) -> float | None:
        """Reserves a call's worst-case cost; None (nothing reserved) when it would not fit under the cap."""
        amount = self.cost(input_tokens, output_tokens)
        if not self.fits(amount):
            return None
        self.reserved_usd += amount
        return amount

    def release(self, amount_usd: float) -> None:
        self.reserved_usd -= amount_usd

    def charge(self, input_tokens: int, output_tokens: int) -> float:
        """Adds a finished call's real cost to the spent total; returns it."""
        amount = self.cost(input_tokens, output_tokens)
        self.spent_usd += amount
        return amount


@dataclasses.dataclass
class ServedLimits:
    concurrency: int = option(8, help="Scoring calls in flight at most.")
    min_concurrency: int = option(
        1, help="Adaptive concurrency starts here and never drops below it (halved on 429/503/timeouts)."
    )
    adaptive_concurrency: bool = option(
        True, help="Grow the calls in flight from min_concurrency while latency holds; False = always concurrency."
    )
    requests_per_minute: float | None = option(None, help="Request-rate limit; None = unlimited.")
    tokens_per_minute: float | None = option(None, help="Token-rate limit (prompt tokens + 1); None = unlimited.")
    timeout_s: float = option(600.0, help="Per-request timeout in seconds.")
    max_retries: int = option(6, help="Retries of one call on 429/5xx/timeouts/connection errors/malformed answers.")
    backoff_base_s: float = option(1.0, help="First backoff delay; doubles each retry, with full jitter.")
    backoff_max_s: float = option(60.0, help="Largest backoff delay.")
    price_input_per_m: float = option(0.0, help="USD per 1M prompt tokens scored.")
    price_output_per_m: float = option(0.0, help="USD per 1M generated tokens (one per scoring call).")
    max_cost_usd: float | None = option(
        None, help="Hard budget of this run: stop cleanly (resumable) before spending more; None = no cap."
    )

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency: expected >= 1, got {self.concurrency}")
        if not 1 <= self.min_concurrency <= self.concurrency:
            raise ValueError(f"min_concurrency: expected 1 <= min_concurrency <= concurrency ({self.concurrency})")
        for name in ("requests_per_minute", "tokens_per_minute", "max_cost_usd"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: expected a positive number or null")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {self.max_retries}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff_base_s: expected >= 0")
        if self.price_input_per_m < 0 or self.price_output_per_m < 0:
            raise ValueError("price_input_per_m: expected >= 0")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.backoff_base_s, self.backoff_max_s)

    def rate_limiter(self) -> RateLimiter:
        return RateLimiter(self.requests_per_minute, self.tokens_per_minute)

    def concurrency_limit(self) -> AdaptiveConcurrency:
        return AdaptiveConcurrency(self.concurrency, self.min_concurrency, adaptive=self.adaptive_concurrency)

    def budget(self) -> Budget:
        return Budget(self.price_input_per_m, self.price_output_per_m, self.max_cost_usd)


class ServedCalls:
    """The calls of one run to a served teacher under one :class:`ServedLimits`: a rate limiter, an adaptive
    concurrency limit, the retry policy and the budget, shared by every call. A scoring call reserves its worst case
    against the budget before it is sent, and is charged what the server reports."""

    def __init__(self, limits: ServedLimits, on_retry: Callable[[str], None] = lambda reason: None) -> None:
        self.policy, self.limiter = limits.retry_policy(), limits.rate_limiter()
        self.concurrency, self.budget = limits.concurrency_limit(), limits.budget()
        self.on_retry = on_retry

    async def retrying(self, call: Callable[[Callable[[], None]], Awaitable[Attempt[T]]], tokens: int) -> T:
        """:func:`kd_core.retry.call_with_retries` under these limits."""
        return await call_with_retries(
            call,
            policy=self.policy,
            limiter=self.limiter,
            concurrency=self.concurrency,
            tokens=tokens,
            on_retry=self.on_retry,
        )

    async def score(self, scorer: PromptScorer, ids: list[int], k: int, where: str) -> PromptLogprobs | None:
        """``scorer.score(ids, k, where)`` retried under the limits; None (nothing sent) when its worst case (the
        prompt and one generated token) does not fit in the budget. RetriesExhausted when it fails for good."""
        reservation = self.budget.reserve(len(ids), 1)
        if reservation is None:
            return None

        async def attempt(_first_token: Callable[[], None]) -> Attempt[PromptLogprobs]:
            answer = await scorer.score(ids, k, where)
            return Attempt(answer, answer.prompt_tokens + 1)

        try:
            answer = await self.retrying(attempt, len(ids) + 1)
        finally:
            self.budget.release(reservation)
        self.budget.charge(answer.prompt_tokens, 1)
        return answer
