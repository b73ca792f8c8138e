"""Requests-per-minute and tokens-per-minute limiter with a global pause for ``Retry-After``.

Two token buckets refilled continuously. Each bucket holds at most ten seconds of its rate, so a run starts
smoothly instead of firing a whole minute's allowance in the first second (providers enforce limits over windows
shorter than a minute). A call that needs more tokens than a bucket can hold is let through when the bucket is full
and leaves it in debt, so oversized prompts slow the run down instead of blocking it forever.
"""

from __future__ import annotations

import asyncio
import time

BURST_SECONDS = 10.0


class _Bucket:
    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * BURST_SECONDS)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (capped at capacity) is available."""
        needed = min(amount, self.capacity) - self.level
        return 0.0 if needed <= 0 else needed / self.rate


class RateLimiter:
    """``await acquire(tokens)`` before each call; ``settle`` corrects the token estimate; ``pause`` for 429s."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self._requests = _Bucket(requests_per_minute) if requests_per_minute else None
        self._tokens = _Bucket(tokens_per_minute) if tokens_per_minute else None
        self._paused_until = 0.0
        self._lock = asyncio.Lock()  # first come, first served: waiters queue on the lock

    async def acquire(self, tokens: int) -> None:
        if self._requests is None and self._tokens is None and time.monotonic() >= self._paused_until:
            return  # no limits configured and no pause: skip the lock (the common local-server case)
        async with self._lock:
            while True:
                now = time.monotonic()
                wait = self._paused_until - now
                for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
                    if bucket is not None:
                        bucket.refill(now)
                        wait = max(wait, bucket.wait_for(amount))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None:
                self._tokens.level -= tokens

    def settle(self, reserved: int, used: int) -> None:
        """Give back tokens reserved but not used (max_tokens is an upper bound), or charge the excess."""
        if self._tokens is not None:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + reserved - used)

    def pause(self, seconds: float) -> None:
        """No call starts for ``seconds`` (a server's ``Retry-After``)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
