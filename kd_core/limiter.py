"""How fast the engine calls the teacher: a requests/tokens-per-minute limiter with a global pause for
``Retry-After`` (:class:`RateLimiter`), and an adaptive limit on the calls in flight (:class:`AdaptiveConcurrency`).

The rate limiter is two token buckets refilled continuously. Each bucket holds at most ten seconds of its rate, so a
run starts smoothly instead of firing a whole minute's allowance in the first second (providers enforce limits over
windows shorter than a minute). A call that needs more tokens than a bucket can hold is let through when the bucket
is full and leaves it in debt, so oversized prompts slow the run down instead of blocking it forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable

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


def _nothing() -> None:
    pass


class AdaptiveConcurrency:
    """How many calls may be in flight: an AIMD limit between ``minimum`` and ``maximum`` that follows the server.

    ``async with limit.slot() as first_token:`` around each call (``first_token()`` when its first token arrives),
    then :meth:`on_success` or :meth:`on_overload`. The limit starts at ``minimum`` and doubles per round of answers
    that come back in time (slow start, as TCP does) until the first sign of overload; after that it grows by one per
    round (``1/limit`` per answer). Overload halves it: a timeout, a 429/503/504, or a call whose first token has not
    come ``latency_factor`` times later than the fastest first token seen so far (the request waits in the server's
    queue: a server that answers one request at a time keeps every request but one waiting). Calls already in flight
    when the limit drops carry no new information, so only a call *started* after the last decrease can decrease it
    again: one decrease per round, however many calls of that round time out together.

    With ``adaptive=False`` the limit stays at ``maximum`` (the local backend: it batches whatever is in flight).
    """

    def __init__(
        self, maximum: int, minimum: int = 1, *, adaptive: bool = True, latency_factor: float | None = None
    ) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.adaptive = adaptive
        self.latency_factor = latency_factor
        self.limit = float(self.minimum if adaptive else maximum)
        self.in_flight = 0
        self.decreases = 0  # times the limit was cut (shown in the engine summary)
        self.lowest = self.limit  # the extremes it reached, for the summary and the tests
        self.highest = self.limit
        self._slow_start = True
        self._baseline: float | None = None  # fastest first-token latency seen: the server's uncontended latency
        self._last_decrease = float("-inf")
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def current(self) -> int:
        """Calls allowed in flight now."""
        return max(self.minimum, min(self.maximum, int(self.limit)))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Callable[[], None]]:
        """Waits (first come, first served) until fewer than :attr:`current` calls are in flight; yields the function
        to call when the answer's first token arrives. A call still without one ``latency_factor`` times the fastest
        first-token latency after it was sent is queued at the server: the limit is cut then, not only once that
        token finally comes (on a server that answers one request at a time, a whole answer later)."""
        if self.in_flight < self.current and not self._waiters:
            self.in_flight += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # _wake counts this call in flight when it hands over the slot
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed a slot it will not use: pass it on
                    self.in_flight -= 1
                    self._wake()
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        started = time.monotonic()
        timer = None
        if self.adaptive and self.latency_factor is not None and self._baseline is not None:
            timer = asyncio.get_running_loop().call_later(
                self.latency_factor * self._baseline, self.on_overload, started
            )
        try:
            yield timer.cancel if timer is not None else _nothing
        finally:
            if timer is not None:
                timer.cancel()
            self.in_flight -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.current:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter's future is done
                waiter.set_result(None)
                self.in_flight += 1

    def on_success(self, started: float, first_token_s: float | None = None) -> None:
        """A call started at ``started`` (``time.monotonic()``) was answered; ``first_token_s``: its time to the first
        token, when the backend streams (None otherwise)."""
        if not self.adaptive:
            return
        if first_token_s is not None and self.latency_factor is not None:
            if self._baseline is None or first_token_s < self._baseline:
                self._baseline = first_token_s
            elif first_token_s > self.latency_factor * self._baseline:
                self.on_overload(started)  # it waited in the server's queue
                return
        self.limit = min(self.maximum, self.limit + (1.0 if self._slow_start else 1.0 / self.limit))
        self.highest = max(self.highest, self.limit)
        self._wake()

    def on_overload(self, started: float) -> None:
        """A call started at ``started`` timed out, was refused for load (429/503/504) or queued at the server."""
        if not self.adaptive or started < self._last_decrease:
            return  # sent under the old limit: the cut already answered it
        self._slow_start = False
        self._last_decrease = time.monotonic()
        self.limit = max(float(self.minimum), self.limit / 2)
        self.decreases += 1
        self.lowest = min(self.lowest, self.limit)
