"""The adaptive concurrency limit (``kd_core.limiter.AdaptiveConcurrency``) on its own, its settings, and streamed
answers through a slow proxy: a long answer that keeps coming is not cut by a timeout shorter than it."""

from __future__ import annotations

import asyncio
import time

import pytest

from data_gen.config import DecodingConfig, TeacherConfig
from data_gen.engine import Request, build_engine
from data_gen.fault_proxy import FaultProxy
from data_gen.testing import ScriptedServer
from kd_core.config import ConfigError, from_dict
from kd_core.limiter import AdaptiveConcurrency


def test_slow_start_doubles_then_overload_halves_then_grows_by_one_per_round():
    limit = AdaptiveConcurrency(16, 1, latency_factor=None)
    assert limit.current == 1
    for expected in (2, 4, 8, 16, 16):  # a round = `current` answers in time
        for _ in range(limit.current):
            limit.on_success(time.monotonic())
        assert limit.current == expected
    limit.on_overload(time.monotonic())
    assert limit.current == 8 and limit.decreases == 1
    for _ in range(8):  # congestion avoidance: 1/limit per answer, about one more per round, not double
        limit.on_success(time.monotonic())
    assert limit.current == 8 and 8.9 < limit.limit < 9
    limit.on_success(time.monotonic())
    assert limit.current == 9


def test_one_decrease_per_round_and_the_bounds_hold():
    limit = AdaptiveConcurrency(8, 2, latency_factor=None)
    for _ in range(20):
        limit.on_success(time.monotonic())
    assert limit.current == 8  # never above the configured concurrency
    sent = time.monotonic()
    for _ in range(8):  # the whole round times out together: it says "too many" once
        limit.on_overload(sent)
    assert limit.current == 4 and limit.decreases == 1
    for _ in range(5):  # calls sent after the cut that time out again cut again, down to the floor
        limit.on_overload(time.monotonic())
    assert limit.current == 2 and limit.lowest == 2


def test_a_first_token_far_later_than_the_fastest_counts_as_queueing():
    limit = AdaptiveConcurrency(16, 4, latency_factor=5.0)
    limit.on_success(time.monotonic(), first_token_s=0.1)  # the uncontended latency
    assert limit.current == 5
    limit.on_success(time.monotonic(), first_token_s=0.4)  # slower, not queued
    assert limit.current == 6
    limit.on_success(time.monotonic(), first_token_s=0.9)  # waited behind others at the server
    assert limit.current == 4 and limit.decreases == 1
    fixed = AdaptiveConcurrency(16, 1, adaptive=False, latency_factor=5.0)
    fixed.on_overload(time.monotonic())
    fixed.on_success(time.monotonic(), first_token_s=100.0)
    assert fixed.current == 16 and fixed.decreases == 0


def test_slots_never_exceed_the_limit_and_a_cancelled_waiter_passes_its_turn():
    async def scenario() -> tuple[int, int]:
        limit = AdaptiveConcurrency(3, 3, latency_factor=None)
        peak = 0

        async def call(seconds: float) -> None:
            nonlocal peak
            async with limit.slot():
                peak = max(peak, limit.in_flight)
                await asyncio.sleep(seconds)

        holders = [asyncio.create_task(call(0.05)) for _ in range(3)]
        await asyncio.sleep(0.01)
        doomed = asyncio.create_task(call(0.0))  # waits; cancelled before its turn comes
        others = [asyncio.create_task(call(0.01)) for _ in range(6)]
        await asyncio.sleep(0.01)
        doomed.cancel()
        limit.on_overload(time.monotonic())  # 3 -> floor 3: unchanged; min == max pins it
        await asyncio.gather(*holders, *others)
        return peak, limit.in_flight

    assert asyncio.run(scenario()) == (3, 0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("min_concurrency", 0, "teacher: min_concurrency: expected 1 <= min_concurrency <= concurrency (16)"),
        ("min_concurrency", 17, "teacher: min_concurrency: expected 1 <= min_concurrency <= concurrency (16)"),
        ("queue_latency_factor", 1.0, "teacher: queue_latency_factor: expected a number > 1 or null"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(field, value, message):
    with pytest.raises(ConfigError) as err:
        from_dict(TeacherConfig, {"model": "m", field: value}, "teacher")
    assert str(err.value) == message


def test_a_streamed_answer_that_keeps_coming_outlives_a_shorter_timeout(tmp_path):
    """40 words at 50 ms each (2 s) with timeout_s 1: the timeout bounds each silence, not the answer. Each silence
    is 50 ms on the proxy's clock, so only a stall of nearly a second (not a busy machine's usual hiccups) could cut
    it."""
    text = " ".join(f"w{i}" for i in range(40))
    server = ScriptedServer(lambda body: text).start()
    proxy = FaultProxy(("127.0.0.1", server.port), [], token_delay_s=0.05).start()
    try:
        cfg = TeacherConfig(
            model="m",
            base_url=proxy.base_url,
            api_key_env=None,
            timeout_s=1.0,
            max_retries=0,
            decoding=DecodingConfig(max_tokens=64),
        )
        engine = build_engine(cfg, tmp_path, progress=False)

        async def ask() -> list:
            out = [r async for r in engine.run([Request("long", [{"role": "user", "content": "talk"}])])]
            await engine.aclose()
            return out

        started = time.monotonic()
        [result] = asyncio.run(ask())
        assert time.monotonic() - started >= 1.9  # longer than the timeout: it was not one silence
        assert result.ok and result.text == text and not engine.stats.retries
        assert proxy.completed == 1 and proxy.abandoned == 0
    finally:
        proxy.stop()
        server.stop()
